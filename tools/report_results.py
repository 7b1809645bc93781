"""A complete synthetic experiment ``results`` dict for the report writer (``training.report``):
six methods with sample PNGs written under the report folder, a sweep (``fig7.png``), detection
(``roc.png``), perturbation statistics and provenance. Test data shared by ``tests/test_report.py``
(the writer's files) and ``tests/test_browser.py`` (the page in Chromium); kept here rather than in
a test module because test modules are not importable by name (pytest's ``--import-mode=importlib``,
and ComfyUI's own ``tests`` package may come first on ``sys.path``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["METHODS", "make_results"]

METHODS = [  # id, label, trained_on, lord, clip mean, clip std, fid, kid mean, kid std
    ("clean", "Clean", "clean", False, 0.6123, 0.0456, 80.123, 0.01234, 0.0021),
    ("attacking", "Attacking", "protected", False, 0.3011, 0.0702, 160.456, 0.0456, 0.0052),
    ("pgd2", "PGD-2 defense", "protected", False, 0.4004, 0.051, 140.0, 0.03, 0.004),
    ("jpeg", "JPEG (q=75)", "jpeg(protected)", False, 0.45, 0.06, 120.5, 0.025, 0.003),
    ("diffpure", "DiffPure-style", "diffpure(protected)", False, 0.5, None, 110.0, 0.02, 0.002),
    ("lord", "LoRD", "protected", True, 0.5556, 0.0333, 95.999, 0.015, 0.0015),
]


def _samples(root: Path, mid: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rel = f"images/{mid}/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / rel)
        out.append(rel)
    return out


def make_results(root: Path, *, fid=True, sweep=True, detection=True, artist=False, paper_dataset="CelebA-HQ",
                 n_samples=5) -> dict:
    metrics = {
        "clip_iqa": {"label": "CLIP-IQA", "available": True, "higher_is_better": True, "backbone": "RN50",
                     "weights": {"path": "/w/clip_rn50.pt", "sha256": "c" * 64}},
        "fid": ({"label": "FID", "available": True, "higher_is_better": False,
                 "weights": {"path": "/w/pt_inception.pth", "sha256": "f" * 64}} if fid else
                {"label": "FID", "available": False, "higher_is_better": False,
                 "missing": "no Inception weights: set metrics.inception_weights"}),
        "kid": {"label": "KID", "available": True, "higher_is_better": False,
                "weights": {"path": "/w/pt_inception.pth", "sha256": "f" * 64}},
    }
    methods = {}
    rows = [m for m in METHODS if not (artist and m[0] == "clean")]
    for row, (mid, label, trained, lord, cm, cs, fv, km, ks) in enumerate(rows):
        mm = {"clip_iqa": {"mean": cm, "per_image": [cm] * n_samples}, "kid": {"mean": km, "std": ks}}
        if cs is not None:
            mm["clip_iqa"]["std"] = cs
        mm["fid"] = {"value": fv}
        entry = {"label": label, "row": row, "trained_on": trained, "stage2_mode": "plain", "lord": lord,
                 "samples": _samples(root, mid, n_samples if mid != "attacking" else 18, row), "metrics": mm}
        methods[mid] = entry
    if not fid:  # the runner put a stray value next to an unavailable metric: it must never be shown
        methods["lord"]["metrics"]["fid"] = {"value": 777.77}
    res = {
        "format": "comfyui-lord-experiment", "version": 1, "mode": "artist" if artist else "protocol",
        "subject": {"class_name": "person", "instance_prompt": "a photo of sks person", "instance_images": 4,
                    "paper_dataset": None if artist else paper_dataset},
        "metrics": metrics, "methods": methods,
        "sweep": None, "detection": {"available": False, "missing": "no held-out images: set detection.heldout"},
        "perturbation": {"attack": {"preset": "mist_v2", "epsilon_levels": 8},
                         "per_image": [{"name": "a.png", "psnr_db": 35.123, "ssim": 0.91234, "linf_levels": 8,
                                        "l2_levels": 512.3},
                                       {"name": "b.png", "psnr_db": float("inf"), "ssim": 1.0, "linf_levels": 0,
                                        "l2_levels": 0.0}],
                         "mean": {"psnr_db": 35.123, "ssim": 0.95617, "linf_levels": 4}},
        "provenance": {"checkpoint": {"path": "/ckpt/v1-5-pruned-emaonly.safetensors", "sha256": "ab12" * 16},
                       "versions": {"comfyui-lord": "0.4.0", "torch": "2.14.1"},
                       "config": {"steps": 30, "attack": {"preset": "mist_v2"}},
                       "seeds": {"sampling": 1234, "training": 0}, "stage1": {"lord": "lord_sd15.safetensors", "gate_separation_train": {"by_timestep": {
                           "50": {"auroc": 0.95, "mean_gate_clean": 0.2, "mean_gate_perturbed": 0.8},
                           "400": {"auroc": 0.8, "mean_gate_clean": 0.41, "mean_gate_perturbed": 0.62}}}}},
    }
    if sweep:
        def pts(kind, ids):
            return [{"share": s, "method": mid} for s, mid in zip((0, 0.5, 1.0), ids)]
        res["sweep"] = {"shares": [0, 0.5, 1.0],
                        "series": {"plain": pts("plain", ["clean", "jpeg", "attacking"]) if not artist else
                                   [{"share": 0.5, "method": "x", "metrics": {"clip_iqa": {"mean": 0.4, "std": 0.1},
                                                                             "fid": {"value": 130.0}}}],
                                   "lord": [{"share": s, "method": "lord",
                                             "metrics": {"clip_iqa": {"mean": 0.55 - 0.01 * s, "std": 0.02},
                                                         "fid": {"value": 95.0 + s}}} for s in (0, 0.5, 1.0)]}}
    if detection:
        res["detection"] = {"available": True, "attack": "mist_v2", "fpr_target": 0.05,
                            "summary": {"auroc": 0.875, "negatives": 4, "positives": 4,
                                        "roc": {"fpr": [0, 0, 0.25, 0.5, 1], "tpr": [0, 0.5, 0.75, 1, 1],
                                                "thresholds": [float("inf"), 0.9, 0.6, 0.4, 0.1]},
                                        "at_fpr": {"threshold": 0.9, "fpr": 0.0, "tpr": 0.5}},
                            "scores_clean": [0.1, 0.2, 0.4, 0.6], "scores_protected": [0.4, 0.6, 0.9, 0.95]}
    return res
