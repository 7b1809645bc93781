"""The memory check's estimate against the measured peak of real training runs.

Each configuration runs in a fresh subprocess: the model is loaded (and made differentiable), the
Stage-1 perturbation cache filled, then one real training call of ``--steps`` optimizer steps
(``lord_ops.comfy.stages.train_stage1`` / ``train_stage2``, what the trainer nodes run; the memory
check on, ``evaluate=False``) runs under :class:`benchlib.PeakMemory`. Compared: the check's estimate
of what the run adds on its device on top of the loaded weights (``report["memory"]["needed_bytes"]``,
``lord_ops.memory.TrainingMemory.needed``) with the measured peak of that call (CPU: peak RSS minus
RSS before, Linux ``clear_refs``/``VmHWM``; CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocation before). Ratio = estimate / measured: >= 1 means the check never lets a run start that
then runs out of memory; the excess over 1 is the free memory it asks for beyond the real need.

No waiting for a quiet machine: a process's peak memory does not depend on other processes' CPU load.

Model: the SD15-geometry test checkpoint (:func:`benchlib.test_checkpoint`: SD1.5's first-level UNet
geometry, TAESD), random conditioning ``[1, 77, 768]``, 2 random images, fp32,
rank 4, ``attn`` targets. ``--quick``: the tiny SD1.x UNet + a random TAESD, one config (CI: the
script runs; not a measurement).

    make bench-memory                       # the defaults below (a few minutes on 2 CPU cores)
    python -m bench.bench_memory --quick    # CI smoke run, no Markdown
    python -m bench.bench_memory --configs ckpt:256:stage1:2:on:cached [--steps 2]

A config is ``model:px:stage:batch[:gc[:variant]]``: model ``ckpt``/``tiny``, stage ``stage1`` /
``stage2``, gradient checkpointing ``on``/``off``, variant ``cached`` (Stage 1, default), ``online``
(Stage 1 online perturbations), ``plain`` (Stage 2, default), ``prior`` (Stage 2 plain with 2 class
images). Writes its section of BENCHMARKS.md (between the ``bench_memory`` markers) unless ``--quick``
or ``--md ''``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

from bench import benchlib as B
from bench.benchlib import log

MARK_START, MARK_END = "<!-- bench_memory:start -->", "<!-- bench_memory:end -->"
DEFAULT_CONFIGS = ",".join([
    "ckpt:64:stage1:1", "ckpt:64:stage2:1", "ckpt:256:stage1:1", "ckpt:256:stage1:2", "ckpt:256:stage1:4",
    "ckpt:256:stage1:1:on", "ckpt:256:stage1:1:off:online", "ckpt:256:stage2:1", "ckpt:256:stage2:2",
    "ckpt:256:stage2:1:off:prior", "ckpt:512:stage1:1"])
QUICK_CONFIGS = "tiny:64:stage1:1"


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) < 4:
        raise ValueError(f"config {text!r}: expected model:px:stage:batch[:gc[:variant]]")
    stage = parts[2]
    variant = parts[5] if len(parts) > 5 else ("cached" if stage == "stage1" else "plain")
    if stage not in ("stage1", "stage2") or variant not in {"stage1": ("cached", "online"),
                                                            "stage2": ("plain", "prior")}[stage]:
        raise ValueError(f"config {text!r}: unknown stage or variant")
    return {"model": parts[0], "px": int(parts[1]), "stage": stage, "batch": int(parts[3]),
            "gc": (parts[4] if len(parts) > 4 and parts[4] else "off"), "variant": variant}


def label(c: dict) -> str:
    extra = [v for v in (c["variant"] if c["variant"] not in ("cached", "plain") else "",
                         "grad. ckpt" if c["gc"] == "on" else "") if v]
    return f"{c['model']} {c['px']} px, {c['stage']}, batch {c['batch']}" + "".join(f", {e}" for e in extra)


# ----------------------------------------------------------------------------------------------
# The worker (a fresh process per config)


def worker(args) -> dict:
    import torch

    import comfy.utils

    from lord_ops.comfy import data as cdata, grad, perturb, stages
    from lord_ops.train_config import TrainConfig

    comfy.utils.set_progress_bar_enabled(False)
    c = parse_config(args.config)
    work = pathlib.Path(args.work)
    if c["model"] == "ckpt":
        model, vae = B.test_checkpoint(work)
    else:
        model, vae = B.random_unet(c["model"]), B.random_vae("taesd")
    ctx = model.model.model_config.unet_config["context_dim"]
    g = torch.Generator().manual_seed(3)
    images = [B.smooth_image(c["px"], g)[0] for _ in range(args.images)]
    cond = [[torch.randn(1, 77, ctx, generator=g) * 0.5, {}]]
    class_images = [B.smooth_image(c["px"], g)[0] for _ in range(2)] if c["variant"] == "prior" else []
    data = cdata.TrainingData(images, [cond], [f"image {i}" for i in range(len(images))], class_images,
                              [cond] if class_images else [])
    common = dict(steps=args.steps, batch_size=c["batch"], gradient_checkpointing=c["gc"] == "on",
                  checkpoint_every=10 ** 9, seed=0)
    cache = work / f"pgd-{c['model']}-{c['px']}"
    if c["stage"] == "stage1":
        config = TrainConfig(stage="stage1", online_perturbations=c["variant"] == "online", **common)
        with torch.inference_mode():
            perturb.stage1_perturbations(model, vae, data, config, cache)  # fill the cache (outside the measurement)
        call = lambda: stages.train_stage1(model, vae, data, config, cache, evaluate=False)  # noqa: E731
    else:
        config = TrainConfig(stage="stage2", mode="plain", **common)
        call = lambda: stages.train_stage2(model, vae, data, config)  # noqa: E731
    grad.load_for_gradients(model, vae)
    mem = B.PeakMemory()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = call()
    wall = time.perf_counter() - t0
    measured = mem.result()
    est = out.report["memory"]
    res = {**c, "label": label(c), "steps": args.steps, "wall_s": wall, "measured": measured, "estimate": est,
           "ratio": est["needed_bytes"] / max(measured["delta_bytes"], 1),
           "desc": f"{B.params_m(model.model.diffusion_model):.1f}M-parameter UNet"}
    log(f"[{res['label']}] estimate {B.gib(est['needed_bytes'])}, measured {B.gib(measured['delta_bytes'])} "
        f"(x{res['ratio']:.2f}); probe {B.gib(est['activation_bytes'])}/sample, call {wall:.1f} s")
    return res


# ----------------------------------------------------------------------------------------------
# Report


def seen_factor(r: dict) -> float:
    """The allocator factor this run showed: (measured peak - the estimate's fixed parts but the workspace)
    / (the probe's activations x batch, or the online attack where larger)."""
    e = r["estimate"]
    raw = e["activations_total_bytes"] / e["factor"]
    fixed = e["needed_bytes"] - e["activations_total_bytes"] - e["workspace_bytes"]
    return (r["measured"]["delta_bytes"] - fixed) / max(raw, 1)


def table(rows: list) -> str:
    lines = ["| config | probe: activations per sample | estimate: activations x factor | estimate: needed on top of "
             "the loaded weights | measured peak | estimate / measured | factor seen |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r)} | failed: {r['error']} | | | | | |")
            continue
        e = r["estimate"]
        attack = f" (online attack {B.gib(e['attack_bytes'])})" if e.get("attack_bytes") else ""
        lines.append(f"| {r['label']} | {B.gib(e['activation_bytes'])}{attack} | {B.gib(e['activations_total_bytes'])} | "
                     f"{B.gib(e['needed_bytes'])} | {B.gib(r['measured']['delta_bytes'])} | **{r['ratio']:.2f}x** | "
                     f"{seen_factor(r):.2f} |")
    return "\n".join(lines)


def reading(rows: list) -> str:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "No config ran."
    ratios = [r["ratio"] for r in ok]
    under = [r["label"] for r in ok if r["ratio"] < 1.0]
    e = ok[0]["estimate"]
    big = [r for r in ok if r["px"] >= 256]
    if big:
        head = (f"Estimate / measured: **{min(r['ratio'] for r in big):.2f}x - {max(r['ratio'] for r in big):.2f}x** "
                f"at 256 px and more ({min(ratios):.2f}x - {max(ratios):.2f}x over all {len(ok)} configs; at 64 px "
                "the fixed workspace dominates a peak of a few tens of MiB)")
    else:
        head = f"Estimate / measured: {min(ratios):.2f}x - {max(ratios):.2f}x over {len(ok)} config(s)"
    seen = [seen_factor(r) for r in (big or ok)]
    return (head + (f"; **under 1 (the check would have missed)**: {', '.join(under)}" if under else
                    "; never under 1: no run the check lets start would have run out of memory")
            + f". The estimate = adapters + their gradients and AdamW state + latents + allocator factor "
              f"{e['factor']:g} x the probe's allocation peak x batch (or the online attack's, where larger) + "
              f"workspace {B.gib(e['workspace_bytes'])} ({e['device']}). Factor seen = (measured - the fixed parts "
              f"but the workspace) / (probe x batch): {min(seen):.2f} - {max(seen):.2f}"
              + (" at 256 px and more" if big else "") + ". On the CPU the peak RSS also holds freed activation "
              "blocks that glibc keeps in its heap (the factor's calibration, `lord_ops/memory.py`).")


def write_markdown(path: pathlib.Path, rows: list, facts: dict, args) -> None:
    method = next((r["measured"]["method"] for r in rows if "measured" in r), "n/a")
    probe = next((r["estimate"]["method"] for r in rows if "estimate" in r), "n/a")
    desc = next((r["desc"] for r in rows if "desc" in r), "")
    body = "\n".join([
        MARK_START, "## Memory check: estimate vs measured peak (bench/bench_memory.py)", "",
        *B.header_lines(facts),
        f"Model: the SD15-geometry test checkpoint ({desc}, TAESD; random weights), random conditioning, "
        f"{args.images} images, fp32, rank 4, `attn` targets, {args.steps} optimizer steps per call, one fresh "
        "process per row (model loaded and made differentiable, Stage-1 perturbation cache filled, before the "
        "measurement).  ",
        f"Estimate: the memory check of that same call (`report[\"memory\"][\"needed_bytes\"]`: what the run adds "
        f"on its device on top of the loaded weights; activations measured by the probe: {probe}). Measured: "
        f"{method}, over the whole training call (probe, encoding, steps).",
        "", table(rows), "", reading(rows), MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_CONFIGS}, no Markdown")
    ap.add_argument("--configs", default=None, help=f"comma list (default {DEFAULT_CONFIGS})")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per call (default 2)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the test checkpoint and caches (default: a temp dir)")
    B.add_output_args(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv=None) -> None:
    B.import_comfy()
    ap, args = parse_args(argv)
    if args.worker:
        B.emit_result(worker(args))
        return
    start = time.time()
    facts = B.machine_facts("bench-memory")
    log(json.dumps(facts))
    configs = (args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)).split(",")
    try:
        [parse_config(c) for c in configs]
    except ValueError as e:
        ap.error(str(e))
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="bench_memory_")
    rows = []
    try:
        for c in configs:
            argv_w = ["--worker", "--config", c, "--steps", args.steps, "--images", args.images, "--work", args.work]
            rows.append(B.run_worker(__file__, argv_w, {**parse_config(c), "label": c}))
            if "error" in rows[-1]:
                log(f"[{c}] {rows[-1]['error']}")
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    facts["loadavg_end"] = os.getloadavg()[0]
    facts["total_min"] = (time.time() - start) / 60
    print(table(rows))
    print()
    print(reading(rows))
    B.finish(args, lambda path: write_markdown(path, rows, facts, args), {"facts": facts, "rows": rows})


if __name__ == "__main__":
    main()
