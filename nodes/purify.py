"""LoRD Purify: the purification baselines (JPEG re-compression, DiffPure-style img2img) on IMAGEs."""
from __future__ import annotations

from comfy_api.latest import io

METHODS = ("jpeg", "diffpure")


def zero_conditioning(conditioning):
    """Core's ConditioningZeroOut: the same structure with zero tensors (the negative when none is given)."""
    import torch

    out = []
    for cond, extra in conditioning:
        extra = dict(extra)
        for key in ("pooled_output", "conditioning_lyrics"):
            if extra.get(key) is not None:
                extra[key] = torch.zeros_like(extra[key])
        out.append([torch.zeros_like(cond), extra])
    return out


class LoRDPurify(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="LoRDPurify",
            display_name="LoRD Purify (JPEG / DiffPure)",
            category="LoRD",
            description="Try to remove protective perturbations before training: JPEG re-compression, or a "
                        "DiffPure-style img2img round trip (noise the image to 'strength', denoise with the base "
                        "model). Baselines to compare LoRD with (Hönig et al. 2024).",
            inputs=[
                io.Image.Input("image", tooltip="Images to purify (any size)."),
                io.Combo.Input("method", options=list(METHODS), default="jpeg",
                               tooltip="jpeg: Pillow JPEG round trip at jpeg_quality. diffpure: VAE-encode, noise "
                                       "to strength, denoise with model under positive, decode (needs model, vae, "
                                       "positive)."),
                io.Int.Input("jpeg_quality", default=75, min=1, max=95,
                             tooltip="jpeg only: Pillow quality 1..95 (lower = stronger purification, more "
                                     "artifacts)."),
                io.Float.Input("strength", default=0.2, min=0.01, max=1.0, step=0.01,
                               tooltip="diffpure only: share of the noise schedule (core KSampler denoise). 0.1..0.3 "
                                       "keeps the image; 1.0 replaces it."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="diffpure only: sampler steps actually run."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="diffpure only: classifier-free guidance scale (1.0: positive alone)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="diffpure only: image i uses seed + i."),
                io.Model.Input("model", optional=True, tooltip="diffpure: the base model that denoises."),
                io.Vae.Input("vae", optional=True, tooltip="diffpure: the VAE of that model."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="diffpure: prompt conditioning, e.g. the class prompt 'a photo of a "
                                              "person'."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="diffpure: negative conditioning (default: zeroed positive, like "
                                              "ConditioningZeroOut)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               optional=True, tooltip="diffpure: ComfyUI sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               optional=True, tooltip="diffpure: ComfyUI scheduler."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="Purified images, same size as the input.")],
        )

    @classmethod
    def execute(cls, image, method, jpeg_quality, strength, steps, cfg, seed, model=None, vae=None, positive=None,
                negative=None, sampler_name="euler", scheduler="normal"):

        from ..lord_ops.comfy.progress import ImageProgress
        from ..lord_ops.images import image_to_uint8
        from ..lord_ops.purify import jpeg_recompress

        ImageProgress.check()
        if image.dim() != 4 or image.shape[-1] < 3:
            raise ValueError(f"LoRD Purify: expected an IMAGE [B, H, W, C>=3], got {list(image.shape)}")
        u8 = image_to_uint8(image)
        if method == "jpeg":
            out = jpeg_recompress(u8, int(jpeg_quality))
        elif method == "diffpure":
            from ..lord_ops.comfy.generate import SamplingConfig, diffpure_conditioned

            missing = [name for name, value in (("model", model), ("vae", vae), ("positive", positive)) if value is None]
            if missing:
                raise ValueError(f"LoRD Purify: method 'diffpure' needs the {', '.join(missing)} input(s): connect the "
                                 f"base checkpoint's MODEL and VAE and a CLIP Text Encode of the class prompt (e.g. "
                                 f"'a photo of a person'); or choose method 'jpeg'")
            config = SamplingConfig(steps=int(steps), cfg=float(cfg), sampler=sampler_name or "euler",
                                    scheduler=scheduler or "normal").validate()
            progress = ImageProgress(u8.shape[0], config.steps)
            out = diffpure_conditioned(model, vae, u8, positive, negative if negative is not None else
                                       zero_conditioning(positive), float(strength), int(seed), config,
                                       on_image=progress.on_image, check=progress.check, on_step=progress.on_step)
        else:
            raise ValueError(f"LoRD Purify: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        return io.NodeOutput(out.float().div(255).to(image.device))
