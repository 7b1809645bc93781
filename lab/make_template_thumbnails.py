"""Template thumbnails and README example images, made by the pack's own run on the lab model.

``python -m lab.make_template_thumbnails`` (from the repository root):

1. assembles the **lab model** (``lab/MODEL_CARD.md``: a small SD1.x-family model trained on
   Fashion-MNIST, from ``lab/weights/``) and, with the pack's evaluation runner, the LoRD of RESULTS.md's
   Stage-1 ablation (Stage 1 on PGD copies at 32 levels, whose gate separates) and its held-out AUROC on
   32 clean vs 32 ASPL-32-protected held-out bags (``lab/pictures.py``; about 6 minutes on one CPU core),
2. writes the lab inputs the demo uses (``lab.demo.lab_inputs``: Stage-1 images with captions, the
   protected bags as the Stage-2 subject, two clean bags to protect, a clean and a protected bag to
   detect),
3. starts the pinned real ComfyUI with this pack installed, **with** PNG metadata on,
4. runs every workflow in ``workflows/`` through the server as the frontend queues it, adapted to the
   lab model the way ``make demo`` adapts it (``lab.demo.for_lab_model``: its checkpoint, 32 px latents,
   "person" -> "bag", an empty negative prompt, CFG 4) -- in the UI graph, so the embedded workflow is
   the one that ran: the training workflows first (trainer ``steps`` lowered, a fresh ``run_name``),
   then the others; after the Stage-1 workflow the runner's LoRD replaces the one it saved, so Stage 2,
   defended generation and detection use the measured LoRD. Each prompt is posted with
   ``extra_data = {"extra_pnginfo": {"workflow": <the UI workflow>}}`` the way the frontend's Queue does.
   The detection workflow runs twice: on the clean bag and on the same bag protected,
5. writes ``workflows/<name>.jpg`` for every ``workflows/<name>.json``: the frontend's template
   browser shows it as that template's thumbnail (it fetches
   ``/api/workflow_templates/<pack folder>/<name>.jpg``),
6. writes ``docs/examples/<name>.png`` for ``EXAMPLES``: the generated batch as a grid, or the two
   detection runs side by side (clean bag, heatmap, protected bag, heatmap, the colour bar and the
   gate's measured AUROC), with the ``prompt`` and ``workflow`` text chunks that SaveImage embedded
   (the generation's first image; the protected bag's detection run) copied unchanged, so dragging
   the PNG onto the canvas loads the workflow that made it -- on the lab model.

Binaries stay small (thumbnails 320 px JPEG, example PNGs at most ``MAX_BYTES``).

``--out DIR`` writes ``DIR/workflows/<name>.jpg`` and ``DIR/examples/<name>.png`` instead of the
committed files. ``--quick`` (a smoke run, about a minute on 2 CPU cores; needs ``--out``) runs the
same steps with 2 trainer steps, 2 sampler / attack steps, 2 images per batch and the runner's
smallest settings (its LoRD is barely trained; the caption says so).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from lord_ops.comfy.bootstrap import REPO_ROOT as REPO, ensure_comfyui_importable
from tools.comfy_server import ComfyServer, error_summary
from tools.example_inputs import LORD_NAME
from tools.workflow_api import TRAINER_NODES, is_training_workflow, load_workflow, ui_to_api, widget_inputs

THUMB_SIZE = 320  # a thumbnail is THUMB_SIZE x THUMB_SIZE pixels (the image fitted, padded with white)
MAX_BYTES = 150_000  # per generated file
# workflow stem -> the output node (class_type) whose image becomes the thumbnail; others: the first image
THUMBNAIL_NODE = {"lord_train_stage1": "LossGraphNode", "lord_train_stage2": "LossGraphNode",
                  "lord_detect": "SaveImage", "lord_protect_batch": "PreviewImage",
                  "lord_defended_generation": "SaveImage"}
DETECT = "lord_detect"  # runs on a clean and a protected bag; its pictures show both
PROTECT = "lord_protect_batch"  # its thumbnail: a clean bag, its protected copy, the perturbation view
# workflow stem -> README example image (the output as a picture, the workflow SaveImage embedded)
EXAMPLES = {"lord_defended_generation": "defended_generation.png", "lord_detect": "detect_heatmap.png"}
CLEAN_INPUT = "example_clean.png"  # the detection workflow's clean run reads this (its protected run: example.png)
BATCH = 8  # images per generated batch (quick: QUICK_STEPS)
GRID_TILE = 96  # px of one generated 32 px image in the example grid (nearest neighbour)
QUICK_STEPS = 2  # --quick: trainer, sampler and attack steps, and images per batch


def lab_workflow(ui: dict, info: dict, checkpoint_name: str, steps: dict, batch: int = BATCH,
                 node_steps: int | None = None) -> dict:
    """A copy of the UI workflow ``ui`` adapted to the lab model exactly as ``lab.demo.for_lab_model``
    adapts its API prompt (every widget value the adapted prompt holds is written back into the UI
    nodes' ``widgets_values``), so that the graph embedded in a PNG is the one that ran."""
    import copy

    from lab.demo import for_lab_model

    ui = copy.deepcopy(ui)
    prompt = for_lab_model(ui_to_api(ui, info), checkpoint_name, steps, batch=batch, node_steps=node_steps)
    for node in ui["nodes"]:
        entry = prompt.get(str(node.get("id")))
        values = node.get("widgets_values")
        if entry is None or not isinstance(values, list):
            continue
        pos = 0
        for name, _spec, extra in widget_inputs(info[node["type"]]):
            value = entry["inputs"].get(name)
            if pos < len(values) and value is not None and not isinstance(value, list):
                values[pos] = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
            pos += 1 + extra
    return ui


def output_images(entry: dict, prompt: dict, base: Path, class_type: str | None = None) -> list[Path]:
    """Files of the images a finished prompt produced (optionally only from nodes of ``class_type``)."""
    files = []
    for node_id, out in sorted(entry.get("outputs", {}).items(), key=lambda kv: kv[0]):
        if class_type and prompt.get(node_id, {}).get("class_type") != class_type:
            continue
        for img in out.get("images", []):
            files.append(base / img["type"] / img.get("subfolder", "") / img["filename"])
    return files


def detect_score(entry: dict) -> float | None:
    """The ``score`` LoRD Detect reported (from its JSON report shown by *Preview as Text*)."""
    for out in entry.get("outputs", {}).values():
        for text in out.get("text", []):
            try:
                report = json.loads(text)
            except (TypeError, ValueError):
                continue
            if isinstance(report, dict) and "scores" in report:
                return float(sum(report["scores"]) / len(report["scores"]))
    return None


def grid(files: list[Path], cols: int = 4, tile: int = GRID_TILE):
    """The images in ``files`` as a grid of ``tile`` px squares (nearest neighbour), 2 px white gaps."""
    from PIL import Image

    rows = -(-len(files) // cols)
    cols = min(cols, len(files))
    out = Image.new("RGB", (cols * (tile + 2) - 2, rows * (tile + 2) - 2), (255, 255, 255))
    for i, f in enumerate(files):
        with Image.open(f) as im:
            out.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), ((i % cols) * (tile + 2),
                                                                             (i // cols) * (tile + 2)))
    return out


def write_thumbnail(src, dest: Path, size: int = THUMB_SIZE) -> Path:
    """``src`` (a file or a PIL image) fitted into a ``size`` x ``size`` square (the template cards
    are square; a wide picture is padded with white, not cropped; small pictures are scaled up with
    nearest neighbour so the 32 px pixels stay sharp), as a JPEG (atomic write)."""
    from PIL import Image

    from lord_ops.atomic import atomic_write_bytes

    with (Image.open(src) if isinstance(src, Path) else src) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)
        resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
        square = Image.new("RGB", (size, size), (255, 255, 255))
        square.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        buf = io.BytesIO()
        square.save(buf, "JPEG", quality=85, optimize=True)
    data = buf.getvalue()
    if len(data) > MAX_BYTES:
        raise RuntimeError(f"thumbnail {dest} would be {len(data)} bytes (limit {MAX_BYTES})")
    atomic_write_bytes(dest, data)
    return dest


def png_text_chunks(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (ComfyUI stores ``prompt`` and ``workflow`` there as JSON)."""
    from PIL import Image

    with Image.open(path) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


def write_example_png(picture, chunks_from: Path, dest: Path) -> Path:
    """The PIL image ``picture`` as a PNG with the text chunks of ComfyUI's PNG ``chunks_from`` copied
    exactly as ComfyUI wrote them (so dropping it onto the canvas loads that workflow); palette-encoded
    if needed to stay under ``MAX_BYTES``. Atomic write."""
    from PIL import Image, PngImagePlugin

    from lord_ops.atomic import atomic_write_bytes

    chunks = png_text_chunks(chunks_from)
    if "workflow" not in chunks or "prompt" not in chunks:
        raise RuntimeError(f"{chunks_from}: SaveImage embedded no workflow")
    info = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    picture = picture.convert("RGB")
    for colors in (None, 256, 128, 64):
        pal = picture if colors is None else picture.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                                              dither=Image.Dither.NONE)
        buf = io.BytesIO()
        pal.save(buf, "PNG", pnginfo=info, optimize=True)
        data = buf.getvalue()
        if len(data) <= MAX_BYTES:
            break
    else:
        raise RuntimeError(f"example {dest} stays over {MAX_BYTES} bytes ({len(data)})")
    atomic_write_bytes(dest, data)
    return dest


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (the committed files), else as it is."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def prepare(base: Path, quick: bool) -> dict:
    """The lab checkpoint, the measured detection LoRD and the workflows' inputs under ``base``."""
    import shutil

    from lab import pictures as lab_pictures
    from lab.demo import lab_inputs

    models = base / "models"
    for sub in ("lord", "loras"):  # never let a file from an earlier run stand in for a failed training
        (models / sub).mkdir(parents=True, exist_ok=True)
        for f in (models / sub).glob("*.safetensors"):
            f.unlink()
    shutil.rmtree(base / "output" / "lord_training", ignore_errors=True)  # train from scratch, no resume
    checkpoint = lab_pictures.lab_checkpoint(models / "checkpoints")
    found = lab_pictures.detection_lord(base / "detect_lord", checkpoint, quick=quick)
    lab_inputs(base / "input", found["protected"][found["names"][0]].parent, 1 if quick else None)
    name = found["names"][0]  # the first bag, not one chosen by its score; example.png is its protected copy
    shutil.copy(found["clean"][name], base / "input" / CLEAN_INPUT)
    return {"checkpoint": checkpoint, **found}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="ComfyUI base folder to use (default: a temporary folder, removed); "
                                                 "a second run with the same folder reuses the runner's LoRD")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the pinned copy)")
    ap.add_argument("--stage1-steps", type=int, default=None,
                    help="Train LoRD steps (default 40, quick 2; workflow: 1000)")
    ap.add_argument("--stage2-steps", type=int, default=None,
                    help="Train LoRA with LoRD steps (default 250, quick 2; workflow: 800 at batch 1, lr 1e-4; "
                         "here at the lab model's batch 4, lr 5e-4: lab.demo.LAB_STAGE2)")
    ap.add_argument("--only", nargs="+", metavar="NAME", default=None,
                    help="run only these workflows (file stems), reusing the checkpoint, LoRD and trained files an "
                         "earlier full run left in --work")
    ap.add_argument("--out", type=Path, default=None,
                    help="write DIR/workflows/<name>.jpg and DIR/examples/<name>.png (default: workflows/ and "
                         "docs/examples/ of the repository)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run into --out: {QUICK_STEPS} trainer/sampler/attack steps and images per batch, "
                         "a barely trained LoRD")
    args = ap.parse_args(argv)
    if args.only and not args.work:
        ap.error("--only needs --work: the folder of an earlier full run (its checkpoint and trained files)")
    committed = (REPO / "workflows", REPO / "docs" / "examples")
    thumbs, examples = (args.out / "workflows", args.out / "examples") if args.out else committed
    if args.quick and (not args.out or {thumbs.resolve(), examples.resolve()} & {c.resolve() for c in committed}):
        ap.error("--quick makes smoke-run pictures: give --out DIR (not where the committed thumbnails and "
                 "examples are)")
    from lab.demo import DEMO_STAGE2_STEPS  # the demo's Stage-2 steps on the lab model

    args.stage1_steps = args.stage1_steps or (QUICK_STEPS if args.quick else 40)
    args.stage2_steps = args.stage2_steps or (QUICK_STEPS if args.quick else DEMO_STAGE2_STEPS)

    comfy_root = ensure_comfyui_importable(args.comfyui, cpu=True)
    from lab.ship import CHECKPOINT_NAME
    from lab import pictures as lab_pictures

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lord_thumbs_")
    base = Path(args.work or tmp.name).resolve()
    steps = {"LoRDTrainStage1": args.stage1_steps, "LoRDTrainStage2": args.stage2_steps}
    assert set(steps) == set(TRAINER_NODES)
    workflows = sorted((REPO / "workflows").glob("*.json"))
    training = [wf for wf in workflows if is_training_workflow(load_workflow(wf))]  # stage1 sorts before stage2
    order = training + [wf for wf in workflows if wf not in training]
    if args.only:
        unknown = set(args.only) - {wf.stem for wf in workflows}
        if unknown:
            ap.error(f"no such workflow(s) in workflows/: {sorted(unknown)}")
        order = [wf for wf in order if wf.stem in args.only]
    batch, node_steps = (QUICK_STEPS, QUICK_STEPS) if args.quick else (BATCH, None)
    thumbs.mkdir(parents=True, exist_ok=True)
    examples.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        if args.only:  # the runner's stages are cached in base/detect_lord: this only reads them back
            found = lab_pictures.detection_lord(base / "detect_lord", lab_pictures.lab_checkpoint(
                base / "models" / "checkpoints"), quick=args.quick)
        else:
            found = prepare(base, args.quick)
        print(f"[thumbnails] detection LoRD: {lab_pictures.caption(found)}; scores clean {found['scores_clean']}, "
              f"protected {found['scores_protected']}")
        with ComfyServer(base, comfyui=comfy_root, metadata=True) as server:
            info = server.object_info()
            for wf in order:
                t0 = time.time()
                ui = lab_workflow(load_workflow(wf), info, CHECKPOINT_NAME, steps, batch, node_steps)
                runs = [(ui, ui_to_api(ui, info))]
                if wf.stem == DETECT:  # first the clean bag, then (the embedded one) its protected copy
                    clean = json.loads(json.dumps(ui))
                    for node in clean["nodes"]:
                        if node["type"] == "LoadImage":
                            node["widgets_values"][0] = CLEAN_INPUT
                    runs.insert(0, (clean, ui_to_api(clean, info)))
                results = []
                for graph, prompt in runs:
                    if wf in training:
                        for node in prompt.values():
                            if node["class_type"] in steps:
                                node["inputs"].update(run_name=f"thumbnail_{wf.stem}")
                    entry = server.run_prompt(prompt, timeout=3600, extra_data={"extra_pnginfo": {"workflow": graph}})
                    if entry["status"]["status_str"] != "success":
                        print(f"[thumbnails] {wf.name} FAILED: {error_summary(entry)}")
                        break
                    results.append((entry, prompt))
                if len(results) < len(runs):
                    failed.append(wf.name)
                    if wf in training:
                        break  # the other workflows load the trained files
                    continue
                if wf.stem == "lord_train_stage1":  # Stage 2, generation and detection use the measured LoRD
                    import shutil

                    shutil.copy(found["lord"], base / "models" / "lord" / LORD_NAME)
                entry, prompt = results[-1]
                wanted = THUMBNAIL_NODE.get(wf.stem)
                images = output_images(entry, prompt, base, wanted) or output_images(entry, prompt, base)
                if not images:
                    failed.append(wf.name)
                    print(f"[thumbnails] {wf.name}: no output image")
                    continue
                shown, example = images[0], None
                if wf.stem == DETECT:
                    (clean_entry, clean_prompt), _ = results
                    heat_clean = output_images(clean_entry, clean_prompt, base, "SaveImage")[0]
                    sc, sp = detect_score(clean_entry), detect_score(entry)
                    tiles = [base / "input" / CLEAN_INPUT, heat_clean, base / "input" / "example.png", images[0]]
                    labels = ["clean bag", f"heatmap, score {sc:.2f}", "protected (ASPL-32)",
                              f"heatmap, score {sp:.2f}"]
                    from PIL import Image

                    pics = [Image.open(t).convert("RGB") for t in tiles]
                    shown = lab_pictures.strip(pics, labels)
                    example = lab_pictures.strip(pics, labels, caption=lab_pictures.caption(found), legend=True)
                elif wf.stem == PROTECT:  # the first clean bag, its protected copy and the perturbation view
                    from PIL import Image

                    saved = output_images(entry, prompt, base, "SaveImage")
                    clean_bag = min((base / "input" / "protect_me").glob("*.png"))
                    if saved:
                        shown = lab_pictures.strip([Image.open(f).convert("RGB") for f in (clean_bag, saved[0], images[0])],
                                                   ["clean bag", "protected (ACE 4 lv)", "perturbation"])
                elif wf.stem in EXAMPLES:
                    shown = example = grid(images)
                thumb = write_thumbnail(shown, thumbs / f"{wf.stem}.jpg")
                line = f"[thumbnails] {wf.name}: {shown_path(thumb)} ({thumb.stat().st_size} B)"
                if wf.stem in EXAMPLES:
                    saved = output_images(entry, prompt, base, "SaveImage")
                    if not saved:
                        raise RuntimeError(f"{wf.name}: SaveImage wrote no PNG")
                    ex = write_example_png(example, saved[0], examples / EXAMPLES[wf.stem])
                    line += f", {shown_path(ex)} ({ex.stat().st_size} B)"
                print(line + f" in {time.time() - t0:.1f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    if failed:
        print(f"[thumbnails] FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
