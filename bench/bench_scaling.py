"""Scaling curves: how LoRD's cost over stock grows with resolution and batch size.

Model: the SD15-geometry test checkpoint (:func:`benchlib.test_checkpoint`: SD1.5's first-level UNet
geometry, 320 channels, 8 heads, context 768, random weights; its TAESD), fp32, for every point: the
860M-parameter sd15 geometry is too slow for a 768 px curve on a CPU. Two workloads, each reusing its
benchmark's machinery (same timing method, see those scripts):

* **sampling** -- :func:`bench_sampling.bench_model` with the variants ``lora`` (stock kohya LoRA) and
  ``lord_fused``; euler / normal, cfg 7.5, so a step is one UNet call on 2 x batch latents. Value: ms
  per step (the whole batch), median over rounds; ratio: median of per-round LoRD / LoRA ratios.
* **Stage-1 training** -- :mod:`bench_train`'s timing worker (a fresh process per point) with the
  variants ``core`` (core ComfyUI's Train LoRA node) and ``lord`` (``train_stage1``, targets ``attn``),
  rank 4, AdamW, fp32, no gradient checkpointing. Value: ms per training sample, median over rounds;
  ratio: median of per-round LoRD / core ratios.

Points: resolution at batch 1 (sampling 256, 384, 512, 768 px; training 256, 384, 512 px) and batch
size 1, 2, 4 at 256 px. Training stops at 512 px to keep the run near 15 min (see :func:`train_768_note`).

    make bench-scaling    # the defaults, about 11 min on 2 CPU cores (estimate, not a measured run)
    python -m bench.bench_scaling [--quick] [--workloads sampling,training] [--steps N] [--repeats R]
                                  [--work DIR] [--json PATH] [--md PATH] [--png PATH]

Writes ``docs/bench/scaling.png`` and its own section of ``BENCHMARKS.md`` (between the
``bench_scaling`` markers) unless ``--quick`` (a smoke run: 64 and 96 px, batch 1 and 2 at 64 px,
1 step x 1 round; no markdown, no PNG unless ``--md`` / ``--png`` name files) or ``--md ''`` /
``--png ''``.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import tempfile
import time

from bench import bench_sampling as S
from bench import bench_train as T
from bench import benchlib as B
from bench.benchlib import log

MARK_START, MARK_END = "<!-- bench_scaling:start -->", "<!-- bench_scaling:end -->"
MODEL = "ckpt"
PNG = B.ROOT / "docs" / "bench" / "scaling.png"
WORKLOADS = ("sampling", "training")
# (px, batch) -> (steps per timed run, rounds); chosen to keep the whole run under ~15 min on 2 cores
SAMPLING_RUNS = {(256, 1): (2, 3), (384, 1): (1, 3), (512, 1): (1, 3), (768, 1): (1, 3),
                 (256, 2): (1, 3), (256, 4): (1, 3)}
TRAINING_RUNS = {(256, 1): (2, 3), (384, 1): (1, 2), (512, 1): (1, 2), (256, 2): (2, 2), (256, 4): (1, 2)}
BATCH_PX = 256
QUICK_RUNS = {(64, 1): (1, 1), (96, 1): (1, 1), (64, 2): (1, 1)}
QUICK_BATCH_PX = 64
STOCK = {"sampling": "stock LoRA", "training": "core Train LoRA"}
LORD = {"sampling": "fused LoRD", "training": "Stage-1 LoRD"}
UNIT = {"sampling": "ms/step", "training": "ms/sample"}


def train_768_note(points: list) -> str:
    """Why Stage-1 training has no 768 px point, with this run's 512 px cost when measured."""
    at512 = next((p for p in points if p["workload"] == "training" and (p["px"], p["batch"]) == (512, 1)
                  and "error" not in p), None)
    cost = (f"costs {at512['lord_ms'] / 1e3:.1f} s per sample (core {at512['stock_ms'] / 1e3:.1f} s) in this run; "
            if at512 else "")
    return ("Stage-1 training has no 768 px point: at 512 px LoRD's Stage-1 step on this model " + cost +
            "768 px has 2.25x the pixels and about 5x the attention work (squared token count), so the point would "
            "take several minutes with its warm-up and PGD-2 data, past this benchmark's ~15 min budget on 2 cores "
            "(an estimate, not measured; run `python -m bench.bench_train --configs ckpt:768` for it).")


# ----------------------------------------------------------------------------------------------
# Measuring


