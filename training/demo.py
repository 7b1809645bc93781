"""End-to-end demo on an embedded default: ``python -m training.demo --out demo_output`` (``make demo``).

1. builds a random-weight SD15-geometry checkpoint (ComfyUI's own classes, from a seed),
2. creates a LoRD file and a Stage-2 LoRA for it with this pack's code -- **randomly initialised**:
   training (Stage-1/Stage-2) is not part of this release, so the images and scores show that the
   pipeline runs end to end, not a defense,
3. starts the pinned real ComfyUI with this pack installed and runs every workflow in
   ``workflows/`` unchanged through the HTTP API (defended generation, detection, ACE protection
   of the images in ``input/protect_me``),
4. writes the images, the gate heatmap and ``summary.json`` to the output folder.
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
LORD_NAME = "lord_sd15.safetensors"
LORA_NAME = "lord_stage2_sks.safetensors"


def prepare_models(base: Path, seed: int) -> dict:
    """Write the random checkpoint, LoRD and LoRA under ``base/models``; returns facts for the summary."""
    import torch

    import comfy.sd
    from lord_ops.comfy import patch, tiny
    from lord_ops.format import save_kohya_lora, save_lord_file

    models = base / "models"
    ckpt = tiny.write_sd15_geometry_checkpoint(models / "checkpoints" / CKPT_NAME, seed=seed)
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=seed, provenance={
        "tool": "ComfyUI-LoRD training.demo", "trained": False, "seed": seed,
        "note": "random initialisation for the demo; not a trained defense"})
    save_lord_file(models / "lord" / LORD_NAME, lord)
    g = torch.Generator().manual_seed(seed + 1)
    save_kohya_lora(models / "loras" / LORA_NAME, {
        n: (torch.randn(4, w.in_features, generator=g) * 0.1, torch.randn(w.out_features, 4, generator=g) * 0.1, 4.0)
        for n, w in lord.targets.items()}, metadata={"comfyui_lord_note": "random demo LoRA, not trained"})
    return {"checkpoint": str(ckpt), "checkpoint_note": "random weights, SD15 geometry (13.6M-param UNet, CLIP-L, TAESD)",
            "lord_file": str(models / "lord" / LORD_NAME), "lord_targets": len(lord.targets), "lord_rank": lord.rank,
            "lora_file": str(models / "loras" / LORA_NAME)}


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


def collect_outputs(entry: dict, output_dir: Path, dest: Path, stem: str) -> tuple[list[str], list[dict]]:
    """Copy the images a prompt saved into ``dest``; return (copied paths, text outputs)."""
    copied, texts = [], []
    for node_id, out in sorted(entry.get("outputs", {}).items()):
        for img in out.get("images", []):
            if img.get("type") != "output":
                continue
            src = output_dir / img.get("subfolder", "") / img["filename"]
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
    args = ap.parse_args(argv)

    comfy_root = ensure_comfyui_importable(args.comfyui)
    from training.workflow_api import run_workflow

    out = Path(args.out).resolve()
    base = out / "comfyui_base"
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    print("NOTE: the LoRD and LoRA files of this demo are randomly initialised (training is not part of this "
          "release):\n      the outputs show the pipeline running end to end, not a defense.")
    t0 = time.time()
    facts = prepare_models(base, args.seed)
    prepare_inputs(base / "input", comfy_root / "input" / "example.png")
    print(f"[demo] models ready in {time.time() - t0:.1f} s under {base / 'models'}")

    summary = {"note": "LoRD and LoRA weights are random (untrained); checkpoint is random.",
               "comfyui": str(comfy_root), "models": facts, "workflows": {}}
    with ComfyServer(base, comfyui=comfy_root) as server:
        for wf in sorted((REPO / "workflows").glob("*.json")):
            t = time.time()
            entry = run_workflow(server, wf)
            status = entry["status"]["status_str"]
            copied, texts = collect_outputs(entry, base / "output", images, wf.stem)
            summary["workflows"][wf.name] = {"status": status, "seconds": round(time.time() - t, 2),
                                             "images": copied, "reports": texts}
            print(f"[demo] {wf.name}: {status} in {time.time() - t:.1f} s, {len(copied)} image(s)")
            if status != "success":
                summary["workflows"][wf.name]["messages"] = entry["status"].get("messages")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = all(w["status"] == "success" for w in summary["workflows"].values())
    print(f"[demo] {'done' if ok else 'FAILED'}: {out / 'summary.json'}, images in {images}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
