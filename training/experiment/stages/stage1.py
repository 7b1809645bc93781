"""Stage ``stage1``: a LoRD trained on the Stage-1 data set (``[stage1] data``, images with captions)
and its perturbed copies; skipped when ``[stage1] lord`` gives a trained one. Stage
``stage1_onebranch`` (when a method uses it): the paper's one-branch control, the same training with
the gate forced to 0 and no B' (``TrainConfig.defense_branch = False``): a plain LoRA pre-trained on
the same clean + perturbed copies, so that "LoRD defends" can be told apart from "a Stage-1 adapter is
extra pre-training"."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lord_ops.comfy.data import TrainingData
from lord_ops.comfy.stages import train_stage1
from lord_ops.datasets import image_files, load_caption_folder
from lord_ops.format import save_lord_file
from training.experiment_config import train_config
from training.experiment.context import ExperimentContext
from training.pipeline import Stage


def stages(ctx: ExperimentContext, variants=()) -> list[Stage]:
    out = []
    # Stage 1 runs when a method uses the LoRD or the attacker knows it ([attack] defense_aware); a plain-only
    # config, e.g. a threat arm, skips it and Detect
    if ctx.exp.stage1_lord is None and (uses_lord(variants) or ctx.exp.attack_defense_aware):
        key = {**ctx.base_key(), "data": data_key(ctx), "config": config_of(ctx, "stage1").stage_key()}
        out.append(Stage("stage1", key, lambda folder: run(ctx, folder, "stage1"), describe="train the LoRD (Stage 1)"))
    if any(v.lord == "stage1_onebranch" for v in variants):
        key = {**ctx.base_key(), "data": data_key(ctx), "config": config_of(ctx, "stage1_onebranch").stage_key()}
        out.append(Stage("stage1_onebranch", key, lambda folder: run(ctx, folder, "stage1_onebranch"),
                         describe="train the one-branch control (Stage 1 without gate and B')"))
    return out


def uses_lord(variants) -> bool:
    """Whether one of the Stage-2 runs has the Stage-1 LoRD live (``lord`` and ``lord_g<t><s>`` modes)."""
    return any(v.lord == "stage1" for v in variants)


def config_of(ctx: ExperimentContext, which: str):
    """The Stage-1 TrainConfig of ``which`` (``stage1`` or ``stage1_onebranch``)."""
    config = train_config(ctx.exp, "stage1")
    return dataclasses.replace(config, defense_branch=False) if which == "stage1_onebranch" else config


def data_key(ctx: ExperimentContext) -> dict:
    files = image_files(ctx.exp.stage1_data)
    caps = [f.with_suffix(".txt") for f in files]
    return {"files": {f.name: ctx.digests(f) for f in files},
            "captions": {c.name: ctx.digests(c) for c in caps if c.is_file()}, "caption": ctx.exp.stage1_caption}


def run(ctx: ExperimentContext, folder: Path, which: str = "stage1") -> dict:
    exp = ctx.exp
    config = config_of(ctx, which)
    items = load_caption_folder(exp.stage1_data, exp.resolution, exp.stage1_caption)
    model, clip, vae = ctx.rt.models()
    data = TrainingData([it.image for it in items], [ctx.rt.encode(it.caption) for it in items],
                        [it.caption for it in items])
    # one cache of perturbed copies for the LoRD and the one-branch control (the same images, attack and
    # per-image seeds; entries are keyed by content): the control does not attack the Stage-1 set again
    cache = folder.parent / "stage1" / "pgd_cache"
    result = train_stage1(model, vae, data, config, cache, folder / "checkpoint.pt",
                          on_step=ctx.on_step(which))
    save_lord_file(folder / "lord.safetensors", result.lord)
    report = {k: v for k, v in result.report.items() if k != "final"}
    return {"lord": "lord.safetensors", "images": len(items), "steps": config.steps,
            "final_loss": result.report["final"]["loss"], **report}