def sampling_points(runs: dict, args, work: str) -> list[dict]:
    """All sampling points in one process (one model build): :func:`bench_sampling.bench_model`."""
    points = [S.Point(px, args.steps or st, args.repeats or rd, batch) for (px, batch), (st, rd) in runs.items()]
    rows = S.bench_model(MODEL, points, args.max_other_cpu, log, variants=("lora", "lord_fused"), work=work)
    by = {(r["px"], r["batch"], r["variant"]): r for r in rows}
    out = []
    for p in points:
        stock, lord = by[(p.px, p.batch, "lora")], by[(p.px, p.batch, "lord_fused")]
        out.append({"workload": "sampling", "px": p.px, "batch": p.batch, "steps": p.steps, "rounds": p.repeats,
                    "stock_ms": stock["median_ms"], "lord_ms": lord["median_ms"],
                    "stock_runs_ms": stock["runs_ms"], "lord_runs_ms": lord["runs_ms"],
                    "ratio": lord["vs_lora"], "ratio_min": lord["vs_lora_min"], "ratio_max": lord["vs_lora_max"],
                    "discarded": stock["discarded"] + lord["discarded"],
                    "other_cores": max(stock["other_cores"] + lord["other_cores"]),
                    "rel_diff_1step": lord["rel_diff_1step"]})
    return out


def training_point(px: int, batch: int, steps: int, rounds: int, args, work: str) -> dict:
    """One Stage-1 point in a fresh process: :mod:`bench_train`'s timing worker, core vs lord."""
    argv = ["--batch", batch, "--work", work, "--max-other-cpu", args.max_other_cpu, "--retries", args.retries,
            "--quiet-timeout", args.quiet_timeout] + (["--stock-malloc"] if args.stock_malloc else [])
    _, targs = T.parse_args([str(a) for a in argv])
    t = T.run_worker("time", targs, MODEL, px, "off", "core,lord", steps, rounds)
    base = {"workload": "training", "px": px, "batch": batch, "steps": steps, "rounds": rounds, "rank": targs.rank}
    if "error" in t:
        return {**base, "error": t["error"]}
    return {**base, "stock_ms": 1e3 * t["median"]["core"], "lord_ms": 1e3 * t["median"]["lord"],
            "stock_runs_ms": [1e3 * x for x in t["runs"]["core"]], "lord_runs_ms": [1e3 * x for x in t["runs"]["lord"]],
            "ratio": t["ratio"]["lord"], "ratio_min": t["ratio_min"]["lord"], "ratio_max": t["ratio_max"]["lord"],
            "discarded": t["discarded"], "other_cores": max(x for v in t["other_cores"].values() for x in v),
            "images": t["images"], "pgd_s_per_image": t["pgd_s_per_image"], "desc": t["desc"], "malloc": t["malloc"]}


# ----------------------------------------------------------------------------------------------
# Report


def series(points: list, workload: str, batch_px: int) -> tuple[list, list]:
    """(resolution curve at batch 1, batch curve at ``batch_px``) of ``workload``'s measured points."""
    ok = [p for p in points if p["workload"] == workload and "error" not in p]
    res = sorted((p for p in ok if p["batch"] == 1), key=lambda p: p["px"])
    bat = sorted((p for p in ok if p["px"] == batch_px), key=lambda p: p["batch"])
    return res, bat


def table(points: list) -> str:
    lines = [("| workload | size | batch | stock | LoRD | unit | LoRD / stock (median of rounds) | min - max over "
              "rounds | per batch element, stock / LoRD | runs |"), "|---|---|---:|---:|---:|---|---:|---|---|---|"]
    for p in points:
        head = f"| {p['workload']} | {p['px']} px | {p['batch']} |"
        if "error" in p:
            lines.append(f"{head} | | | failed: {p['error']} | | | |")
            continue
        per = (f"{p['stock_ms'] / p['batch']:.0f} / {p['lord_ms'] / p['batch']:.0f}" if p["workload"] == "sampling"
               else "(already per sample)")
        what = "step" if p["workload"] == "sampling" else "timed step"
        what = f"{what}{'s' * (p['steps'] != 1)} per {'run' if p['workload'] == 'sampling' else 'call'}"
        lines.append(f"{head} {p['stock_ms']:.0f} | {p['lord_ms']:.0f} | {UNIT[p['workload']]} | **{p['ratio']:.3f}x** | "
                     f"{p['ratio_min']:.3f} - {p['ratio_max']:.3f} | {per} | {p['rounds']} rounds x {p['steps']} {what} |")
    return "\n".join(lines)


