"""Template thumbnails and README example images, made by the pack's own run.

``python -m tools.make_template_thumbnails`` (from the repository root):

1. builds the random SD15-geometry checkpoint and the small inputs of ``lab/demo.py``,
2. starts the pinned real ComfyUI with this pack installed, **with** PNG metadata on,
3. runs every workflow in ``workflows/`` through the server as the frontend queues it: the
   training workflows first (only their trainer nodes' ``steps`` lowered, a fresh ``run_name``),
   then the others unchanged, each posted with ``extra_data = {"extra_pnginfo": {"workflow": <the
   UI workflow>}}`` the way the frontend's Queue button does,
4. writes ``workflows/<name>.jpg`` for every ``workflows/<name>.json``: the frontend's template
   browser shows it as that template's thumbnail (it fetches
   ``/api/workflow_templates/<pack folder>/<name>.jpg``),
5. copies the PNGs that SaveImage wrote for ``EXAMPLES`` to ``docs/examples/<name>.png``: ComfyUI
   embedded the ``prompt`` and ``workflow`` text chunks, so dragging the PNG onto the canvas loads
   the workflow.

The checkpoint has random weights, so the images show what the workflows produce, not a useful
model's pictures. Binaries stay small (thumbnails about 256 px JPEG; example PNGs re-encoded with
an adaptive palette when ComfyUI's PNG is over ``MAX_BYTES``, their text chunks kept as written).

``--out DIR`` writes ``DIR/workflows/<name>.jpg`` and ``DIR/examples/<name>.png`` instead of the
committed files. ``--quick`` (a smoke run, under a minute on 2 CPU cores; needs ``--out``) runs the same
steps with 2 trainer steps, 2 sampler / attack steps and a 64 px latent.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from lord_ops.comfy.bootstrap import REPO_ROOT as REPO, ensure_comfyui_importable
from tools.comfy_server import ComfyServer
from tools.example_inputs import prepare_inputs, prepare_models, prepare_training_inputs
from tools.workflow_api import TRAINER_NODES, is_training_workflow, load_workflow, ui_to_api

THUMB_SIZE = 320  # a thumbnail is THUMB_SIZE x THUMB_SIZE pixels (the image fitted, padded with white)
EXAMPLE_SIZE = 256  # longest side of an example PNG when ComfyUI's full-size PNG is over MAX_BYTES
MAX_BYTES = 150_000  # per generated file
# workflow stem -> the output node (class_type) whose image becomes the thumbnail; others: the first image
THUMBNAIL_NODE = {"lord_train_stage1": "LossGraphNode", "lord_train_stage2": "LossGraphNode",
                  "lord_detect": "SaveImage", "lord_protect_batch": "PreviewImage",
                  "lord_defended_generation": "SaveImage"}
# workflows whose thumbnail shows the LoadImage input left of the output (detection: image | gate heatmap)
WITH_INPUT = {"lord_detect"}
# workflow stem -> README example image (the image SaveImage wrote, workflow embedded)
EXAMPLES = {"lord_defended_generation": "defended_generation.png", "lord_detect": "detect_heatmap.png"}
QUICK_STEPS = 2  # --quick: trainer, sampler and attack steps
QUICK_LATENT_PX = 64  # --quick: EmptyLatentImage width and height


def shrink_for_quick(prompt: dict) -> dict:
    """``--quick``: the sampler and LoRD Protect nodes get :data:`QUICK_STEPS` steps and the empty latent
    is :data:`QUICK_LATENT_PX` px (in place; returned). Everything else stays as shipped."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("KSampler", "LoRDProtect"):
            inputs["steps"] = QUICK_STEPS
        elif kind == "EmptyLatentImage":
            inputs.update(width=QUICK_LATENT_PX, height=QUICK_LATENT_PX)
    return prompt


def output_images(entry: dict, prompt: dict, base: Path, class_type: str | None = None) -> list[Path]:
    """Files of the images a finished prompt produced (optionally only from nodes of ``class_type``)."""
    files = []
    for node_id, out in sorted(entry.get("outputs", {}).items(), key=lambda kv: kv[0]):
        if class_type and prompt.get(node_id, {}).get("class_type") != class_type:
            continue
        for img in out.get("images", []):
            files.append(base / img["type"] / img.get("subfolder", "") / img["filename"])
    return files


def input_images(prompt: dict, base: Path) -> list[Path]:
    """The files the prompt's LoadImage nodes read (``base/input/<image>``)."""
    return [base / "input" / n["inputs"]["image"] for _, n in sorted(prompt.items())
            if n["class_type"] == "LoadImage" and (base / "input" / n["inputs"]["image"]).is_file()]


