"""LoRD Detect: per-image adversarial score and per-pixel gate heatmap ("detect adversarial samples")."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..lord_ops.comfy.detection import detect
from ..lord_ops.detect import colorize


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
                io.Vae.Input("vae", tooltip="The VAE of that model; encodes the images to latents."),
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
        found = detect(model, vae, image, positive, timestep, seed)
        scores, maps, heat = found.scores, found.maps, found.heat
        report = {
            "scores": [round(float(s), 6) for s in scores],
            "timestep": timestep,
            "layers": {n: round(float(m.mean()), 6) for n, m in sorted(maps.items())},
        }
        text = json.dumps(report)
        return io.NodeOutput(colorize(heat).cpu(), heat.cpu(), float(scores.mean()), text, ui=ui.PreviewText(text))
