"""Stage ``stage1``: a LoRD trained on the Stage-1 data set (``[stage1] data``, images with captions)
and its perturbed copies; skipped when ``[stage1] lord`` gives a trained one."""
from __future__ import annotations

from pathlib import Path

from lord_ops.comfy.data import TrainingData
from lord_ops.comfy.stages import train_stage1
from lord_ops.datasets import image_files, load_caption_folder
from lord_ops.format import save_lord_file
from training.experiment_config import train_config
from training.experiment.context import ExperimentContext
from training.pipeline import Stage


def stages(ctx: ExperimentContext) -> list[Stage]:
    if ctx.exp.stage1_lord is not None:
        return []
    key = {**ctx.base_key(), "data": data_key(ctx), "config": train_config(ctx.exp, "stage1").to_dict()}
    return [Stage("stage1", key, lambda folder: run(ctx, folder), describe="train the LoRD (Stage 1)")]


def data_key(ctx: ExperimentContext) -> dict:
    files = image_files(ctx.exp.stage1_data)
    caps = [f.with_suffix(".txt") for f in files]
    return {"files": {f.name: ctx.digests(f) for f in files},
            "captions": {c.name: ctx.digests(c) for c in caps if c.is_file()}, "caption": ctx.exp.stage1_caption}


def run(ctx: ExperimentContext, folder: Path) -> dict:
    exp = ctx.exp
    config = train_config(exp, "stage1")
    items = load_caption_folder(exp.stage1_data, exp.resolution, exp.stage1_caption)
    model, clip, vae = ctx.rt.models()
    data = TrainingData([it.image for it in items], [ctx.rt.encode(it.caption) for it in items],
                        [it.caption for it in items])
    result = train_stage1(model, vae, data, config, folder / "pgd_cache", folder / "checkpoint.pt",
                          on_step=ctx.on_step("stage1"))
    save_lord_file(folder / "lord.safetensors", result.lord)
    report = {k: v for k, v in result.report.items() if k != "final"}
    return {"lord": "lord.safetensors", "images": len(items), "steps": config.steps,
            "final_loss": result.report["final"]["loss"], **report}