def side_by_side(left: Path, right: Path):
    """``left`` and ``right`` scaled to the same height and placed next to each other (a PIL image)."""
    from PIL import Image

    with Image.open(left) as a, Image.open(right) as b:
        a, b = a.convert("RGB"), b.convert("RGB")
        h = min(a.height, b.height)
        a = a.resize((round(a.width * h / a.height), h), Image.LANCZOS)
        b = b.resize((round(b.width * h / b.height), h), Image.LANCZOS)
        out = Image.new("RGB", (a.width + b.width + h // 32, h), (255, 255, 255))
        out.paste(a, (0, 0))
        out.paste(b, (a.width + h // 32, 0))
    return out


def write_thumbnail(src, dest: Path, size: int = THUMB_SIZE) -> Path:
    """``src`` (a file or a PIL image) fitted into a ``size`` x ``size`` square (the template cards
    are square; a wide loss graph is padded with white, not cropped), as a JPEG (atomic write)."""
    from PIL import Image

    from lord_ops.atomic import atomic_write_bytes

    with (Image.open(src) if isinstance(src, Path) else src) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
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


def write_example_png(src: Path, dest: Path) -> Path:
    """Copy ComfyUI's PNG ``src`` to ``dest`` with its text chunks; when it is over ``MAX_BYTES``
    (a random model's 512 px noise is), scale the pixels to ``EXAMPLE_SIZE`` px and, if still too
    big, re-encode them with an adaptive palette. The text chunks stay exactly as ComfyUI wrote
    them. Atomic write."""
    from PIL import Image, PngImagePlugin

    from lord_ops.atomic import atomic_write_bytes

    data = src.read_bytes()
    if len(data) > MAX_BYTES:
        chunks = png_text_chunks(src)
        info = PngImagePlugin.PngInfo()
        for k, v in chunks.items():
            info.add_text(k, v)
        with Image.open(src) as im:
            small = im.convert("RGB")
        small.thumbnail((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.LANCZOS)
        for colors in (None, 256, 128, 64, 32):
            pal = small if colors is None else small.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="ComfyUI base folder to use (default: a temporary folder, removed)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the pinned copy)")
    ap.add_argument("--stage1-steps", type=int, default=None,
                    help="Train LoRD steps (default 40, quick 2; workflow: 1000)")
    ap.add_argument("--stage2-steps", type=int, default=None,
                    help="Train LoRA with LoRD steps (default 20, quick 2; workflow: 800)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint")
    ap.add_argument("--only", nargs="+", metavar="NAME", default=None,
                    help="run only these workflows (file stems), reusing the checkpoint and trained files an "
                         "earlier full run left in --work")
    ap.add_argument("--out", type=Path, default=None,
                    help="write DIR/workflows/<name>.jpg and DIR/examples/<name>.png (default: workflows/ and "
                         "docs/examples/ of the repository)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run into --out: {QUICK_STEPS} trainer/sampler/attack steps, "
                         f"{QUICK_LATENT_PX} px latents")
    args = ap.parse_args(argv)
    if args.only and not args.work:
        ap.error("--only needs --work: the folder of an earlier full run (its checkpoint and trained files)")
    committed = (REPO / "workflows", REPO / "docs" / "examples")
    thumbs, examples = (args.out / "workflows", args.out / "examples") if args.out else committed
    if args.quick and (not args.out or {thumbs.resolve(), examples.resolve()} & {c.resolve() for c in committed}):
        ap.error("--quick makes smoke-run pictures: give --out DIR (not where the committed thumbnails and "
                 "examples are)")
    args.stage1_steps = args.stage1_steps or (QUICK_STEPS if args.quick else 40)
    args.stage2_steps = args.stage2_steps or (QUICK_STEPS if args.quick else 20)

    comfy_root = ensure_comfyui_importable(args.comfyui)

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lord_thumbs_")
    base = Path(args.work or tmp.name).resolve()
    steps = {"LoRDTrainStage1": args.stage1_steps, "LoRDTrainStage2": args.stage2_steps}
    assert set(steps) == set(TRAINER_NODES)
    if not args.only:
        prepare_models(base, args.seed)  # (removes trained files an earlier run left)
        prepare_inputs(base / "input", comfy_root / "input" / "example.png")
        prepare_training_inputs(base / "input", comfy_root / "input" / "example.png")
    workflows = sorted((REPO / "workflows").glob("*.json"))
    training = [wf for wf in workflows if is_training_workflow(load_workflow(wf))]  # stage1 sorts before stage2
    order = training + [wf for wf in workflows if wf not in training]
    if args.only:
        unknown = set(args.only) - {wf.stem for wf in workflows}
        if unknown:
            ap.error(f"no such workflow(s) in workflows/: {sorted(unknown)}")
        order = [wf for wf in order if wf.stem in args.only]
    thumbs.mkdir(parents=True, exist_ok=True)
    examples.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        with ComfyServer(base, comfyui=comfy_root, metadata=True) as server:
            info = server.object_info()
            for wf in order:
                t0 = time.time()
                ui = load_workflow(wf)
                prompt = ui_to_api(ui, info)
                if wf in training:
                    for node in prompt.values():
                        if node["class_type"] in steps:
                            node["inputs"].update(steps=steps[node["class_type"]], run_name=f"thumbnail_{wf.stem}")
                elif args.quick:
                    shrink_for_quick(prompt)
                entry = server.run_prompt(prompt, timeout=3600, extra_data={"extra_pnginfo": {"workflow": ui}})
                if entry["status"]["status_str"] != "success":
                    failed.append(wf.name)
                    print(f"[thumbnails] {wf.name} FAILED: {json.dumps(entry['status'].get('messages'))[-2000:]}")
                    if wf in training:
                        break  # the other workflows load the trained files
                    continue
                wanted = THUMBNAIL_NODE.get(wf.stem)
                images = output_images(entry, prompt, base, wanted) or output_images(entry, prompt, base)
                if not images:
                    failed.append(wf.name)
                    print(f"[thumbnails] {wf.name}: no output image")
                    continue
                shown = images[0]
                if wf.stem in WITH_INPUT and input_images(prompt, base):
                    shown = side_by_side(input_images(prompt, base)[0], images[0])
                thumb = write_thumbnail(shown, thumbs / f"{wf.stem}.jpg")
                line = f"[thumbnails] {wf.name}: {shown_path(thumb)} ({thumb.stat().st_size} B)"
                if wf.stem in EXAMPLES:
                    saved = output_images(entry, prompt, base, "SaveImage")
                    if not saved or "workflow" not in png_text_chunks(saved[0]):
                        raise RuntimeError(f"{wf.name}: SaveImage wrote no PNG with an embedded workflow")
                    ex = write_example_png(saved[0], examples / EXAMPLES[wf.stem])
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
