"""``python -m training.attack``: the batch protection CLI, run as a subprocess on the SD15-geometry checkpoint."""
import dataclasses
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lord_ops import tool_version
from lord_ops.attacks import PRESETS

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--method", "ace", "--epsilon", "4", "--step-size", "1.5", "--seed", "7"]


def cli_env(comfyui_path) -> dict:
    # one BLAS/OpenMP thread: tiny images gain nothing from more, and a busy 2-core machine
    # slows multi-threaded CPU torch down by an order of magnitude
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(comfyui_path, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.attack", *map(str, args)], cwd=ROOT, env=cli_env(comfyui_path),
                          capture_output=True, text=True, timeout=timeout)


def summary(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"summary: (\d+) done, (\d+) skipped, (\d+) failed", stdout)
    assert m, stdout
    return tuple(int(g) for g in m.groups())


def write_png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def folder_state(folder: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def make_mixed_folder(d: Path) -> dict:
    """Inputs of every kind; returns {stem: (expected 8-bit RGB reference [H, W, 3], alpha or None)}."""
    d.mkdir()
    rng = np.random.default_rng(0)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    refs = {}
    rgb = u8(48, 40, 3)
    Image.fromarray(rgb).save(d / "rgb.png")
    refs["rgb"] = (rgb, None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(u8(45, 37, 3)).save(d / "odd_rotated.jpg", exif=exif, quality=95)
    with Image.open(d / "odd_rotated.jpg") as im:
        refs["odd_rotated"] = (np.asarray(ImageOps.exif_transpose(im).convert("RGB")), None)
    grey = u8(41, 33)
    Image.fromarray(grey).save(d / "grey.png")
    refs["grey"] = (np.repeat(grey[..., None], 3, -1), None)
    la = u8(40, 48, 2)
    Image.fromarray(la).save(d / "grey_alpha.png")
    refs["grey_alpha"] = (np.repeat(la[..., :1], 3, -1), la[..., 1])
    rgba = u8(45, 37, 4)
    Image.fromarray(rgba).save(d / "rgba.png")
    refs["rgba"] = (rgba[..., :3], rgba[..., 3])
    g16 = rng.integers(0, 65536, (40, 40)).astype(np.uint16)
    Image.fromarray(g16).save(d / "grey16.png")
    refs["grey16"] = (np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, -1), None)
    c16 = rng.integers(0, 65536, (40, 40, 3)).astype(np.uint16)
    write_png16_rgb(d / "rgb16.png", c16)
    refs["rgb16"] = ((c16 >> 8).astype(np.uint8), None)
    (d / "broken.png").write_bytes((d / "rgb.png").read_bytes()[:300])  # truncated
    (d / "notes.txt").write_text("not an image")
    return refs


def test_mixed_folder_policy_sidecars_and_rerun(sd15_checkpoint, comfyui_path, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    refs = make_mixed_folder(inp)
    before = folder_state(inp)
    args = ["--checkpoint", sd15_checkpoint, "--input", inp, "--output", out, "--preset", "ace_fixed", "--steps", 2]
    r = run_cli(comfyui_path, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert summary(r.stdout) == (7, 0, 1)
    assert re.search(r"broken\.png: FAILED: broken\.png", r.stdout)
    assert "step/s" in r.stderr and "loss=" in r.stderr  # the tqdm bar
    assert folder_state(inp) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{e}" for s in refs for e in ("png", "json"))
    for stem, (ref, alpha) in refs.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.format == "PNG" and im.mode == ("RGB" if alpha is None else "RGBA")
            got = np.asarray(im)
        assert got.dtype == np.uint8 and got.shape[:2] == ref.shape[:2], stem
        diff = np.abs(got[..., :3].astype(int) - ref.astype(int))
        assert 1 <= diff.max() <= 4, (stem, diff.max())  # ace_fixed: 4 levels
        if alpha is not None:
            assert np.array_equal(got[..., 3], alpha), stem
        side = json.loads((out / f"{stem}.json").read_text())
        src = next(p for p in inp.iterdir() if p.stem == stem)
        assert side["input"]["file"] == src.name
        assert side["input"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert side["output"]["sha256"] == hashlib.sha256((out / f"{stem}.png").read_bytes()).hexdigest()
        assert side["output"]["size_wh"] == [ref.shape[1], ref.shape[0]]
        assert side["params"] == {**dataclasses.asdict(PRESETS["ace_fixed"]), "steps": 2,  # preset + override
                                  "prompt": "a photo of a person", "target": "pattern",
                                  "checkpoint": {"name": sd15_checkpoint.name,
                                                 "size_bytes": sd15_checkpoint.stat().st_size}}
        assert side["max_change_levels"] == 4 and len(side["loss_trace"]) == 2 and side["seconds"] > 0
        assert side["version"] == tool_version() != "unknown"
        policy = " | ".join(side["policy"])
        assert ("alpha kept unchanged" in policy) == (alpha is not None), policy
    rgb16 = json.loads((out / "rgb16.json").read_text())
    assert rgb16["input"]["bits"] == 16 and "16-bit colour" in " ".join(rgb16["policy"])
    grey16 = json.loads((out / "grey16.json").read_text())
    assert grey16["input"]["mode"] == "I;16" and "16-bit greyscale" in " ".join(grey16["policy"])
    rot = json.loads((out / "odd_rotated.json").read_text())
    assert rot["input"]["size_wh"] == [37, 45] and rot["output"]["size_wh"] == [45, 37]
    assert any("EXIF orientation 6" in p for p in rot["policy"]) and any("multiple of 8" in p for p in rot["policy"])

    # rerun: everything finished is skipped without loading the model, the broken file fails again
    done = folder_state(out)
    r2 = run_cli(comfyui_path, *args)
    assert r2.returncode == 1 and summary(r2.stdout) == (0, 7, 1), r2.stdout + r2.stderr
    assert "loaded" not in r2.stdout and folder_state(out) == done


def test_refusals_before_loading_the_model(sd15_checkpoint, comfyui_path, tmp_path, capsys):
    from training import attack

    inp, empty = tmp_path / "in", tmp_path / "empty"
    inp.mkdir()
    empty.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inp / "a.png")
    before = folder_state(inp)
    base = ["--checkpoint", sd15_checkpoint, "--input", inp, "--steps", 1]
    # the real CLI: exit status and message
    r = run_cli(comfyui_path, *base, "--output", inp / "protected", timeout=120)
    assert r.returncode == 2 and "refusing to write into the input folder" in r.stderr, r.stdout + r.stderr
    # the rest in-process (same main(), no interpreter start-up per case)
    cases = [
        (["--output", inp], "refusing to write into the input folder"),
        (["--checkpoint", tmp_path / "missing.safetensors", "--output", tmp_path / "o"], "checkpoint not found"),
        (["--input", tmp_path / "no_such_dir", "--output", tmp_path / "o"], "input folder not found"),
        (["--epsilon", "300", "--output", tmp_path / "o"], "pixel levels"),
        (["--input", empty, "--output", tmp_path / "o"],
         f"no images (.bmp .jpeg .jpg .png .tif .tiff .webp) in input folder {empty}"),
        (["--method", "ace", "--target", tmp_path / "nope.png", "--output", tmp_path / "o"], "target image not found"),
        (["--epsilon", "0.5", "--output", tmp_path / "o"], "below one pixel level"),
        (["--preset", "pgd_2", "--epsilon", "0.75", "--output", tmp_path / "o"], "below one pixel level"),
        (["--class-data", empty, "--output", tmp_path / "o"], "--class-data is for the surrogate presets"),
        (["--preset", "mist_v2", "--class-data", empty, "--output", tmp_path / "o"], "no images"),
    ]
    for extra, message in cases:
        assert attack.main([str(a) for a in base + extra]) == 2, extra
        out, err = capsys.readouterr()
        assert message in err and "loaded" not in out, (extra, out, err)
    assert folder_state(inp) == before and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_info:  # the image policy is part of --help
        attack.main(["--help"])
    assert exit_info.value.code == 0 and "alpha channel unchanged" in " ".join(capsys.readouterr().out.split())


def test_kill_and_resume_matches_uninterrupted_run(sd15_checkpoint, comfyui_path, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(3)
    # the second image is large, so a kill right after the first sidecar lands while it is being attacked
    for name, (h, w) in zip("abcde", [(48, 40), (160, 160), (40, 48), (48, 40), (40, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inp / f"{name}.png")
    args = ["--checkpoint", sd15_checkpoint, "--input", inp, *ARGS, "--steps", 3]
    full = tmp_path / "full"
    r = run_cli(comfyui_path, *args, "--output", full)
    assert r.returncode == 0 and summary(r.stdout) == (5, 0, 0), r.stdout + r.stderr

    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "training.attack", *map(str, args), "--output", str(out)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(comfyui_path), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (out / "a.json").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.time() < deadline, "no image finished within 300 s"
            time.sleep(0.01)
        proc.kill()
        proc.wait(60)
    # after the kill: every sidecar vouches for a complete PNG; anything else is a hidden temp file
    finished = {p.stem for p in out.glob("*.json")}
    assert "a" in finished and len(finished) < 5
    for name in finished:
        side = json.loads((out / f"{name}.json").read_text())
        assert side["output"]["sha256"] == hashlib.sha256((out / f"{name}.png").read_bytes()).hexdigest()
    for p in out.iterdir():
        assert p.stem in finished or p.suffix == ".png" or re.fullmatch(r"\..+\.attack-tmp", p.name), p.name
    # states a kill can leave (PNG without its sidecar, a stale temp) or a different earlier run left
    if "d" not in finished:
        (out / "d.png").write_bytes((full / "d.png").read_bytes()[:100])
    (out / ".e.png.12345.attack-tmp").write_bytes(b"partial")
    side_e = json.loads((full / "e.json").read_text())
    side_e["params"]["seed"] = 8
    (out / "e.png").write_bytes((full / "e.png").read_bytes())
    (out / "e.json").write_text(json.dumps(side_e))
    kept = {n: (out / f"{n}.png").stat().st_mtime_ns for n in finished}

    r = run_cli(comfyui_path, *args, "--output", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(r.stdout) == (5 - len(finished), len(finished), 0)
    for name in finished:
        assert re.search(rf"{name}\.png: skipped", r.stdout)
        assert (out / f"{name}.png").stat().st_mtime_ns == kept[name]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())  # no temp files left
    for name in "abcde":  # same seed -> identical bytes
        assert (out / f"{name}.png").read_bytes() == (full / f"{name}.png").read_bytes(), name
        a, b = (json.loads((d / f"{name}.json").read_text()) for d in (out, full))
        assert a["params"] == b["params"] and a["input"] == b["input"] and a["output"] == b["output"]
        assert a["loss_trace"] == b["loss_trace"]


def test_surrogate_preset_protects_the_folder_as_one_set(sd15_checkpoint, comfyui_path, tmp_path):
    """--preset mist_v2: one surrogate LoRA fine-tuned on all images (of different sizes) between the
    PGD rounds, with class images for prior preservation; sidecars record the schedule."""
    inp, classes, out = tmp_path / "in", tmp_path / "classes", tmp_path / "out"
    inp.mkdir()
    classes.mkdir()
    rng = np.random.default_rng(5)
    for name, (h, w) in {"a": (8, 8), "b": (12, 16)}.items():  # tiny: the full 5-round schedule runs
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inp / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(classes / "c.png")
    args = ["--checkpoint", sd15_checkpoint, "--input", inp, "--output", out, "--preset", "mist_v2", "--steps", 1,
            "--class-data", classes, "--class-prompt", "a photo of a person"]
    r = run_cli(comfyui_path, *args)
    assert r.returncode == 0 and summary(r.stdout) == (2, 0, 0), r.stdout + r.stderr
    for name in "ab":
        got = np.asarray(Image.open(out / f"{name}.png")).astype(int)
        src = np.asarray(Image.open(inp / f"{name}.png")).astype(int)
        assert got.shape == src.shape and 1 <= np.abs(got - src).max() <= 4  # mist-v2: 8/255 in [-1, 1] = 4 levels
        side = json.loads((out / f"{name}.json").read_text())
        assert side["params"]["preset"] == "mist_v2" and side["params"]["method"] == "ace"
        assert side["params"]["surrogate"]["rounds"] == 5 and side["params"]["surrogate"]["train_steps"] == 10
        assert side["params"]["class_images"][0]["name"] == "c.png"
        assert len(side["loss_trace"]) == 5  # 5 rounds x 1 PGD step
    r = run_cli(comfyui_path, *args)
    assert r.returncode == 0 and summary(r.stdout) == (0, 2, 0) and "loaded" not in r.stdout, r.stdout + r.stderr
