"""Which Stage-1 data preset trains a gate that flags held-out protected images?

For each Stage-1 data preset (``lord_ops.train_config.STAGE1_DATA_PRESETS``) and seed, runs the command
line ``python -m training.train stage1`` on the random SD15-geometry checkpoint
(``tools.tiny``; nothing downloaded) with the same training images, then reads the report it
logs: the in-sample gate AUROC (training images vs their own perturbed copies) and the held-out gate
AUROC per protection (``--heldout``: images never trained on, protected with mist-v2's ACE against
the fixed model and with Anti-DreamBooth's PGD, rounded to 8 bits, vs their clean versions).

Images are synthetic (smooth colour fields with random shapes, seeded). What the numbers mean: the
model has random weights, so they say whether the perturbations a preset makes carry a signal that
the LoRD's gate learns to read *and* that transfers to other images and to the other attack -- on
this model. They do not predict the AUROC on a real SD 1.5 checkpoint with real photos.

    python -m bench.stage1_presets --out /tmp/presets [--steps 60 --train 8 --heldout 4 --size 64 --seeds 0 1]
    python -m bench.stage1_presets --out /tmp/presets --quick   # smoke run, under a minute on 2 CPU cores

Writes ``OUT/results.json`` (``results_<set>.json`` with ``--set``) and prints a Markdown table.
``--quick`` checks that the script still runs, nothing more: the presets ``pgd_2`` and ``mixed``
(which runs ``pgd_full`` and ``ace_fixed``), 2 steps, 2 training and 2 held-out images of 32 px, 2
attack steps for the held-out protections (options given explicitly still apply).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --quick: the defaults it changes (an option given on the command line wins)
QUICK = {"presets": ["pgd_2", "mixed"], "steps": 2, "train": 2, "heldout": 2, "size": 32, "heldout_attack_steps": 2}


def synthetic_images(folder: Path, n: int, size: int, seed: int, caption: str) -> None:
    """``n`` seeded pictures: a smooth two-colour gradient with a few random ellipses and rectangles."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for i in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        base = (a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]).astype(np.uint8)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.uniform(0, size * 0.8, 2)
            w, h = rng.uniform(size * 0.1, size * 0.5, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
        im.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"{caption}, picture {i}", encoding="utf-8")


def run_one(args, ckpt: Path, preset: str, seed: int, out: Path) -> dict:
    run_dir = out / (f"{preset}_seed{seed}" + "".join(f"_{x.replace('=', '')}" for x in args.set))
    cmd = [sys.executable, "-m", "training.train", "stage1", "--checkpoint", str(ckpt), "--data", str(out / "train"),
           "--heldout", str(out / "heldout"), "--output", str(run_dir), "--cache-dir", str(out / "cache"),
           "--stage1-data", preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--seed", str(seed), "--set", f"checkpoint_every={args.steps}",
           "--quiet", "--cpu"]
    if args.heldout_attack_steps:
        cmd += ["--heldout-attack-steps", str(args.heldout_attack_steps)]
    for item in args.set:
        cmd += ["--set", item]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"{preset} seed {seed} failed:\n{proc.stderr[-3000:]}")
    done = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    done = [e for e in done if e["event"] == "done"][-1]
    held = done["gate_separation_heldout"]
    return {"preset": preset, "seed": seed, "seconds": round(time.time() - t0, 1),
            "in_sample_auroc": done["gate_separation_train"]["auroc"],
            "in_sample_gap": (done["gate_separation_train"]["mean_gate_perturbed"]
                              - done["gate_separation_train"]["mean_gate_clean"]),
            "heldout": {k: {"auroc": v["auroc"], "gap": v["mean_gate_perturbed"] - v["mean_gate_clean"]}
                        for k, v in held["attacks"].items()},
            "final": done["final"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: every Stage-1 data preset (quick: pgd_2 mixed)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--heldout-attack-steps", type=int, default=0, help="0: the presets' own (ACE 150, PGD 50)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the CLI (e.g. lambda_gate=10)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: presets pgd_2 and mixed, 2 steps, 2 + 2 images of 32 px, 2 held-out attack steps")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**QUICK)
    args = ap.parse_args(argv)

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable()
    from lord_ops.train_config import STAGE1_DATA_PRESETS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "v1-5-pruned-emaonly-fp16.safetensors"
    if not ckpt.exists():
        from tools import tiny

        tiny.write_sd15_geometry_checkpoint(ckpt)
    synthetic_images(out / "train", args.train, args.size, 1, "a photo")
    synthetic_images(out / "heldout", args.heldout, args.size, 2, "a photo")
    rows = []
    for seed in args.seeds:  # every preset once before the next seed
        for preset in args.presets or list(STAGE1_DATA_PRESETS):
            row = run_one(args, ckpt, preset, seed, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = "results" + "".join(f"_{x.replace('=', '')}" for x in args.set) + ".json"
    (out / name).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    attacks = sorted({a for r in rows for a in r["heldout"]})
    print("\n| preset | seed | in-sample AUROC | " + " | ".join(f"held-out AUROC {a}" for a in attacks) + " | s |")
    print("|---|---|---|" + "---|" * len(attacks) + "---|")
    for r in rows:
        print(f"| {r['preset']} | {r['seed']} | {r['in_sample_auroc']:.2f} | "
              + " | ".join(f"{r['heldout'][a]['auroc']:.2f}" for a in attacks) + f" | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
