"""Protect a folder of images: ``python -m training.attack --checkpoint CKPT --input DIR --output DIR``.

Runs the pack's attack engine (``lord_ops.attacks``: PGD/AdvDM, ACE, ACE+, PhotoGuard) through a
checkpoint loaded with ComfyUI's own ``comfy.sd.load_checkpoint_guess_config``, one image at a
time. Units: ``--epsilon`` and ``--step-size`` are pixel levels 0..255 (L-inf, at least 1: a
smaller budget is refused because the 8-bit output would equal the input); every output pixel
stays within ``floor(epsilon)`` levels of the (8-bit) input. Every image uses ``--seed`` itself, so
an image's result does not depend on the rest of the folder -- except with the surrogate presets
(``mist_v2``, ``anti_dreambooth_aspl``, ``anti_dreambooth_fsmg``): like the published tools, they
fine-tune one surrogate LoRA on all images still to do as one set while attacking them, and write
them when the whole set is done (``--steps`` is then the PGD steps per round).

Output: ``OUTPUT/<name>.png`` (lossless 8-bit PNG) and ``OUTPUT/<name>.json`` (parameters, input
sha256, policy applied, per-step loss trace, seconds, tool version). Both are written atomically
(hidden temp file + ``os.replace``), the sidecar last: an image counts as finished only when its
sidecar exists, matches the parameters and input sha256 and names the PNG's sha256. Reruns skip
finished images (without loading the model when nothing is left); a killed run leaves at most
hidden ``.*.attack-tmp`` files, which the next run deletes. Do not run two jobs on one output folder.

Image policy (top-level files ending in .png .jpg .jpeg .webp .bmp .tif .tiff; others ignored):
  * EXIF orientation is applied (PIL ``ImageOps.exif_transpose``); the output has that orientation.
  * Output is RGB; inputs with alpha (RGBA, LA, PA, P with transparency) give RGBA with the alpha
    channel unchanged (only colour is attacked). Greyscale, palette and CMYK are converted to RGB.
  * 16-bit samples (I;16, I, 16-bit RGB) are reduced to 8 bits by keeping the high byte
    (value // 256, what Pillow does for 16-bit colour); float images (F) are refused.
  * Sizes that are not a multiple of 8 are kept exactly (padded internally for the attack).
  * An RGB/RGBA input's ICC profile is copied; other metadata (EXIF, text) is not.
Exit status: 0 all done or skipped, 1 some image failed, 2 bad arguments / checkpoint / folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from lord_ops import tool_version
from lord_ops.attacks import ALL_PRESETS, METHODS, AttackConfig, check_8bit_budget, preset
from lord_ops.images import EXTENSIONS, load_image
from lord_ops.comfy.bootstrap import (ComfyUINotFound, Refused, ensure_comfyui_importable, find_comfyui,
                                     load_checkpoint_models)


TMP_SUFFIX = ".attack-tmp"
VERSION = tool_version()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """``write(file_object)`` into a hidden temp file next to ``path``, fsync, then ``os.replace``."""
    from lord_ops.atomic import atomic_write as write_atomically

    def write_to(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    write_atomically(path, write_to, suffix=TMP_SUFFIX)


def is_finished(png: Path, side: Path, params: dict, input_sha: str) -> bool:
    """The sidecar exists, records these parameters and this input, and names this PNG's sha256."""
    try:
        rec = json.loads(side.read_text())
        return (rec["params"] == params and rec["input"]["sha256"] == input_sha
                and rec["output"]["sha256"] == sha256(png))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_config(args):
    """``(AttackConfig, AlternatingConfig or None)``: the preset (or AttackConfig's defaults), then
    every flag that was given (they override the preset's PGD part)."""
    chosen = preset(args.preset) if args.preset else None
    base = chosen.attack if chosen else AttackConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AttackConfig) if getattr(args, f.name) is not None}
    config = dataclasses.replace(base, **given).validate()
    check_8bit_budget(config.epsilon, "--epsilon")
    surrogate = chosen.surrogate if chosen else None
    if surrogate is not None and config.method == "photoguard":
        raise ValueError(f"preset {args.preset} fine-tunes a UNet surrogate; --method photoguard does not use the UNet")
    return config, surrogate


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m training.attack", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="ComfyUI-loadable checkpoint (model + CLIP + VAE)")
    ap.add_argument("--input", required=True, help="folder of images (never written to)")
    ap.add_argument("--output", required=True, help="output folder (created; must not be or lie inside --input)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, the parent of "
                                                    "custom_nodes, or the pinned .cache/ComfyUI)")
    ap.add_argument("--preset", choices=ALL_PRESETS, help="start from a preset; explicit flags override it "
                                                          "(without one: pgd, 6.375 levels, step 0.6375, 50 steps). "
                                                          "mist_v2, anti_dreambooth_aspl, anti_dreambooth_fsmg: the "
                                                          "published surrogate attacks (README, 'Attack presets')")
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--epsilon", type=float, help="L-inf budget in pixel levels 0..255 (output within floor of it)")
    ap.add_argument("--step-size", dest="step_size", type=float, help="step per iteration in pixel levels")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--random-start", dest="random_start", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--t-min", dest="t_min", type=int, help="smallest DDPM timestep sampled (0..999)")
    ap.add_argument("--t-max", dest="t_max", type=int, help="largest DDPM timestep sampled (0..999)")
    ap.add_argument("--target-weight", dest="target_weight", type=float, help="ace_plus latent-pull weight")
    ap.add_argument("--low-memory", dest="low_memory", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--prompt", default="a photo of a person", help="encoded with the checkpoint's CLIP")
    ap.add_argument("--class-data", dest="class_data", default=None,
                    help="surrogate presets: a folder of class images for prior preservation in the surrogate's "
                         "fine-tuning steps (mist-v2 and Anti-DreamBooth sample them from the model with the class "
                         "prompt; here you supply them)")
    ap.add_argument("--class-prompt", dest="class_prompt", default=None, help="prompt of --class-data (default: --prompt)")
    ap.add_argument("--target", default=None, help="ACE/ACE+/PhotoGuard target image, e.g. mist-v2's data/MIST.png "
                                                   "(what mist-v2 and the paper use; default: the pack's "
                                                   "high-contrast pattern; photoguard: the zero latent)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config, surrogate = build_config(args)
        ckpt, inp, out = Path(args.checkpoint), Path(args.input).resolve(), Path(args.output).resolve()
        if not ckpt.is_file():
            raise Refused(f"checkpoint not found: {ckpt}")
        if not inp.is_dir():
            raise Refused(f"input folder not found: {inp}")
        if out == inp or inp in out.parents:
            raise Refused(f"refusing to write into the input folder: --output {out} is inside --input {inp}")
        files = sorted(p for p in inp.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in EXTENSIONS]
        if not images:
            raise Refused(f"no images ({' '.join(sorted(EXTENSIONS))}) in input folder {inp}")
        target = Path(args.target) if args.target else None
        if target is not None and not target.is_file():
            raise Refused(f"target image not found: {target}")
        class_files = []
        if args.class_data:
            if surrogate is None:
                raise Refused("--class-data is for the surrogate presets (mist_v2, anti_dreambooth_aspl, "
                              "anti_dreambooth_fsmg): a fixed-model attack has no fine-tuning step")
            class_dir = Path(args.class_data)
            if not class_dir.is_dir():
                raise Refused(f"class image folder not found: {class_dir}")
            class_files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS
                                 and not p.name.startswith("."))
            if not class_files:
                raise Refused(f"no images ({' '.join(sorted(EXTENSIONS))}) in class image folder {class_dir}")
        find_comfyui(args.comfyui)
    except (ValueError, Refused, ComfyUINotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uses_target = config.method != "pgd"
    params = json.loads(json.dumps({
        **dataclasses.asdict(config), "prompt": args.prompt,
        **({"preset": args.preset, "surrogate": dataclasses.asdict(surrogate),
            "class_images": [{"name": p.name, "sha256": sha256(p)} for p in class_files],
            "class_prompt": (args.class_prompt or args.prompt) if class_files else None}
           if surrogate is not None else {}),
        "checkpoint": {"name": ckpt.name, "size_bytes": ckpt.stat().st_size},
        "target": None if not uses_target else ({"name": target.name, "sha256": sha256(target)} if target else
                                                "zero latent" if config.method == "photoguard" else "pattern")}))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".*{TMP_SUFFIX}"):
        stale.unlink()
    print(f"[attack] {len(images)} image(s) in {inp} ({len(files) - len(images)} other file(s) ignored) -> {out}")
    print(f"[attack] {json.dumps(params)}")

    inputs = {p.resolve() for p in files}
    done = skipped = failed = 0
    todo, owner = [], {}
    for n, path in enumerate(images, 1):  # phase 1: skip finished images and report unreadable ones
        png, side = out / f"{path.stem}.png", out / f"{path.stem}.json"
        tag = f"[{n}/{len(images)}] {path.name}"
        try:
            if png.name.lower() in owner:  # a.jpg and a.png (or A.png) would share a.png
                raise ValueError(f"output {png.name} is also the output of {owner[png.name.lower()]}; rename one")
            owner[png.name.lower()] = path.name
            if png.resolve() in inputs or side.resolve() in inputs:
                raise ValueError(f"output {png.name} would overwrite an input file")
            digest = sha256(path)
            if png.is_file() and is_finished(png, side, params, digest):
                print(f"{tag}: skipped (finished with these parameters)")
                skipped += 1
                continue
            load_image(path)
            todo.append((tag, path, digest, png, side))
        except Exception as e:  # noqa: BLE001 -- report and carry on with the others
            print(f"{tag}: FAILED: {path.name}: {type(e).__name__}: {e}")
            failed += 1

    if todo:
        try:
            model, vae, cond, target_img, clip = load_model(args, ckpt, target if uses_target else None)
        except Refused as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if surrogate is not None:
            try:
                classes = load_classes(clip, class_files, args.class_prompt)
            except Refused as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            done, more_failed = run_set(todo, model, vae, cond, target_img, config, surrogate, params, classes)
        else:
            done, more_failed = run_images(todo, model, vae, cond, target_img, config, params)
        failed += more_failed
    print(f"[attack] summary: {done} done, {skipped} skipped, {failed} failed (of {len(images)}) -> {out}")
    return 1 if failed else 0


def load_model(args, ckpt: Path, target: Path | None):
    """ComfyUI's loader -> (MODEL, VAE, CONDITIONING of ``--prompt``, target IMAGE or None, CLIP)."""
    ensure_comfyui_importable(args.comfyui)
    import numpy as np
    import torch
    from PIL import Image

    t0 = time.time()
    model, clip, vae = load_checkpoint_models(ckpt)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(args.prompt))
    target_img = None
    if target is not None:
        try:
            with Image.open(target) as im:
                target_img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).float().div(255).unsqueeze(0)
        except Exception as e:  # noqa: BLE001
            raise Refused(f"cannot read target image {target}: {type(e).__name__}: {e}") from e
    print(f"[attack] loaded {ckpt.name} in {time.time() - t0:.1f} s")
    return model, vae, cond, target_img, clip