def reading(points: list, batch_px: int) -> str:
    parts = []
    for w in WORKLOADS:
        res, bat = series(points, w, batch_px)
        name = "sampling (fused LoRD / stock LoRA per step)" if w == "sampling" else "Stage-1 training (LoRD / core per sample)"
        bits = []
        if res:
            bits.append("by resolution at batch 1: " + ", ".join(f"{p['px']} px {p['ratio']:.3f}x" for p in res))
        if bat:
            bits.append(f"by batch at {batch_px} px: " + ", ".join(f"batch {p['batch']} {p['ratio']:.3f}x" for p in bat))
        if bits:
            parts.append(f"{name}: " + "; ".join(bits))
    return (". ".join(parts) + ". The spread over rounds is shown as min - max; with 2-3 rounds a difference "
            "smaller than that spread is not a trend. A ratio that falls as size or batch grows points to a fixed "
            "per-call cost (LoRD's hooks), one that stays or rises to a cost that grows with the activations.")


def plot(points: list, batch_px: int, path: pathlib.Path) -> None:
    """Four panels: cost and LoRD / stock ratio (median, min - max bars) vs resolution and vs batch.
    Agg canvas without pyplot; deterministic (no software stamp)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter

    fig = Figure(figsize=(11, 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = {"sampling": "tab:blue", "training": "tab:red"}
    for col, (kind, xkey, xlabel) in enumerate((("res", "px", "image size (px), batch 1"),
                                                ("bat", "batch", f"batch size at {batch_px} px"))):
        cost, ratio = axes[0][col], axes[1][col]
        for w in WORKLOADS:
            res, bat = series(points, w, batch_px)
            pts = res if kind == "res" else bat
            if not pts:
                continue
            x = [p[xkey] for p in pts]
            # per batch element, so the batch panel shows what batching saves per image
            per = [p["batch"] if w == "sampling" else 1 for p in pts]
            unit = "ms/step per latent" if w == "sampling" else "ms/sample"
            cost.plot(x, [p["stock_ms"] / b for p, b in zip(pts, per)], "o--", color=colors[w],
                      label=f"{w}: {STOCK[w]} ({unit})")
            cost.plot(x, [p["lord_ms"] / b for p, b in zip(pts, per)], "s-", color=colors[w],
                      label=f"{w}: {LORD[w]} ({unit})")
            r = [p["ratio"] for p in pts]
            err = [[p["ratio"] - p["ratio_min"] for p in pts], [p["ratio_max"] - p["ratio"] for p in pts]]
            ratio.errorbar(x, r, yerr=err, fmt="o-", color=colors[w], capsize=4,
                           label=f"{w}: {LORD[w]} / {STOCK[w]}")
        cost.set_yscale("log")
        cost.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cost.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        cost.set_ylabel("ms (log scale)")
        cost.set_title(f"cost vs {'resolution' if kind == 'res' else 'batch size'}")
        ratio.axhline(1.0, color="grey", lw=0.8)
        ratio.set_ylabel("LoRD / stock (median, min - max over rounds)")
        ratio.set_title(f"overhead vs {'resolution' if kind == 'res' else 'batch size'}")
        for ax in (cost, ratio):
            ax.set_xlabel(xlabel)
            xs = sorted({p[xkey] for w in WORKLOADS for p in (series(points, w, batch_px)[col])})
            if xs:
                ax.set_xticks(xs)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.suptitle("LoRD vs stock, SD15-geometry test checkpoint UNet (CPU)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def write_markdown(path: pathlib.Path, points, skipped, facts, args, png, batch_px: int) -> None:
    runs = "; ".join(f"{p['workload']} {p['px']} px batch {p['batch']}: {p['rounds']} rounds x {p['steps']} "
                     f"{'' if p['workload'] == 'sampling' else 'timed '}step{'s' * (p['steps'] != 1)}" for p in points)
    desc = next((p["desc"] for p in points if "desc" in p), "SD15-geometry test checkpoint UNet, fp32; its TAESD")
    discarded = sum(p.get("discarded", 0) for p in points)
    contended = max((p["other_cores"] for p in points if "other_cores" in p), default=0.0)
    if png:
        rel = os.path.relpath(png, path.resolve().parent).replace(os.sep, "/")
        figure = [f"![LoRD vs stock: cost and overhead vs resolution and batch size]({rel})", ""]
    else:
        figure = []
    body = "\n".join([
        MARK_START, "## Scaling: LoRD's overhead vs resolution and batch size (bench/bench_scaling.py)", "",
        *B.header_lines(facts),
        (f"Model: {desc} (`benchlib.test_checkpoint`: SD1.5's first-level UNet geometry, 320 channels, 8 heads, "
         "context 768; random weights) for every point; the 860M-parameter sd15 geometry is too slow for a 768 px "
         "curve on a CPU.  "),
        ("Sampling: `bench_sampling.bench_model`, stock LoRA vs fused LoRD (rank 4 on all attention projections), "
         "euler/normal, cfg 7.5, so a step is one UNet call on 2 x batch latents; value = ms per step for the "
         "whole batch (median over rounds). Training: `bench_train`'s timing worker, core Train LoRA vs Stage-1 "
         f"LoRD (`attn` targets), rank {next((p['rank'] for p in points if 'rank' in p), 4)}, AdamW, fp32, no "
         "gradient checkpointing, "
         "max(2, batch) training images; value = ms per training sample (median over rounds). Ratios are medians "
         "of per-round LoRD / stock ratios (variants interleaved); timing method as in those sections.  "),
        (f"Runs: {runs}. Runs disturbed by other processes (>= {args.max_other_cpu} cores) redone: {discarded}; "
         f"most CPU used by other processes during a kept run: {contended:.2f} cores.  "),
        "", table(points), "", *figure,
        reading(points, batch_px) + (" " + train_768_note(points) if any(p["workload"] == "training" for p in points)
                                     and not args.quick else "")
        + "".join(f" Skipped: {s}." for s in skipped), MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    B.import_comfy()
    ap = B.new_parser(__doc__, quick="smoke run: 64/96 px, batch 1/2 at 64 px, 1 step x 1 round, no markdown/PNG",
                      steps="steps per timed run / timed optimizer steps per call, for every point (default per point)",
                      repeats="rounds, for every point (default per point: 2-3)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of sampling,training (default both)")
    ap.add_argument("--work", default=None, help="folder for the test checkpoint and PGD caches (default: a temp dir)")
    B.add_machine_args(ap)
    B.add_output_args(ap)
    ap.add_argument("--png", default=None, help=f"figure path ('' to skip; default {PNG.relative_to(B.ROOT)}, "
                                                "none with --quick)")
    args = ap.parse_args(argv)
    workloads = args.workloads.split(",")
    if set(workloads) - set(WORKLOADS):
        ap.error(f"unknown workloads: {', '.join(sorted(set(workloads) - set(WORKLOADS)))}")
    start = time.time()
    facts = B.machine_facts("bench-scaling")
    facts["malloc"] = "stock" if args.stock_malloc else B.pinned_malloc()  # this process: sampling
    log(json.dumps(facts))
    batch_px = QUICK_BATCH_PX if args.quick else BATCH_PX
    own_work = args.work is None
    work = args.work or tempfile.mkdtemp(prefix="bench_scaling_")
    points, skipped = [], []
    try:
        if "training" in workloads:  # first: fresh worker processes while this one is still small
            for (px, batch), (steps, rounds) in (QUICK_RUNS if args.quick else TRAINING_RUNS).items():
                p = training_point(px, batch, args.steps or steps, args.repeats or rounds, args, work)
                points.append(p)
                if "error" in p:
                    skipped.append(f"training {px} px batch {batch}: {p['error']}")
                log(f"[training {px}px batch {batch}] " + (p.get("error") or
                    f"core {p['stock_ms']:.0f}, lord {p['lord_ms']:.0f} ms/sample, ratio {p['ratio']:.3f}x"))
        if "sampling" in workloads:
            points += sampling_points(QUICK_RUNS if args.quick else SAMPLING_RUNS, args, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    points.sort(key=lambda p: (WORKLOADS.index(p["workload"]), p["batch"] != 1, p["px"], p["batch"]))
    facts["loadavg_end"] = os.getloadavg()[0]
    facts["total_min"] = (time.time() - start) / 60
    print(table(points))
    print(reading(points, batch_px))
    png = args.png if args.png is not None else ("" if args.quick else str(PNG))
    if png:
        plot(points, batch_px, pathlib.Path(png))
        log(f"wrote {png}")
    B.finish(args, lambda path: write_markdown(path, points, skipped, facts, args, png, batch_px),
             {"facts": facts, "points": points, "skipped": skipped})


if __name__ == "__main__":
    main()
