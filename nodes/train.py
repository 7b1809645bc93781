"""Trainer nodes: LoRD Stage-1 (Eq. 7-8), Stage-2 DreamBooth-LoRA (Eq. 9) and their save nodes.

Inputs follow core's Train LoRA node: lists of IMAGE batches and CONDITIONINGs (e.g. from
Load Image and Text Dataset from Folder -> CLIP Text Encode). Runs are checkpointed under
``output/lord_training/<run_name>/``; running the same graph again resumes from the last checkpoint
(Cancel keeps it). Stage-1 perturbations are cached (float32, lossless) in
``output/lord_training/pgd_cache/``, bounded to ``datasets.DEFAULT_CACHE_MAX_BYTES`` (least recently
used entries of other runs are deleted first).
"""
from __future__ import annotations

import json
import os

from comfy_api.latest import io

from ..lord_ops.keys import TARGET_PRESETS
from ..lord_ops.train_config import DTYPES, STAGE1_DATA_PRESETS, STAGE2_MODES, TrainConfig, field_help

LORD_WEIGHTS = io.Custom("LORD_WEIGHTS")
LORD_LORA = io.Custom("LORD_LORA")
LOSS_MAP = io.Custom("LOSS_MAP")
# trainer widgets named differently from the TrainConfig field they set (the others share the name)
WIDGET_FIELDS = {"training_dtype": "dtype", "perturbations": "attack_preset", "attack_strength": "attack_epsilon"}
_UNSET_AT_0 = "0 here = unset."


def config_tip(widget: str, note: str = "") -> str:
    """A trainer widget's tooltip: the help text of the TrainConfig field it sets (one source,
    ``lord_ops.train_config``), then what is particular to the node."""
    return field_help(WIDGET_FIELDS.get(widget, widget)) + (f" {note}" if note else "")


def _data_inputs(model_tip: str, images_tip: str, positive_tip: str) -> list:
    return [io.Model.Input("model", tooltip=model_tip),
            io.Vae.Input("vae", tooltip="The VAE of that model; encodes the images (and their perturbed copies) to latents."),
            io.Image.Input("images", tooltip=images_tip), io.Conditioning.Input("positive", tooltip=positive_tip)]


def _common_inputs(default_steps: int, default_lr: float, run_name: str) -> list:
    return [
        io.Int.Input("steps", default=default_steps, min=1, max=1000000, tooltip=config_tip("steps")),
        io.Int.Input("batch_size", default=1, min=1, max=1024, tooltip=config_tip("batch_size")),
        io.Int.Input("grad_accumulation", default=1, min=1, max=1024, tooltip=config_tip("grad_accumulation")),
        io.Float.Input("learning_rate", default=default_lr, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                       tooltip=config_tip("learning_rate", f"Weight decay here: {TrainConfig.weight_decay}.")),
        io.Int.Input("rank", default=4, min=1, max=128,
                     tooltip=config_tip("rank", "alpha = r here (scale 1).")),
        io.Combo.Input("targets", options=sorted(TARGET_PRESETS), default="attn", tooltip=config_tip("targets")),
        io.Combo.Input("training_dtype", options=list(DTYPES), default="fp32", tooltip=config_tip("training_dtype")),
        io.Boolean.Input("gradient_checkpointing", default=False, tooltip=config_tip("gradient_checkpointing")),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip=config_tip("seed", "Fixed: the frontend never changes it after a run, so queueing "
                                                "again resumes the same run instead of starting a different one.")),
        io.Int.Input("checkpoint_every", default=100, min=1, max=1000000,
                     tooltip=config_tip("checkpoint_every", "Written to output/lord_training/<run_name>/.")),
        io.String.Input("run_name", default=run_name,
                        tooltip="Checkpoint folder name; running again with the same name and settings resumes."),
    ]


def _preview_input(stage: str, prompt: str) -> io.Int.Input:
    """The ``preview_every`` widget (last input, so saved workflows keep their widget order)."""
    from ..lord_ops.comfy.preview import MEASURED_COST_STEPS, PREVIEW_SAMPLING as S

    return io.Int.Input(
        "preview_every", default=0, min=0, max=1000000, optional=True,
        tooltip=f"Every N steps, sample one image for {prompt} with the adapter being trained live and show "
                f"it beside the loss curve in the node's progress preview (training resolution, seed = the "
                f"run's seed, {S['sampler']}/{S['scheduler']} {S['steps']} steps, cfg {S['cfg']} against a "
                f"zeroed-out negative). The trained weights are the same with or without previews. 0 = off. "
                f"Each preview costs about {MEASURED_COST_STEPS[stage]} training steps (measured on the CPU "
                f"with the pack's small test checkpoint; it depends on your model, resolution and batch size).")


