"""End-to-end demo on an embedded default: ``python -m training.demo --out demo_output`` (``make demo``).

1. builds a random-weight SD15-geometry checkpoint (ComfyUI's own classes, from a seed),
2. cuts tiny (64x64) training sets from ComfyUI's ``example.png``: ``input/lord_train`` (images +
   ``.txt`` captions) and ``input/lord_sks`` (instance images), plus the inputs of the other workflows,
3. starts the pinned real ComfyUI with this pack installed and, through its HTTP API, **trains**:
   ``workflows/lord_train_stage1.json`` (Train LoRD, Stage 1 -> ``models/lord/lord_sd15.safetensors``),
   then ``workflows/lord_train_stage2.json`` (Train LoRA with that LoRD live, Stage 2 ->
   ``models/loras/lord_stage2_sks.safetensors``); only the trainer nodes' ``steps`` are lowered
   (``--stage1-steps`` / ``--stage2-steps``) so that this takes a few minutes on a CPU,
4. runs every other workflow in ``workflows/`` unchanged with those trained files (defended
   generation, detection, ACE protection of the images in ``input/protect_me``),
5. writes the images, loss graphs, the gate heatmap and ``summary.json`` to the output folder.

The training is real (the same nodes, losses and checkpoints a user runs), but on a random model,
tiny images and a few hundred steps: the outputs show the pipeline working end to end, not a
useful defense of a real model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.comfy_runtime import ComfyServer, ensure_comfyui_importable  # noqa: E402

CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"  # the name the shipped workflows use
LORD_NAME = "lord_sd15.safetensors"  # what lord_train_stage1 saves and the other workflows load
LORA_NAME = "lord_stage2_sks.safetensors"  # what lord_train_stage2 saves
TRAIN_FOLDER, INSTANCE_FOLDER = "lord_train", "lord_sks"  # input subfolders the training workflows read
TRAINER_NODES = ("LoRDTrainStage1", "LoRDTrainStage2")
# (crop box in example.png's 768x768 pixels, mirrored, caption)
_TRAIN_CROPS = [((0, 0, 768, 768), False, "a drawing of a girl with yellow hair in a pink dress"),
                ((200, 100, 600, 500), False, "a drawing of a smiling face with blue eyes"),
                ((150, 250, 650, 750), True, "a drawing of a person in a pink dress on green grass"),
                ((0, 0, 500, 500), True, "a drawing of yellow hair and a blue sky with clouds")]
_INSTANCE_CROPS = [((100, 50, 700, 650), False), ((180, 80, 620, 520), True), ((60, 120, 700, 760), False)]


def prepare_models(base: Path, seed: int) -> dict:
    """Write the random checkpoint under ``base/models`` (the LoRD and LoRA are trained on the
    server later); returns facts for the summary."""
    from tools import tiny

    models = base / "models"
    for sub in ("lord", "loras"):  # never let a file from an earlier run stand in for a failed training
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / (LORD_NAME if sub == "lord" else LORA_NAME)).unlink(missing_ok=True)
    ckpt = tiny.write_sd15_geometry_checkpoint(models / "checkpoints" / CKPT_NAME, seed=seed)
    return {"checkpoint": str(ckpt), "checkpoint_note": "random weights, SD15 geometry (13.6M-param UNet, CLIP-L, TAESD)"}


def prepare_training_inputs(input_dir: Path, example: Path, size: int = 64) -> dict:
    """Small training sets cut from ``example`` for the training workflows: ``input/lord_train``
    (images + same-name ``.txt`` captions, Stage 1) and ``input/lord_sks`` (instance images,
    Stage 2), ``size`` x ``size`` pixels (tiny, so that CPU training stays quick)."""
    from PIL import Image, ImageOps

    train, sks = Path(input_dir) / TRAIN_FOLDER, Path(input_dir) / INSTANCE_FOLDER
    train.mkdir(parents=True, exist_ok=True)
    sks.mkdir(parents=True, exist_ok=True)
    with Image.open(example) as im:
        im = im.convert("RGB")

        def cut(box, mirror):
            out = im.crop(box).resize((size, size), Image.LANCZOS)
            return ImageOps.mirror(out) if mirror else out

        for i, (box, mirror, caption) in enumerate(_TRAIN_CROPS):
            cut(box, mirror).save(train / f"train_{i}.png")
            (train / f"train_{i}.txt").write_text(caption + "\n", encoding="utf-8")
        for i, (box, mirror) in enumerate(_INSTANCE_CROPS):
            cut(box, mirror).save(sks / f"sks_{i}.png")
    return {"stage1_images": len(_TRAIN_CROPS), "stage2_images": len(_INSTANCE_CROPS), "size": size}


def is_training_workflow(workflow: dict) -> bool:
    """Whether a UI-format workflow contains a trainer node (Stage 1 or Stage 2)."""
    return any(n.get("type") in TRAINER_NODES for n in workflow.get("nodes") or [])


def with_trainer_settings(prompt: dict, **values) -> dict:
    """Set widget ``values`` (e.g. ``steps=20``) on every trainer node of an API-format prompt
    (in place; returned for convenience). Raises ``ValueError`` when the prompt has none."""
    trainers = [n for n in prompt.values() if n.get("class_type") in TRAINER_NODES]
    if not trainers:
        raise ValueError("the prompt has no Train LoRD / Train LoRA with LoRD node")
    for node in trainers:
        node["inputs"].update(values)
    return prompt


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


def prepare_inputs(input_dir: Path, example: Path) -> None:
    """ComfyUI's bundled example.png for detection, and two small copies in ``input/protect_me``
    (the folder the protect workflow reads; small so the CPU-only demo stays quick)."""
    from PIL import Image

    (input_dir / "protect_me").mkdir(parents=True, exist_ok=True)
    shutil.copy(example, input_dir / "example.png")
    with Image.open(example) as im:
        im = im.convert("RGB")
        im.resize((96, 96), Image.LANCZOS).save(input_dir / "protect_me" / "example_96.png")
        im.crop((200, 150, 520, 390)).resize((80, 60), Image.LANCZOS).save(input_dir / "protect_me" / "crop_80x60.png")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_output", help="output folder (created)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the pinned copy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-steps", type=int, default=200, help="steps of Train LoRD (Stage 1) (workflow: 1000)")
    ap.add_argument("--stage2-steps", type=int, default=100, help="steps of Train LoRA with LoRD (Stage 2) (workflow: 800)")
    args = ap.parse_args(argv)

    comfy_root = ensure_comfyui_importable(args.comfyui)
    from tools.workflow_api import load_workflow, run_workflow, ui_to_api

    out = Path(args.out).resolve()
    base = out / "comfyui_base"
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    print("NOTE: the demo trains a LoRD and a LoRA for real, but on a random model, 64x64 images and a few hundred "
          "steps:\n      the outputs show the pipeline running end to end, not a useful defense.")
    t0 = time.time()
    facts = prepare_models(base, args.seed)
    prepare_inputs(base / "input", comfy_root / "input" / "example.png")
    facts["training_data"] = prepare_training_inputs(base / "input", comfy_root / "input" / "example.png")
    shutil.rmtree(base / "output" / "lord_training", ignore_errors=True)  # train from scratch, no resume
    print(f"[demo] checkpoint and inputs ready in {time.time() - t0:.1f} s under {base}")

    workflows = sorted((REPO / "workflows").glob("*.json"))
    training = [wf for wf in workflows if is_training_workflow(load_workflow(wf))]  # stage1 before stage2
    steps = {"LoRDTrainStage1": args.stage1_steps, "LoRDTrainStage2": args.stage2_steps}
    summary = {"note": "LoRD and LoRA trained through the training workflows with fewer steps, on a random "
                       "SD15-geometry checkpoint and 64x64 images: the pipeline end to end, not a defense.",
               "comfyui": str(comfy_root), "models": facts, "workflows": {}}
    ok = True
    with ComfyServer(base, comfyui=comfy_root) as server:
        for wf in training + [wf for wf in workflows if wf not in training]:
            t = time.time()
            if wf in training:
                prompt = ui_to_api(load_workflow(wf), server.object_info())
                n = {k: v for k, v in steps.items() if any(p["class_type"] == k for p in prompt.values())}
                for node in prompt.values():  # only the step counts differ from the shipped workflow
                    if node["class_type"] in steps:
                        node["inputs"]["steps"] = steps[node["class_type"]]
                entry = server.run_prompt(prompt, timeout=3600)
            else:
                entry = run_workflow(server, wf)
            status = entry["status"]["status_str"]
            copied, texts = collect_outputs(entry, base, images, wf.stem, temp=wf in training)
            record = {"status": status, "seconds": round(time.time() - t, 2), "images": copied, "reports": texts}
            if wf in training:
                record["steps"] = n
            summary["workflows"][wf.name] = record
            print(f"[demo] {wf.name}: {status} in {time.time() - t:.1f} s, {len(copied)} image(s)"
                  + (f", {' + '.join(str(v) for v in n.values())} training steps" if wf in training else ""))
            if status != "success":
                record["messages"] = entry["status"].get("messages")
                ok = False
                if wf in training:  # the other workflows need the trained files
                    print(f"[demo] training failed; not running the other workflows. See {server.log_path}")
                    break
    summary["models"]["trained"] = trained_file_facts(base)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] {'done' if ok else 'FAILED'}: {out / 'summary.json'}, images in {images}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