def load_classes(clip, class_files: list, class_prompt) -> tuple:
    """``(class images [1, H, W, 3] list or None, class CONDITIONING or None)`` for prior preservation."""
    import torch

    if not class_files:
        return None, None
    images = []
    for path in class_files:
        try:
            rgb = load_image(path)[0]
        except Exception as e:  # noqa: BLE001
            raise Refused(f"cannot read class image {path}: {type(e).__name__}: {e}") from e
        images.append(torch.from_numpy(rgb).float().div(255).unsqueeze(0))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(class_prompt)) if class_prompt else None
    return images, cond


def write_result(tag, path, digest, png, side, rgb_perturbed, alpha, icc, facts, policy, params, config, trace, t0, bar):
    """Write one protected image and its sidecar (the sidecar last, both atomically)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = (rgb_perturbed * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if alpha is not None:
        arr = np.dstack([arr, alpha])
    im = Image.fromarray(arr)  # RGB, or RGBA with the alpha
    side.unlink(missing_ok=True)  # the old sidecar must not vouch for the new PNG
    atomic_write(png, lambda f: im.save(f, format="PNG", **({"icc_profile": icc} if icc else {})))
    record = {"tool": "ComfyUI-LoRD training.attack", "version": VERSION, "params": params,
              "input": {**facts, "sha256": digest},
              "output": {"file": png.name, "mode": im.mode, "size_wh": list(im.size), "sha256": sha256(png)},
              "policy": policy, "max_change_levels": int(config.epsilon),
              "loss_trace": trace, "seconds": round(time.time() - t0, 3)}
    atomic_write(side, lambda f: f.write(json.dumps(record, indent=1).encode()))
    bar.write(f"{tag} -> {png.name}: done in {time.time() - t0:.1f} s, loss {trace[0]:.4g} -> {trace[-1]:.4g}")


def run_images(todo, model, vae, cond, target_img, config: AttackConfig, params: dict) -> tuple[int, int]:
    """Phase 2: attack and write each image; returns (done, failed)."""
    import torch
    from tqdm import tqdm

    from lord_ops.comfy.protect import Protection, protect

    done = failed = 0
    bar = tqdm(total=len(todo) * config.steps, unit="step", dynamic_ncols=True)

    def on_progress(count, total, loss, current):
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update(1)

    for tag, path, digest, png, side in todo:
        t0 = time.time()
        try:
            rgb, alpha, icc, facts, policy = load_image(path)
            bar.set_description(path.name[:24])
            images = torch.from_numpy(rgb).float().div(255).unsqueeze(0)
            perturbed, report = protect(model, vae, cond, images, Protection(config, target=target_img), on_progress)
            write_result(tag, path, digest, png, side, perturbed[0], alpha, icc, facts, policy, params, config,
                         report["loss_traces"][0], t0, bar)
            done += 1
        except Exception as e:  # noqa: BLE001 -- report and carry on with the others
            bar.write(f"{tag}: FAILED: {path.name}: {type(e).__name__}: {e}")
            failed += 1
        bar.n = (done + failed) * config.steps
        bar.refresh()
    bar.close()
    return done, failed


def run_set(todo, model, vae, cond, target_img, config: AttackConfig, surrogate, params: dict,
            classes: tuple = (None, None)) -> tuple[int, int]:
    """Phase 2 with a surrogate preset: every image still to do is attacked as one set (one surrogate
    LoRA fine-tuned on all of them, as mist-v2 and ASPL do), then each is written; returns (done, failed)."""
    import torch
    from tqdm import tqdm

    from lord_ops.comfy.protect import Protection, protect

    loaded, failed = [], 0
    for item in todo:
        try:
            loaded.append((item, load_image(item[1])))
        except Exception as e:  # noqa: BLE001
            print(f"{item[0]}: FAILED: {item[1].name}: {type(e).__name__}: {e}")
            failed += 1
    if not loaded:
        return 0, failed
    images = [torch.from_numpy(rgb).float().div(255).unsqueeze(0) for _, (rgb, *_rest) in loaded]
    bar = tqdm(total=1, unit="step", dynamic_ncols=True, desc=f"set of {len(images)}")

    def on_progress(count, total, loss, current):
        bar.total = total
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update(1)

    t0 = time.time()
    try:
        perturbed, report = protect(model, vae, cond, images, Protection(config, surrogate, target_img, *classes),
                                    on_progress)
    except Exception as e:  # noqa: BLE001 -- the whole set failed
        bar.close()
        for (tag, path, *_), _ in loaded:
            print(f"{tag}: FAILED: {path.name}: {type(e).__name__}: {e}")
        return 0, failed + len(loaded)
    done = 0
    for i, ((tag, path, digest, png, side), (rgb, alpha, icc, facts, policy)) in enumerate(loaded):
        try:
            write_result(tag, path, digest, png, side, perturbed[i][0], alpha, icc, facts, policy, params, config,
                         report["loss_traces"][i], t0, bar)
            done += 1
        except Exception as e:  # noqa: BLE001
            bar.write(f"{tag}: FAILED: {path.name}: {type(e).__name__}: {e}")
            failed += 1
    bar.close()
    return done, failed


if __name__ == "__main__":
    raise SystemExit(main())