def widget_scalars(kwargs: dict) -> dict:
    """``is_input_list`` nodes get every widget as a list: take the first value."""
    return {k: (v[0] if isinstance(v, list) and v else v) for k, v in kwargs.items()}


def train_config(stage: str, p: dict, **extra) -> TrainConfig:
    """The trainers' common widgets (``widget_scalars`` of the inputs) as a validated TrainConfig."""
    return TrainConfig(stage=stage, steps=p["steps"], batch_size=p["batch_size"], grad_accumulation=p["grad_accumulation"],
                       learning_rate=p["learning_rate"], rank=p["rank"], targets=p["targets"], dtype=p["training_dtype"],
                       gradient_checkpointing=p["gradient_checkpointing"], seed=p["seed"] % (2 ** 63),
                       checkpoint_every=p["checkpoint_every"], **extra).validate()


class LoRDTrainStage1(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDTrainStage1",
            display_name="Train LoRD (Stage 1)",
            category="LoRD/training",
            description="Adversarial training of a LoRD (paper Eq. 7-8): clean + perturbed copies of the "
                        "images (the 'perturbations' preset; default the paper's PGD-2), loss L_clean + lambda_adv "
                        "L_adv + lambda_gate BCE(gate). Only A, B, B' and the gate train; the model is frozen. "
                        "Perturbations are generated once and cached losslessly. Optional held-out images give "
                        "the gate's AUROC on protections of images it never saw.",
            is_input_list=True,
            inputs=[
                *_data_inputs("The base model (without LoRD).", "Training images (one size; a list or a batch).",
                              "One conditioning per image (captions), or one for all."),
                *_common_inputs(500, 1e-4, "lord_stage1"),
                io.Int.Input("gate_hidden", default=32, min=1, max=1024, tooltip=config_tip("gate_hidden")),
                io.Float.Input("lambda_adv", default=1.0, min=0.0, max=100.0, step=0.01, tooltip=config_tip("lambda_adv")),
                io.Float.Input("lambda_gate", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip=config_tip("lambda_gate")),
                io.Float.Input("attack_strength", default=0.0, min=0.0, max=64.0, step=0.5, round=0.0001,
                               tooltip=config_tip("attack_strength", _UNSET_AT_0)),
                io.Float.Input("attack_step_size", default=0.0, min=0.0, max=16.0, step=0.05, round=0.0001,
                               tooltip=config_tip("attack_step_size", _UNSET_AT_0)),
                io.Int.Input("attack_steps", default=0, min=0, max=1000, tooltip=config_tip("attack_steps", _UNSET_AT_0)),
                io.Boolean.Input("online_perturbations", default=False, tooltip=config_tip("online_perturbations")),
                io.Combo.Input("perturbations", options=list(STAGE1_DATA_PRESETS), default="pgd_2",
                               tooltip=config_tip("perturbations")),
                io.Int.Input("heldout_attack_steps", default=0, min=0, max=1000,
                             tooltip="Held-out evaluation: iterations of each protection (0 = the presets': ACE 150, "
                                     "PGD 50). Only used with heldout_images."),
                io.Image.Input("heldout_images", optional=True,
                               tooltip="Images NOT in the training set (training size). They are protected with "
                                       "mist-v2's ACE and Anti-DreamBooth's PGD (8-bit rounded) and the gate's AUROC "
                                       "vs their clean versions goes into the report and the file's provenance."),
                io.Conditioning.Input("heldout_positive", optional=True,
                                      tooltip="Captions of the held-out images (one per image or one for all); "
                                              "default: the first training conditioning."),
                _preview_input("stage1", "the first caption (the first positive conditioning)"),
                # added after preview_every (saved workflows keep their widget order)
                io.Int.Input("attack_rounds", default=0, min=0, max=1000, optional=True,
                             tooltip=config_tip("attack_rounds", _UNSET_AT_0)),
            ],
            outputs=[
                LORD_WEIGHTS.Output(display_name="lord", tooltip="The trained LoRD (save it with Save LoRD)."),
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRD applied."),
                LOSS_MAP.Output(display_name="loss_map", tooltip="Loss per step (core's Plot Loss Graph)."),
                io.String.Output(display_name="report", tooltip="JSON: final losses, gate AUROC on the training pairs "
                                                                "(in-sample) and on held-out protected images."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, images, positive, heldout_images=None, heldout_positive=None, **kwargs):
        import comfy.model_management

        from ..lord_ops.comfy.data import TrainingData, conditionings_from_list, images_from_batches
        from ..lord_ops.comfy.files import cache_dir, training_dir
        from ..lord_ops.comfy.heldout import HeldOut
        from ..lord_ops.comfy.patch import apply_lord
        from ..lord_ops.comfy.progress import TrainingProgress
        from ..lord_ops.comfy.stages import train_stage1

        p = widget_scalars(kwargs)
        config = train_config("stage1", p, gate_hidden=p["gate_hidden"], lambda_adv=p["lambda_adv"],
                              lambda_gate=p["lambda_gate"], attack_preset=p.get("perturbations", "pgd_2"),
                              attack_epsilon=p["attack_strength"] or None,
                              attack_step_size=p["attack_step_size"] or None,
                              attack_steps=p["attack_steps"] or None, online_perturbations=p["online_perturbations"],
                              attack_rounds=p.get("attack_rounds") or None)
        imgs = images_from_batches(images)
        data = TrainingData(imgs, conditionings_from_list(positive), [f"image {i}" for i in range(len(imgs))])
        heldout = None
        if heldout_images:
            held = images_from_batches(heldout_images)
            conds = conditionings_from_list(heldout_positive) if heldout_positive else data.conds[:1]
            heldout = HeldOut(held, conds, attack_steps=p.get("heldout_attack_steps") or None)
        progress = TrainingProgress(config.steps, "LoRD Stage-1", 0 if config.online_perturbations else len(data))
        run_dir = training_dir(p["run_name"])
        out = train_stage1(model[0], vae[0], data, config, cache_dir(), os.path.join(run_dir, "checkpoint.pt"),
                           on_step=progress.step, on_data=progress.data_item, heldout=heldout,
                           check=comfy.model_management.throw_exception_if_processing_interrupted,
                           preview_every=p.get("preview_every") or 0, on_preview=progress.sample)
        trained = apply_lord(model[0], out.lord)
        return io.NodeOutput(out.lord, trained, out.result.loss_map, json.dumps(out.report, indent=1))


class LoRDTrainStage2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDTrainStage2",
            display_name="Train LoRA with LoRD (Stage 2)",
            category="LoRD/training",
            description="DreamBooth-style LoRA fine-tuning (paper Eq. 9). mode lord: the MODEL must come from "
                        "Load LoRD; the LoRD stays frozen and live. mode plain: a plain LoRA (what an attacked user "
                        "gets). mode pgd2_defense: a plain LoRA on the images plus PGD-2 perturbed copies.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="mode lord: the MODEL from Load LoRD; otherwise the base model."),
                io.Conditioning.Input("positive", tooltip="Instance prompt, e.g. 'a photo of sks person' (one for all, "
                                                          "or one per image)."),
                io.Combo.Input("mode", options=list(STAGE2_MODES), default="lord",
                               tooltip=config_tip("mode", "lord needs the MODEL from Load LoRD.")),
                *_common_inputs(400, 1e-4, "lord_stage2"),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip=config_tip("prior_weight", "Connect class_images and class_positive.")),
                io.Vae.Input("vae", optional=True, tooltip="Needed with images (not with latents)."),
                io.Image.Input("images", optional=True, tooltip="Few-shot instance images (possibly protected/attacked)."),
                io.Latent.Input("latents", optional=True, tooltip="Or: the instance images as LATENTs (e.g. from VAE Encode); "
                                                                 "not for mode pgd2_defense."),
                io.Image.Input("class_images", optional=True, tooltip="DreamBooth prior-preservation images."),
                io.Conditioning.Input("class_positive", optional=True, tooltip="Class prompt, e.g. 'a photo of a person'."),
                _preview_input("stage2", "the instance prompt (the first positive conditioning)"),
            ],
            outputs=[
                LORD_LORA.Output(display_name="lora", tooltip="The trained LoRA (save it with Save LoRA (kohya))."),
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                LOSS_MAP.Output(display_name="loss_map", tooltip="Loss per step (core's Plot Loss Graph)."),
                io.String.Output(display_name="report", tooltip="JSON: final losses and the run's provenance."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, vae=None, images=None, latents=None, class_images=None, class_positive=None,
                **kwargs):
        import comfy.model_management

        from ..lord_ops.comfy.data import TrainingData, conditionings_from_list, images_from_batches
        from ..lord_ops.comfy.files import cache_dir, training_dir
        from ..lord_ops.comfy.kohya import apply_lora_layers, kohya_metadata
        from ..lord_ops.comfy.patch import model_family
        from ..lord_ops.comfy.progress import TrainingProgress
        from ..lord_ops.comfy.stages import train_stage2

        p = widget_scalars(kwargs)
        config = train_config("stage2", p, mode=p["mode"], prior_weight=p["prior_weight"])
        if bool(images) == bool(latents):
            raise ValueError("connect either images or latents (the instance images), not both and not neither")
        imgs = images_from_batches(images) if images else []
        lats = [z for batch in (latents or []) for z in batch["samples"].float().cpu()]
        class_imgs = images_from_batches(class_images) if class_images else []
        class_conds = conditionings_from_list(class_positive) if class_positive else []
        if class_imgs and not class_conds:
            raise ValueError("class_images are connected but class_positive is not: connect the class prompt's conditioning")
        data = TrainingData(imgs, conditionings_from_list(positive), [], class_imgs, class_conds, lats)
        progress = TrainingProgress(config.steps, "LoRD Stage-2", len(imgs) if config.mode == "pgd2_defense" else 0)
        run_dir = training_dir(p["run_name"])
        out = train_stage2(model[0], vae[0] if vae else None, data, config, cache_dir(),
                           os.path.join(run_dir, "checkpoint.pt"),
                           on_step=progress.step, on_data=progress.data_item,
                           preview_every=p.get("preview_every") or 0, on_preview=progress.sample,
                           check=comfy.model_management.throw_exception_if_processing_interrupted)
        lora = {"layers": out.lora, "metadata": kohya_metadata(config, model_family(model[0]), out.report)}
        return io.NodeOutput(lora, apply_lora_layers(model[0], out.lora), out.result.loss_map,
                             json.dumps({k: v for k, v in out.report.items() if k != "provenance"}, indent=1))


def _saved(saved: tuple[str, str]) -> io.NodeOutput:
    """The save nodes' output: the file name inside the models folder, and its path as UI text."""
    name, shown = saved
    return io.NodeOutput(name, ui={"text": [shown]})


def _save_schema(node_id: str, display_name: str, description: str, kind, input_name: str, input_tip: str,
                 prefix: str, folder: str):
    return io.Schema(
        node_id=node_id, display_name=display_name, category="LoRD/training", is_output_node=True,
        description=description + " Without overwrite an existing file is kept and a numbered name is used.",
        inputs=[kind.Input(input_name, tooltip=input_tip),
                io.String.Input("filename_prefix", default=prefix,
                                tooltip=f"File name inside models/{folder}, without .safetensors (sub-folders allowed)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name; off: keep it and write a numbered name.")],
        outputs=[io.String.Output(display_name="filename", tooltip=f"The file name inside models/{folder}.")],
    )


class LoRDSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _save_schema("LoRDSave", "Save LoRD", "Write a trained LoRD to models/lord/<prefix>.safetensors "
                            "(LoRD format v1, atomic).", LORD_WEIGHTS, "lord",
                            "The trained LoRD from Train LoRD (Stage 1).", "lord_stage1", "lord")

    @classmethod
    def execute(cls, lord, filename_prefix, overwrite):
        from ..lord_ops.comfy.files import save_into_models
        from ..lord_ops.format import save_lord_file

        return _saved(save_into_models("lord", filename_prefix, overwrite, lambda path: save_lord_file(path, lord)))


class LoRDSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _save_schema("LoRDSaveLoRA", "Save LoRA (kohya)", "Write a Stage-2 LoRA to models/loras/<prefix>."
                            "safetensors in kohya format with diffusers-derived names (loads in ComfyUI's LoraLoader, "
                            "A1111/Forge and diffusers).", LORD_LORA, "lora",
                            "The trained LoRA from Train LoRA with LoRD (Stage 2).", "lord_stage2_sks", "loras")

    @classmethod
    def execute(cls, lora, filename_prefix, overwrite):
        from ..lord_ops.comfy.files import save_into_models
        from ..lord_ops.format import save_kohya_lora

        return _saved(save_into_models("loras", filename_prefix, overwrite,
                                       lambda path: save_kohya_lora(path, lora["layers"], lora["metadata"])))
