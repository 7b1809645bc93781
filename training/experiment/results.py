"""An experiment's ``results.json``: the methods' metrics, the sweep, detection, the perturbation and
the provenance (checkpoint, versions, config, seeds, every stage's key digest)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from lord_ops import tool_version
from lord_ops.metrics import perturbation_stats
from training.experiment_config import METHODS, SWEEP_SERIES, train_config
from training.experiment.context import ExperimentContext
from training.experiment.methods import PURIFIED_SETS, Variant

RESULTS_FORMAT, RESULTS_VERSION = "comfyui-lord-experiment", 1
SINGLE_RUN_NOTE = ("one training run per method: a difference between two rows includes the seed-to-seed spread "
                   "of training, which on the lab model is as large as the attack's effect. Whether a defense "
                   "undoes the attack's damage is a question for independent replicates with paired differences "
                   "and intervals: python -m lab.evidence (EVIDENCE.md)")


def method_metrics(ctx: ExperimentContext, vid: str) -> dict:
    """The metrics of Stage-2 run ``vid``: its samples' scores and, when measured, its held-out loss."""
    out = dict(ctx.plan.result(f"score/{vid}"))
    if f"heldout/{vid}" in ctx.plan.stages:
        out.update(ctx.plan.result(f"heldout/{vid}"))
    return out


def collect_results(ctx: ExperimentContext, sweep_points: dict, report_dir: Path) -> dict:
    """The experiment's ``results.json`` (every stage must be done); sample paths relative to ``report_dir``."""
    exp = ctx.exp
    rel = lambda p: os.path.relpath(p, report_dir)  # noqa: E731
    methods = {}
    for row, m in enumerate(exp.methods):
        label, mode, images = METHODS[m]
        variant = Variant(mode, images)
        vid = variant.id
        sample = ctx.plan.result(f"sample/{vid}")
        methods[m] = {"label": label, "row": row, "id": vid, "stage2_mode": variant.stage2_mode,
                      "lord": variant.lord == "stage1", "one_branch": mode == "onebranch",
                      "gates": dict(zip(("training", "sampling"), variant.gates)) if variant.lord else None,
                      "defense_strength": ctx.sampling_strength(variant) if variant.lord == "stage1" else None,
                      "trained_on": ("{}({})".format(*PURIFIED_SETS[images]) if images in PURIFIED_SETS else images),
                      "samples": [rel(ctx.plan.folder(f"sample/{vid}") / f) for f in sample["images"]],
                      "metrics": method_metrics(ctx, vid),
                      "train": ctx.plan.result(f"train/{variant.train_id}")}
    sweep = None
    if sweep_points:
        sweep = {"shares": list(exp.sweep_shares), "labels": dict(SWEEP_SERIES),
                 "series": {s: [{**p, "metrics": method_metrics(ctx, p['method'])} for p in points]
                            for s, points in sweep_points.items()}}
    detection = {"available": False, "missing": "needs the clean originals ([subject] instance_images)"}
    if "detect" in ctx.plan.stages:
        d = ctx.plan.result("detect")
        detection = {"available": True, "attack": exp.attack_preset if exp.mode == "protocol" else "given",
                     "summary": d["summary"], "scores_clean": d["scores_clean"],
                     "scores_protected": d["scores_protected"], "names": d["names"], "timestep": d["timestep"]}
    perturbation = None
    if ctx.clean:
        prot = ctx.protected()
        per = [{"name": n, **perturbation_stats(ctx.clean[n].permute(1, 2, 0), prot[n].permute(1, 2, 0))}
               for n in ctx.names]
        keys = [k for k in per[0] if k != "name"] if per else []
        perturbation = {"attack": ctx.plan.result("protect")["attack"] if exp.mode == "protocol" else "given",
                        "per_image": per,
                        "mean": {k: float(sum(p[k] for p in per) / len(per)) for k in keys}}
    metrics = copy.deepcopy(ctx.metrics)
    for k, v in metrics.items():
        if k in ("clip_iqa",) and v["available"]:
            v["weights"] = {"path": str(exp.metrics.clip_iqa_weights), "sha256": ctx.digests(exp.metrics.clip_iqa_weights)}
        if k in ("fid", "kid") and v["available"]:
            v["weights"] = {"path": str(exp.metrics.inception_weights), "sha256": ctx.digests(exp.metrics.inception_weights)}
        if k in ("fd", "kd"):
            v["weights"] = {"path": str(exp.metrics.extractor_weights), "sha256": ctx.digests(exp.metrics.extractor_weights)}
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "mode": exp.mode,
            "subject": {"class_name": exp.class_name, "instance_prompt": exp.prompt, "instance_images": len(ctx.names),
                        "paper_dataset": exp.paper_dataset, "resolution": exp.resolution},
            "metrics": metrics, "methods": methods, "sweep": sweep, "detection": detection,
            "perturbation": perturbation, "provenance": provenance(ctx),
            "single_run_note": SINGLE_RUN_NOTE}


def provenance(ctx: ExperimentContext) -> dict:
    """Checkpoint, versions, config, seeds, attack, Stage-1 and every stage's key digest."""
    exp = ctx.exp
    stage1 = ctx.plan.result("stage1") if "stage1" in ctx.plan.stages else {
        "lord": str(exp.stage1_lord), "sha256": ctx.digests(exp.stage1_lord)} if exp.stage1_lord is not None else {
        "not_run": "no method uses the LoRD"}
    return {"checkpoint": {"path": str(exp.checkpoint), "sha256": ctx.ckpt_sha}, "versions": versions(),
            "config": _jsonable(dataclasses.asdict(exp)), "seeds": {
                "experiment": exp.seed, "attack": exp.attack_seed, "sampling": exp.sampling.seed,
                "detection": exp.detection_seed, "stage1": train_config(exp, "stage1").seed,
                "stage2": train_config(exp, "stage2").seed},
            "attack": ctx.plan.result("protect")["attack"] if exp.mode == "protocol" else {
                "given": str(exp.protected_images)},
            "stage1": stage1, "stages": {n: ctx.plan.full_digest(n) for n in ctx.plan.stages}}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def versions() -> dict:
    """Versions of the pack, torch, Python, ComfyUI and the metric libraries."""
    out = {"comfyui_lord": tool_version(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import comfyui_version

        out["comfyui"] = comfyui_version.__version__
    except ImportError:
        out["comfyui"] = "unknown"
    for name in ("open_clip", "torch_fidelity"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            out[name] = "not installed"
    return out
