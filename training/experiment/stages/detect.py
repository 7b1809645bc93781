"""Stage ``detect`` (when the clean originals are known): the LoRD Detect score of every clean and
protected instance image, and their ROC."""
from __future__ import annotations

from pathlib import Path

from lord_ops.comfy.detection import detect
from lord_ops.metrics import detection_summary
from training.experiment.context import ExperimentContext
from training.experiment.images import unit_hwc
from training.experiment.stages.stage1 import uses_lord
from training.pipeline import Stage


def stages(ctx: ExperimentContext, variants=()) -> list[Stage]:
    """LoRD Detect on the clean and protected images: when there is a LoRD (a method uses it, or
    ``[stage1] lord`` names a file) and clean images to compare."""
    if not ctx.clean or not (uses_lord(variants) or ctx.exp.stage1_lord is not None):
        return []
    exp = ctx.exp
    key = {**ctx.base_key(), "lord": ctx.lord_key(), "clean": ctx.image_key(ctx.clean),
           "protected": ctx.protected_key(), "timestep": exp.detection_timestep,
           "seed": exp.detection_seed, "prompt": exp.class_text}
    return [Stage("detect", key, lambda folder: run(ctx, folder), needs=ctx.lord_needs() + ctx.protected_needs(),
                  describe="LoRD Detect scores, clean vs protected")]


def run(ctx: ExperimentContext, folder: Path) -> dict:
    exp = ctx.exp
    model, clip, vae = ctx.rt.models()
    lord_model = ctx.lord_model(model)
    cond = ctx.rt.encode(exp.class_text)
    prot = ctx.protected()
    scores = {"clean": [], "protected": []}
    for n in ctx.names:
        for label, images in (("clean", ctx.clean), ("protected", prot)):
            found = detect(lord_model, vae, unit_hwc(images[n])[None], cond, exp.detection_timestep, exp.detection_seed)
            scores[label].append(round(float(found.scores[0]), 6))
    return {"names": ctx.names, "scores_clean": scores["clean"], "scores_protected": scores["protected"],
            "summary": detection_summary(scores["clean"], scores["protected"]),
            "timestep": exp.detection_timestep, "prompt": exp.class_text}
