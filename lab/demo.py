"""The demo on the lab model: ``python -m lab.demo --out demo_output`` (``make demo``).

1. assembles the lab model (``lab/weights/``: a small SD1.x-family model trained here on
   Fashion-MNIST without the class "bag"; see ``lab/MODEL_CARD.md``) into a checkpoint that ComfyUI's
   stock loader reads as SD15,
2. runs the evaluation (``training.experiment`` with ``lab/experiment.py``'s config): 8 held-out bags
   are protected with Anti-DreamBooth's ASPL loop at 32 pixel levels (``lab.experiment.ATTACK``: at the
   published budgets nothing degrades this model, see RESULTS.md), Stage 1 learns a LoRD on 9 other
   classes, Stage 2 trains a LoRA per method (Clean / Attacking / PGD-2 defense / JPEG /
   DiffPure-style / LoRD / LoRD on the clean images), each samples
   "a photo of sks bag", and the lab classifier scores them (FD / KD vs 120 real bags, subject
   accuracy); the gate's ROC on clean vs protected bags; the Table-I-style table is printed,
3. starts the pinned real ComfyUI with this pack and runs every shipped workflow on the lab model
   through its HTTP API (training workflows with fewer steps): the images in ``demo_output/images``
   are garments and bags, not noise.

``--scale`` picks step 2's config (``ci``: a few minutes, for CI; ``demo``: RESULTS.md).
``--lab textures`` runs all of it on lab model 2 (64 px ufoai textures, subject "wood"; lab/MODEL_CARD_2.md)
with the threat the evidence established there: mist-v2 at its published 4 levels, Stage 1 on ACE-4 copies
(EVIDENCE.md, "textures" and "textures_defense"); much slower than lab model 1 (README).
``--skip-evaluation`` leaves out step 2 (the workflows then train Stage 2 on the clean bags) and
``--stage1-per-class N`` gives the Stage-1 workflow only the first N images of each class and
``--node-steps N`` sets the steps of the sampler and Protect nodes: with ``--stage1-steps 2
--stage2-steps 2`` too, every shipped workflow runs in well under a minute on a CPU (the GPU
check's ``--dry-run``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lab.experiment import LABS, LabModel
from lord_ops.comfy.bootstrap import REPO_ROOT, ensure_comfyui_importable
from tools.comfy_server import ComfyServer
from tools.example_inputs import INSTANCE_FOLDER, LORA_NAME, LORD_NAME, TRAIN_FOLDER
from tools.workflow_api import is_training_workflow, load_workflow, ui_to_api


def trained_file_facts(base: Path) -> dict:
    """What the trained LoRD and LoRA files say about themselves (their provenance metadata)."""
    from safetensors import safe_open

    facts = {}
    for key, path in (("lord", base / "models" / "lord" / LORD_NAME), ("lora", base / "models" / "loras" / LORA_NAME)):
        if not path.is_file():
            facts[key] = {"file": str(path), "missing": True}
            continue
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        prov = json.loads(meta.get("provenance" if key == "lord" else "lord_provenance", "{}") or "{}")
        facts[key] = {"file": str(path), "stage": prov.get("stage"), "steps_trained": prov.get("steps_trained"),
                      "final_loss": prov.get("final_loss"), "dataset": prov.get("dataset")}
        if key == "lord":
            facts[key]["gate_separation_train"] = prov.get("gate_separation_train")
        else:
            facts[key].update(mode=meta.get("lord_stage2_mode"), lord_live=prov.get("lord_live"))
    return facts


def collect_outputs(entry: dict, base: Path, dest: Path, stem: str, temp: bool = False) -> tuple[list[str], list[dict]]:
    """Copy the images a prompt saved (and with ``temp`` its previews, e.g. loss graphs) from the
    ComfyUI base folder ``base`` into ``dest``; return (copied paths, text outputs)."""
    copied, texts = [], []
    kinds = ("output", "temp") if temp else ("output",)
    for node_id, out in sorted(entry.get("outputs", {}).items()):
        for img in out.get("images", []):
            if img.get("type") not in kinds:
                continue
            src = base / img["type"] / img.get("subfolder", "") / img["filename"]
            target = dest / f"{stem}_{node_id}_{img['filename']}"
            shutil.copy(src, target)
            copied.append(str(target))
        for text in out.get("text", []):
            try:
                texts.append(json.loads(text))
            except (TypeError, ValueError):
                texts.append({"text": text})
    return copied, texts


def lab_inputs(input_dir: Path, protected_dir: Path | None, stage1_per_class: int | None = None,
               lab: LabModel = LABS["fashion"]) -> dict:
    """The inputs the shipped workflows read, from the lab model's data (``lab.data``): ``input/lord_train``
    (Stage-1 images with captions; with ``stage1_per_class`` only the first that many of each class),
    ``input/lord_sks`` (the subject's Stage-2 images: the protected ones when given, else the clean ones),
    ``input/protect_me`` (2 clean subject images) and ``input/example.png`` (a protected subject image, else a
    clean one, for detection)."""
    data = lab.data
    input_dir = Path(input_dir)
    for sub in (TRAIN_FOLDER, INSTANCE_FOLDER, "protect_me"):
        shutil.rmtree(input_dir / sub, ignore_errors=True)
    if stage1_per_class:  # the files are <class>_<index>.png with a same-name .txt caption
        (input_dir / TRAIN_FOLDER).mkdir(parents=True)
        for image in sorted((data / "stage1").glob("*.png")):
            if int(image.stem.rsplit("_", 1)[1]) < stage1_per_class:
                for f in (image, image.with_suffix(".txt")):
                    shutil.copy(f, input_dir / TRAIN_FOLDER / f.name)
    else:
        shutil.copytree(data / "stage1", input_dir / TRAIN_FOLDER)
    subject = protected_dir if protected_dir is not None else data / "instance"
    shutil.copytree(subject, input_dir / INSTANCE_FOLDER, ignore=shutil.ignore_patterns("*.json", "*.txt"))
    (input_dir / "protect_me").mkdir(parents=True)
    clean = sorted((data / "instance").glob("*.png"))
    for f in clean[:2]:
        shutil.copy(f, input_dir / "protect_me" / f.name)
    shutil.copy(sorted(Path(subject).glob("*.png"))[0], input_dir / "example.png")
    return {"stage1_images": len(list((input_dir / TRAIN_FOLDER).glob("*.png"))),
            "stage2_images": len(list((input_dir / INSTANCE_FOLDER).glob("*.png"))),
            "stage2_protected": protected_dir is not None}


# The Stage-2 trainer's batch and learning rate on the lab model: the evaluation's Stage 2
# (lab/experiment.py, batch 4, lr 5e-4), which learns the subject in 250 steps (EVIDENCE.md: subject
# accuracy 0.63 on clean bags). The workflow's own settings (batch 1, lr 1e-4, 800 steps, for SD1.5 at
# 512 px) learn nothing recognisable in the demo's step budget: it generated garments, not bags.
LAB_STAGE2 = {"batch_size": 4, "learning_rate": 5e-4}
DEMO_STAGE2_STEPS = 250


def lab_prompt(text: str, lab: LabModel) -> str:
    """A shipped workflow's positive prompt in the lab model's words: its subject instead of "person"
    ("a photo of sks person" -> "a photo of sks bag"; lab model 2's captions have no article: "a photo of
    a person" -> "a photo of wood")."""
    if lab.name != "fashion":
        text = text.replace("of a person", "of person")
    return text.replace("person", lab.subject)


def for_lab_model(prompt: dict, checkpoint_name: str, steps: dict, batch: int = 8,
                  node_steps: int | None = None, lab: LabModel = LABS["fashion"]) -> dict:
    """Adapt an API-format prompt of a shipped workflow to the lab model ``lab`` (in place; returned): its
    checkpoint, latents of its resolution (32x32 px on lab model 1, 64x64 on lab model 2; ``batch`` images),
    its subject in the prompts (:func:`lab_prompt`), an empty negative prompt (a lab text encoder knows only
    its few tokens), CFG 4, the Stage-2 trainer's batch and learning rate (:data:`LAB_STAGE2`) and the trainer
    ``steps`` (class_type -> steps); with ``node_steps`` also the steps of the KSampler and LoRD Protect
    nodes. Nothing else changes."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint_name
        elif kind == "EmptyLatentImage":
            inputs.update(width=lab.resolution, height=lab.resolution, batch_size=batch)
        elif kind == "CLIPTextEncode" and isinstance(inputs.get("text"), str):
            text = inputs["text"]
            inputs["text"] = lab_prompt(text, lab) if "photo" in text else ""
        elif kind == "KSampler":
            inputs["cfg"] = 4.0
        elif kind == "LoRDTrainStage2":
            inputs.update(LAB_STAGE2)
        if kind in steps:
            inputs["steps"] = steps[kind]
        elif kind in ("KSampler", "LoRDProtect") and node_steps:
            inputs["steps"] = node_steps
    return prompt


def subject_check(paths, lab: LabModel = LABS["fashion"]) -> dict:
    """How many of the images at ``paths`` the lab model's classifier calls its subject ("bag", "wood"), and
    what it calls the others: ``{"images", "subject", "share", "predicted": {class: count}}``."""
    import numpy as np
    import torch
    from PIL import Image

    from lord_ops.metric_models import load_feature_extractor

    judge = load_feature_extractor("lab-classifier", lab.classifier)
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
    names = [judge.classes[int(i)] for i in judge.predict(images)]
    subject = sum(n == lab.subject for n in names)
    return {"images": len(names), "subject": subject, "share": subject / len(names),
            "predicted": {n: names.count(n) for n in sorted(set(names))}}


def lab_threat(lab: LabModel) -> dict:
    """The evaluation's attack and Stage-1 data on ``lab`` (``write_config``'s ``attack`` and ``overrides``):
    lab model 1 keeps lab/experiment.py's defaults (ASPL at 32 levels, Stage 1 on PGD-2 copies); on lab model 2
    the threat the evidence established, mist-v2 at its published 4 levels, and Stage 1 on ACE copies matched to
    it (lab.declared's "textures" and "textures_defense")."""
    if lab.name == "fashion":
        return {}
    from lab.declared import MIST_4, STAGE1_ACE_4

    return {"attack": dict(MIST_4.attack), "overrides": {"stage1_data": dict(STAGE1_ACE_4)}}


def run_lab_experiment(root: Path, checkpoint: Path, scale: str, seed: int = 0,
                       lab: LabModel = LABS["fashion"]) -> tuple[int, Path]:
    """``training.experiment`` on the lab model ``lab`` at ``scale`` with experiment ``seed`` (Stage-1 and
    Stage-2 training; the attack and the sampling noise keep their own seeds; the attack and Stage-1 data of
    :func:`lab_threat`); returns (exit code, output folder)."""
    from lab.experiment import write_config
    from training import experiment

    config = write_config(root, checkpoint, lab.classifier, scale, seed=seed, lab=lab, **lab_threat(lab))
    return experiment.main(["--config", str(config)]), root / "run"


def protected_images(run: Path) -> Path | None:
    """The folder of the protected instance images the experiment wrote (None when absent)."""
    folder = run / "stages" / "protect" / "images"
    return folder if folder.is_dir() and any(folder.glob("*.png")) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_output", help="output folder (created)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the pinned copy)")
    ap.add_argument("--lab", default="fashion", choices=sorted(LABS),
                    help="which lab model: fashion (lab model 1, 32 px, what make demo runs) or textures (lab model 2, "
                         "64 px, mist-v2 at 4 levels; hours on 2 CPU cores at the demo scale)")
    ap.add_argument("--scale", default="demo", choices=["ci", "demo", "demo-stage1-pgd32"],
                    help="the evaluation's config (lab/experiment.py): ci (a few minutes), demo (default; RESULTS.md), "
                         "demo-stage1-pgd32 (RESULTS.md's ablation)")
    ap.add_argument("--seed", type=int, default=0, help="the evaluation's training seed (RESULTS.md: 0 and 1)")
    ap.add_argument("--skip-workflows", action="store_true", help="only the evaluation, not the shipped workflows")
    ap.add_argument("--skip-evaluation", action="store_true",
                    help="only the shipped workflows, not the evaluation (Stage 2 then trains on the clean bags)")
    ap.add_argument("--stage1-per-class", type=int, default=None, metavar="N",
                    help="the Stage-1 workflow's images: the first N of each pre-training class (default all 8)")
    ap.add_argument("--stage1-steps", type=int, default=60,
                    help="steps of the Stage-1 workflow's trainer (shipped: 1000)")
    ap.add_argument("--stage2-steps", type=int, default=DEMO_STAGE2_STEPS,
                    help="steps of the Stage-2 workflow's trainer (shipped: 800 at batch 1, lr 1e-4; on the lab "
                         f"model batch {LAB_STAGE2['batch_size']}, lr {LAB_STAGE2['learning_rate']:g})")
    ap.add_argument("--node-steps", type=int, default=None, metavar="N",
                    help="steps of the KSampler and LoRD Protect nodes (default: as shipped, 20 and 30)")
    args = ap.parse_args(argv)
    if args.skip_evaluation and args.skip_workflows:
        ap.error("--skip-evaluation and --skip-workflows leave nothing to run")
    if args.lab != "fashion" and args.scale == "demo-stage1-pgd32":
        ap.error(f"--scale demo-stage1-pgd32 is lab model 1's ablation; on --lab {args.lab} Stage 1 trains on ACE copies "
                 "matched to the threat: use --scale demo or ci")

    comfy_root = ensure_comfyui_importable(args.comfyui, cpu=True)
    from lab.ship import ensure_checkpoint

    out = Path(args.out).resolve()
    base = out / "comfyui_base"
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lab = LABS[args.lab]
    checkpoint = ensure_checkpoint(base / "models" / "checkpoints" / lab.checkpoint_name, lab.parts)
    print(f"[demo] lab model {checkpoint} ready in {time.time() - t0:.1f} s")
    summary = {"note": f"{lab.about}; its numbers are about this model, not about Stable Diffusion.", "lab": lab.name,
               "comfyui": str(comfy_root), "checkpoint": str(checkpoint), "scale": args.scale, "workflows": {}}
    run = None
    if args.skip_evaluation:
        summary["experiment"] = {"skipped": "--skip-evaluation"}
    else:
        t = time.time()
        code, run = run_lab_experiment(out / "experiment", checkpoint, args.scale, args.seed, lab)
        summary["experiment"] = {"exit_code": code, "seconds": round(time.time() - t, 1), "output": str(run),
                                 "report": str(run / "report" / "index.html")}
        if code != 0:
            print(f"[demo] the evaluation failed (exit code {code}); see the messages above")
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            return code
        table = run / "report" / "table1.md"
        print("\n" + table.read_text(encoding="utf-8"))
        print(f"[demo] evaluation done in {time.time() - t:.0f} s; report: {run / 'report' / 'index.html'}")
    ok = True
    if not args.skip_workflows:
        for sub in ("lord", "loras"):  # never let a file from an earlier run stand in for a failed training
            (base / "models" / sub).mkdir(parents=True, exist_ok=True)
            (base / "models" / sub / (LORD_NAME if sub == "lord" else LORA_NAME)).unlink(missing_ok=True)
        summary["workflow_inputs"] = lab_inputs(base / "input", protected_images(run) if run else None,
                                                args.stage1_per_class, lab)
        shutil.rmtree(base / "output" / "lord_training", ignore_errors=True)  # train from scratch, no resume
        workflows = sorted((REPO_ROOT / "workflows").glob("*.json"))
        training = [wf for wf in workflows if is_training_workflow(load_workflow(wf))]  # stage1 before stage2
        steps = {"LoRDTrainStage1": args.stage1_steps, "LoRDTrainStage2": args.stage2_steps}
        with ComfyServer(base, comfyui=comfy_root) as server:
            info = server.object_info()
            for wf in training + [wf for wf in workflows if wf not in training]:
                t = time.time()
                prompt = for_lab_model(ui_to_api(load_workflow(wf), info), lab.checkpoint_name, steps,
                                       node_steps=args.node_steps, lab=lab)
                entry = server.run_prompt(prompt, timeout=3600)
                status = entry["status"]["status_str"]
                copied, texts = collect_outputs(entry, base, images, wf.stem, temp=wf in training)
                record = {"status": status, "seconds": round(time.time() - t, 2), "images": copied, "reports": texts}
                summary["workflows"][wf.name] = record
                print(f"[demo] workflow {wf.name}: {status} in {time.time() - t:.1f} s, {len(copied)} image(s)")
                if status != "success":
                    record["messages"] = entry["status"].get("messages")
                    ok = False
                    if wf in training:  # the other workflows need the trained files
                        print(f"[demo] training failed; not running the other workflows. See {server.log_path}")
                        break
        summary["trained_by_workflows"] = trained_file_facts(base)
        generated = (summary["workflows"].get("lord_defended_generation.json") or {}).get("images")
        if generated:
            summary["defended_generation_subject"] = subject_check(generated, lab)
            check = summary["defended_generation_subject"]
            print(f"[demo] defended generation: the lab classifier calls {check['subject']} of {check['images']} "
                  f"images the subject, {lab.subject!r} ({check['share']:.0%}; predicted {check['predicted']})")
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = f"report {run / 'report' / 'index.html'}, " if run else ""
    print(f"[demo] {'done' if ok else 'FAILED'} in {time.time() - t0:.0f} s: {report}"
          f"workflow images in {images}, {out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
