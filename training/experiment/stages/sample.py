"""Stages ``sample/<variant>``: ``[sampling] images`` images of the instance prompt from the base model
with the method's LoRA (and its LoRD, for LoRD methods); image ``i`` uses seed ``[sampling] seed + i``
in every method."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lord_ops.comfy.generate import sample_images
from training.experiment.context import ExperimentContext, sampling_config
from training.experiment.images import save_png
from training.experiment.methods import Variant
from training.pipeline import Stage


def stage(ctx: ExperimentContext, v: Variant) -> Stage:
    exp = ctx.exp
    key = {"prompt": exp.prompt, "sampling": dataclasses.asdict(exp.sampling)}
    if v.gates[1] != "learned":
        key["gate"] = v.gates[1]
    if v.lord and ctx.sampling_strength(v) != 1.0:
        key["defense_strength"] = ctx.sampling_strength(v)
    return Stage(f"sample/{v.id}", key, lambda folder: run(ctx, folder, v),
                 needs=(f"train/{v.train_id}",) + (ctx.lord_needs(v.lord) if v.lord else ()),
                 describe=f"{exp.sampling.images} image(s) of {exp.prompt!r}")


def run(ctx: ExperimentContext, folder: Path, v: Variant) -> dict:
    exp, s = ctx.exp, ctx.exp.sampling
    model, vae = ctx.method_model(v)
    cfg = sampling_config(exp)
    out = folder / "images"
    todo = [i for i in range(s.images) if not (out / f"{i:04d}.png").is_file()]
    if todo:
        if len(todo) < s.images:
            ctx.log(f"    sample {v.id}: {s.images - len(todo)} image(s) already written, {len(todo)} to go")

        def on_image(j, image_u8):
            save_png(out / f"{todo[j]:04d}.png", image_u8.permute(2, 0, 1))
            if (j + 1) % max(1, len(todo) // 10) == 0 or j + 1 == len(todo):
                ctx.log(f"    sample {v.id}: {j + 1}/{len(todo)}")

        sample_images(model, vae, ctx.rt.encode(exp.prompt), ctx.rt.encode(cfg.negative), [s.seed + i for i in todo],
                      cfg, on_image=on_image)
    return {"images": [f"images/{i:04d}.png" for i in range(s.images)], "seeds": [s.seed + i for i in range(s.images)]}
