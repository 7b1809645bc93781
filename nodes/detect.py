"""LoRD Detect: per-image adversarial score and per-pixel gate heatmap ("detect adversarial samples")."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..lord_ops.detect import adversarial_scores, colorize, gate_heatmap, gate_maps


def _single_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A 'sampler' that evaluates the denoiser once at ``sigmas[0]`` (the gate hooks record)."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def record_gates(model, latent: torch.Tensor, positive, timestep: int, seed: int):
    """Run one denoiser evaluation of ``model`` on ``latent`` noised to ``timestep``; returns
    ``(records, spatial_names)`` from every LoRD applied to the MODEL."""
    import comfy.sample
    import comfy.samplers

    from ..lord_ops.comfy.patch import lord_injections, recording_gates

    with recording_gates(model) as (clone, records):
        spatial = set().union(*(inj.spatial for _, inj in lord_injections(clone)))
        sigma = clone.get_model_object("model_sampling").sigma(torch.tensor([float(timestep)]))
        sigmas = torch.cat([sigma.float().reshape(1), torch.zeros(1)])
        guider = comfy.samplers.CFGGuider(clone)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        latent = comfy.sample.fix_empty_latent_channels(clone, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(_single_evaluation), sigmas, seed=seed, disable_pbar=True)
    return records, spatial


class LoRDDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDDetect",
            display_name="LoRD Detect",
            category="LoRD",
            description="Score images for adversarial perturbation with the LoRD gate: 0 looks clean, "
                        "1 looks perturbed. Also returns where in the image the gate fires.",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL with at least one LoRD applied (Load LoRD)."),
                io.Vae.Input("vae"),
                io.Image.Input("image", tooltip="Images to check."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning, e.g. 'a photo of a person'."),
                io.Int.Input("timestep", default=200, min=0, max=999,
                             tooltip="Diffusion timestep (0..999) at which the gate is read."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise added at that timestep."),
            ],
            outputs=[
                io.Image.Output(display_name="heatmap", tooltip="Gate per pixel: dark = clean, bright = adversarial."),
                io.Mask.Output(display_name="gate_mask", tooltip="The same gate values as a MASK (0..1)."),
                io.Float.Output(display_name="score", tooltip="Mean adversarial score over the batch (0..1)."),
                io.String.Output(display_name="report", tooltip="JSON: per-image scores and per-layer means."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, positive, timestep, seed):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        pixels = image[..., :3]
        h, w = pixels.shape[1], pixels.shape[2]
        f = vae.spacial_compression_encode()
        hc, wc = (h // f) * f, (w // f) * f
        if hc == 0 or wc == 0:
            raise ValueError(f"LoRD Detect: image {w}x{h} is smaller than the VAE's {f}-pixel block.")
        latent = vae.encode(pixels[:, :hc, :wc])
        records, spatial = record_gates(model, latent, positive, timestep, seed)
        maps = gate_maps(records, tuple(latent.shape[-2:]), spatial)
        scores = adversarial_scores(maps)
        heat = gate_heatmap(maps, (h, w))
        report = {
            "scores": [round(float(s), 6) for s in scores],
            "timestep": timestep,
            "layers": {n: round(float(m.mean()), 6) for n, m in sorted(maps.items())},
        }
        text = json.dumps(report)
        return io.NodeOutput(colorize(heat).cpu(), heat.cpu(), float(scores.mean()), text, ui=ui.PreviewText(text))
