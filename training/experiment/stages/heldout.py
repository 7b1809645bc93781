"""Stages ``heldout/<variant>`` (with ``[metrics] heldout_images``): the held-out denoising loss of a
method's fine-tuned model (base + its LoRA, and its LoRD for LoRD methods) on clean subject images it
never trained on, over a fixed grid of timesteps and noise draws (``lord_ops.comfy.subject_loss``):
the replicate analysis' primary metric (lower: the LoRA learned the subject better)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lord_ops.comfy.subject_loss import heldout_loss
from training.experiment.context import ExperimentContext
from training.experiment.images import load_set
from training.experiment.methods import Variant
from training.pipeline import Stage


def stage(ctx: ExperimentContext, v: Variant) -> Optional[Stage]:
    m = ctx.exp.metrics
    if m.heldout_images is None:
        return None
    key = {"images": ctx.image_key(load_set(m.heldout_images, ctx.exp.resolution)), "prompt": ctx.exp.prompt,
           "timesteps": list(m.heldout_timesteps), "draws": m.heldout_draws, "seed": m.heldout_seed}
    if v.gates[1] != "learned":
        key["gate"] = v.gates[1]
    if v.lord and ctx.sampling_strength(v) != 1.0:
        key["defense_strength"] = ctx.sampling_strength(v)
    return Stage(f"heldout/{v.id}", key, lambda folder: run(ctx, folder, v),
                 needs=(f"train/{v.train_id}",) + (ctx.lord_needs(v.lord) if v.lord else ()),
                 describe="held-out denoising loss on clean subject images")


def run(ctx: ExperimentContext, folder: Path, v: Variant) -> dict:
    exp, m = ctx.exp, ctx.exp.metrics
    model, vae = ctx.method_model(v)
    images = load_set(m.heldout_images, exp.resolution)
    names = sorted(images)
    result = heldout_loss(model, vae, [images[n].float() / 255 for n in names], ctx.rt.encode(exp.prompt),
                          m.heldout_timesteps, m.heldout_draws, m.heldout_seed, m.batch_size)
    return {"heldout_loss": {**result, "names": names}}
