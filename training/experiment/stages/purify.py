"""Stages ``purify/<purifier>``: the protected images purified, for the baselines that train on them
(``jpeg``: JPEG re-compression; ``diffpure``: DiffPure-style img2img with the model itself; ``noise``:
Gaussian noise, Hönig et al. 2025); ``purify/<purifier>_clean``: the clean images purified the same way (same
settings and seeds), for a purifier's cost when nothing was attacked. Only the sets some method trains on are
planned."""
from __future__ import annotations

from pathlib import Path

from lord_ops.comfy.generate import diffpure_conditioned
from lord_ops.purify import gaussian_noise, jpeg_recompress
from training.experiment.context import ExperimentContext, sampling_config
from training.experiment.images import hwc, save_png
from training.experiment.methods import PURIFIED_SETS, Variant
from training.pipeline import Stage


def stages(ctx: ExperimentContext, variants: list[Variant]) -> list[Stage]:
    out = []
    for images, (purifier, source) in PURIFIED_SETS.items():
        if any(v.images == images for v in variants):
            if source == "protected":
                key, needs = {**ctx.base_key(), "protected": ctx.protected_key()}, ctx.protected_needs()
            else:
                key, needs = {**ctx.base_key(), "clean": ctx.image_key(ctx.clean)}, ()
            out.append(Stage(f"purify/{images}", {**key, **settings_key(ctx, purifier)},
                             lambda folder, i=images: run(ctx, folder, i), needs=needs,
                             describe=f"{purifier} purification of the {source} images"))
    return out


def settings_key(ctx: ExperimentContext, purifier: str) -> dict:
    exp = ctx.exp
    if purifier == "jpeg":
        return {"jpeg_quality": exp.jpeg_quality}
    if purifier == "noise":
        return {"sigma": exp.noise_sigma, "seed": exp.seed}
    return {"strength": exp.diffpure_strength, "steps": exp.diffpure_steps, "prompt": exp.class_text,
            "seed": exp.seed, "sampler": exp.sampling.sampler, "scheduler": exp.sampling.scheduler,
            "cfg": exp.sampling.cfg, "negative": exp.sampling.negative}


def run(ctx: ExperimentContext, folder: Path, images: str) -> dict:
    """Purify the image set's source (``PURIFIED_SETS[images]``) into ``folder/images/<name>.png``."""
    exp = ctx.exp
    purifier, source = PURIFIED_SETS[images]
    src = ctx.protected() if source == "protected" else ctx.clean
    out = folder / "images"
    if purifier == "jpeg":
        done = jpeg_recompress(hwc([src[n] for n in ctx.names]), exp.jpeg_quality)
        for i, n in enumerate(ctx.names):
            save_png(out / f"{n}.png", done[i].permute(2, 0, 1))
        return {"images": len(ctx.names), "source": source, "jpeg_quality": exp.jpeg_quality}
    if purifier == "noise":
        done = gaussian_noise(hwc([src[n] for n in ctx.names]), exp.noise_sigma, exp.seed)
        for i, n in enumerate(ctx.names):
            save_png(out / f"{n}.png", done[i].permute(2, 0, 1))
        return {"images": len(ctx.names), "source": source, "sigma": exp.noise_sigma}
    model, _, vae = ctx.rt.models()
    cfg = sampling_config(exp, steps=exp.diffpure_steps, batch_size=1)
    positive, negative = ctx.rt.encode(exp.class_text), ctx.rt.encode(cfg.negative)
    for i, n in enumerate(ctx.names):
        if (out / f"{n}.png").is_file():
            continue
        done = diffpure_conditioned(model, vae, hwc([src[n]]), positive, negative, exp.diffpure_strength,
                                    exp.seed + i, cfg)
        save_png(out / f"{n}.png", done[0].permute(2, 0, 1))
        ctx.log(f"    diffpure: {i + 1}/{len(ctx.names)}")
    return {"images": len(ctx.names), "source": source, "strength": exp.diffpure_strength,
            "steps": exp.diffpure_steps, "prompt": exp.class_text}
