"""Stages ``train/<variant>``: a Stage-2 DreamBooth-LoRA of one method (``plain``, ``pgd2_defense``, or
``lord``: with the LoRD live) on its training image set."""
from __future__ import annotations

from pathlib import Path

from lord_ops.comfy.data import TrainingData
from lord_ops.comfy.kohya import kohya_metadata
from lord_ops.comfy.patch import model_family
from lord_ops.comfy.stages import train_stage2
from lord_ops.format import save_kohya_lora
from training.experiment_config import train_config
from training.experiment.context import ExperimentContext
from training.experiment.images import load_set
from training.experiment.methods import Variant, image_set, set_key, set_needs
from training.pipeline import Stage


def stage(ctx: ExperimentContext, v: Variant) -> Stage:
    exp = ctx.exp
    key = {**ctx.base_key(), "images": set_key(ctx, v.images), "prompt": exp.prompt, "class_images": ctx.class_key(),
           "config": train_config(exp, "stage2", v.stage2_mode).stage_key(), "lord": ctx.lord_key(v.lord) if v.lord else None}
    if v.gates[0] != "learned":
        key["gate"] = v.gates[0]
    return Stage(f"train/{v.train_id}", key, lambda folder: run(ctx, folder, v),
                 needs=set_needs(ctx, v.images) + (ctx.lord_needs(v.lord) if v.lord else ()),
                 describe=f"Stage-2 LoRA, mode {v.mode}, on the {v.images} images"
                          + (f", LoRD gate {v.gates[0]}" if v.gates[0] != "learned" else ""))


def run(ctx: ExperimentContext, folder: Path, v: Variant) -> dict:
    exp = ctx.exp
    config = train_config(exp, "stage2", v.stage2_mode)
    images = image_set(ctx, v.images)
    model, clip, vae = ctx.rt.models()
    if v.lord:
        model = ctx.lord_model(model, v.lord, gate_mode=v.gates[0])
    cond = ctx.rt.encode(exp.prompt)
    class_images, class_conds = [], []
    if exp.class_images is not None:
        class_images = list(load_set(exp.class_images, exp.resolution).values())
        class_conds = [ctx.rt.encode(exp.class_text)] * len(class_images)
    names = ctx.names
    data = TrainingData([images[n] for n in names], [cond] * len(names), [exp.prompt] * len(names),
                        class_images, class_conds)
    result = train_stage2(model, vae, data, config, folder / "pgd_cache", folder / "checkpoint.pt",
                          on_step=ctx.on_step(f"train {v.train_id}"))
    save_kohya_lora(folder / "lora.safetensors", result.lora, kohya_metadata(config, model_family(model), result.report))
    return {"lora": "lora.safetensors", "mode": v.mode, "images": v.images, "steps": config.steps,
            "final_loss": result.report["final"]["loss"]}
