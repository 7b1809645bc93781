"""Per-step sampling cost of LoRD vs a stock LoRA, in-process ComfyUI, random weights.

Variants (all on the same shared UNet, rank 4 on every attention projection; ``--variants`` picks some):
``base``, ``lora`` (stock kohya LoRA through ``comfy.sd.load_lora_for_models``), ``lord_plain`` and
``lord_fused`` (``patch.apply_lord`` with ``gate_mode="learned"``). Models: the tiny SD1.x UNet at 64 px
(latent 8x8) and a random UNet with the real SD1.5 geometry (860M parameters, fp32) at 256 and 512 px
(latent 32x32 and 64x64); ``ckpt``, the SD15-geometry test checkpoint (:func:`benchlib.test_checkpoint`),
on request (:mod:`bench_scaling` uses it). euler / normal, cfg 7.5, so every step is one UNet call on a
batch of 2 x ``--batch`` latents.

Goals (issue 13), checked per (model, size) at batch 1: fused LoRD <= 1.10x stock LoRA on the tiny UNet
at 64 px, <= 1.03x on the sd15 geometry at 256 and 512 px; other points are reported without a goal.

Method. Each variant is warmed up once (a 1-step sample). Then R rounds run every variant once,
round-robin, with the start rotated each round. Before each timed run the variant is loaded with
``comfy.model_management.load_models_gpu([model])`` outside the timer, so ComfyUI's one-off
weight patching / unpatching (and LoRD hook injection) on a variant switch is excluded. The timer
(``time.perf_counter``) then covers one ``comfy.sample.sample`` call of N steps, i.e. the steps plus
ComfyUI's small per-call setup; a run's value is that time / N. Reported: the median over the R runs,
in milliseconds per step, and ratios vs ``base`` and vs ``lora`` as the median over rounds of the
ratio within a round (paired runs seconds apart cancel the slow drift of a shared machine), with the
min - max of the per-round ratio vs ``lora`` as a noise gauge. Runs use
``torch.inference_mode()`` like ComfyUI's executor. For shared machines, each timed run first waits
until other processes are quiet, and a run during which they used >= ``--max-other-cpu`` cores (read
from /proc/stat) is discarded and retried; the number of discarded runs is reported. Unless
``--stock-malloc``, glibc is told not to use mmap and never to trim the heap (:func:`pinned_malloc`),
which removes a page-fault artefact of oneDNN convolutions on CPU (with a 2 GiB trim threshold the
SD1.5 UNet at 512 px still page-faulted ~2.6e6 times per step in every variant, ~10 GB of zeroed pages
a step); page faults per step are reported.

    make bench    # the defaults, about 11 min on 2 CPU cores (estimate)
    python -m bench.bench_sampling [--quick] [--models tiny,sd15] [--sizes PX,...] [--variants V,...]
                                   [--batch B] [--steps N] [--repeats R] [--json PATH] [--md PATH]

Writes its own section of ``BENCHMARKS.md`` (between the ``bench_sampling`` markers) unless
``--quick`` (a smoke run, tiny model only) or ``--md ''``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from typing import NamedTuple

from bench import benchlib as B
from bench.benchlib import pinned_malloc

import torch

from lord_ops.comfy import patch

VARIANTS = ("base", "lora", "lord_plain", "lord_fused")
MARK_START, MARK_END = "<!-- bench_sampling:start -->", "<!-- bench_sampling:end -->"
CFG = 7.5


class Model(NamedTuple):
    build: object  # build(work folder) -> MODEL
    context: int  # context_dim of the conditioning
    sizes: tuple  # default image sizes (px)
    runs: dict  # px -> default (steps, repeats); other sizes take the nearest size's


# chosen to keep the default full run (tiny 64 px, sd15 256 and 512 px) near 11 min on a 2-core CPU
MODELS = {
    "tiny": Model(lambda work: B.random_unet("tiny"), 64, (64,), {64: (20, 12), 256: (20, 12)}),
    "sd15": Model(lambda work: B.random_unet("sd15"), 768, (256, 512), {256: (2, 10), 512: (1, 6)}),
    "ckpt": Model(lambda work: B.test_checkpoint(work)[0], 768, (256,), {256: (4, 4)}),
}
MODEL_NAMES = {**B.UNET_NAMES, "ckpt": "SD15-geometry test checkpoint UNet (SD1.5's first level, 320 channels, 8 heads)"}
# issue 13: fused LoRD / stock LoRA at most this, per (model, px), at batch 1
GOALS = {("tiny", 64): 1.10, ("sd15", 256): 1.03, ("sd15", 512): 1.03}


class Point(NamedTuple):
    """One measured configuration of a model: image size, steps per timed run, rounds, latent batch."""
    px: int
    steps: int
    repeats: int
    batch: int = 1


def default_runs(model: str, px: int) -> tuple:
    """(steps, repeats) of ``model`` at ``px``: its own default, else that of its nearest default size."""
    runs = MODELS[model].runs
    return runs[min(runs, key=lambda s: (abs(s - px), s))]


def stock_lora(model, lord, seed: int = 2):
    """A kohya LoRA with LoRD's rank, alpha and down weights and random up weights, loaded the stock way."""
    import comfy.sd

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, w in lord.targets.items():
        sd[f"{name}.lora_down.weight"] = w.down.clone()
        sd[f"{name}.lora_up.weight"] = torch.randn(w.up.shape, generator=g) * 0.05
        sd[f"{name}.alpha"] = torch.tensor(float(w.alpha))
    patched = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)[0]
    assert len(patched.patches) == len(lord.targets), "stock LoRA did not patch every target"
    return patched


def hooked_modules(patcher) -> int:
    return sum(bool(m._forward_hooks) for m in patcher.model.diffusion_model.modules())


def timed_sample(model, steps: int, inputs, expect_hooks: int, max_other: float = float("inf")) -> dict:
    """One ``sample`` call of ``steps`` steps; ``model`` is loaded untimed first. An attempt during
    which other processes used >= ``max_other`` cores is discarded and retried (at most 5 times) once
    the machine is quiet. Returns seconds ``s``, the output, other-process cores, retries and minor
    page faults (``minflt``, a sign of allocator churn)."""
    import comfy.model_management as mm
    import comfy.sample

    noise, positive, negative, latent = inputs

    def load():
        mm.load_models_gpu([model])
        assert mm.current_loaded_models[0].model is model
        assert hooked_modules(model) == expect_hooks, (hooked_modules(model), expect_hooks)

    run = B.quiet_run(lambda: comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive, negative,
                                                  latent, disable_pbar=True),
                      max_other, retries=5, quiet_timeout=600.0, prepare=load)
    return {"s": run["s"], "out": run["result"], "other": run["other"], "retries": run["redone"],
            "minflt": run["minflt"]}


def make_variant(v: str, base, lord):
    """Variant ``v`` of :data:`VARIANTS` on the MODEL ``base`` with the LoRD ``lord``'s targets."""
    if v == "base":
        return base.clone()
    if v == "lora":
        return stock_lora(base, lord)
    return patch.apply_lord(base, lord, 1.0, "learned", implementation=v.removeprefix("lord_"))


def ratio_stats(per_step: dict, v: str, ref: str) -> tuple:
    """(median, min, max) over rounds of the per-round ratio ``v / ref``; Nones without ``ref``."""
    if ref not in per_step:
        return None, None, None
    r = B.paired_ratios(per_step[v], per_step[ref])
    return statistics.median(r), min(r), max(r)


def bench_model(key: str, points, max_other: float, log, variants=VARIANTS, work=None) -> list[dict]:
    """Time ``variants`` (a subset of :data:`VARIANTS`, at least one of ``lora`` and ``base`` as the
    reference) of model ``key`` at each :class:`Point`; one row per (point, variant). ``work``: folder
    for the ``ckpt`` model's checkpoint (default: a temporary one)."""
    import comfy.model_management as mm
    import comfy.sample

    variants = tuple(v for v in VARIANTS if v in variants)
    if not {"lora", "base"} & set(variants):
        raise ValueError("variants need a reference: lora or base")
    own_work = work is None and key == "ckpt"
    work = tempfile.mkdtemp(prefix="bench_sampling_") if own_work else work
    t = time.perf_counter()
    try:
        base = MODELS[key].build(work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    ctx = MODELS[key].context
    lord = patch.init_lord_for_model(base, random_up=0.05, seed=1)
    patched = {v: make_variant(v, base, lord) for v in variants}
    hooks = {v: (len(lord.targets) if v.startswith("lord") else 0) for v in variants}
    log(f"[{key}] built in {time.perf_counter() - t:.1f} s, {len(lord.targets)} targets")
    rows = []
    g = torch.Generator().manual_seed(3)
    for pt in points:
        px, steps, repeats, batch = pt
        latent = torch.zeros(batch, 4, px // 8, px // 8)
        inputs = (comfy.sample.prepare_noise(latent, 0), [[torch.randn(1, 77, ctx, generator=g), {}]],
                  [[torch.randn(1, 77, ctx, generator=g), {}]], latent)
        runs = {v: [] for v in variants}
        with torch.inference_mode():
            warm = {v: timed_sample(patched[v], 1, inputs, hooks[v])["out"] for v in variants}
            for r in range(repeats):
                for v in B.rotated(variants, r):
                    runs[v].append(timed_sample(patched[v], steps, inputs, hooks[v], max_other))
        # sanity (relative max abs difference of the 1-step outputs): adapters act, fused == plain
        diff = lambda a, b: float((warm[a] - warm[b]).abs().max() / warm[b].abs().max())  # noqa: E731
        pairs = {"lora_vs_base": ("lora", "base"), "lord_vs_base": ("lord_plain", "base"),
                 "fused_vs_plain": ("lord_fused", "lord_plain"), "fused_vs_lora": ("lord_fused", "lora")}
        check = {k: diff(a, b) for k, (a, b) in pairs.items() if a in warm and b in warm}
        per_step = {v: [x["s"] / steps for x in runs[v]] for v in variants}
        med = {v: statistics.median(per_step[v]) for v in variants}
        for v in variants:
            vs_lora = ratio_stats(per_step, v, "lora")
            rows.append({"model": key, "px": px, "batch": batch, "variant": v, "steps": steps, "repeats": repeats,
                         "median_ms": 1e3 * med[v], "min_ms": 1e3 * min(per_step[v]),
                         "max_ms": 1e3 * max(per_step[v]), "vs_base": ratio_stats(per_step, v, "base")[0],
                         "vs_lora": vs_lora[0], "vs_lora_min": vs_lora[1], "vs_lora_max": vs_lora[2],
                         "vs_lora_of_medians": med[v] / med["lora"] if "lora" in med else None,
                         "runs_ms": [1e3 * x for x in per_step[v]],
                         "other_cores": [x["other"] for x in runs[v]],
                         "minflt_per_step": statistics.median(x["minflt"] / steps for x in runs[v]),
                         "discarded": sum(x["retries"] for x in runs[v]), "rel_diff_1step": check})
        mine = rows[-len(variants):]
        log(f"[{key} {px}px batch {batch}] " + ", ".join(f"{r['variant']} {r['median_ms']:.1f}" for r in mine)
            + " ms/step; page faults/step " + ", ".join(f"{r['minflt_per_step']:.0f}" for r in mine)
            + f"; discarded {sum(r['discarded'] for r in mine)} contended runs; "
            + f"rel. diffs {json.dumps({k: round(x, 6) for k, x in check.items()})}")
    del patched, base, lord
    mm.unload_all_models()
    return rows


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _size(r) -> str:
    return f"{r['px']} px" + (f", batch {r['batch']}" if r.get("batch", 1) != 1 else "")


def table(rows) -> str:
    lines = ["| model | size | variant | median ms/step | vs base | vs stock LoRA | (min - max over rounds) |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        spread = ("" if r["variant"] == "lora" or r["vs_lora"] is None
                  else f"{r['vs_lora_min']:.2f} - {r['vs_lora_max']:.2f}")
        lines.append(f"| {r['model']} | {_size(r)} | {r['variant']} | {r['median_ms']:.1f} | "
                     f"{_x(r['vs_base'])} | {_x(r['vs_lora'])} | {spread} |")
    return "\n".join(lines)


def goal_verdict(model: str, px: int, batch: int, ratio: float) -> str:
    """``meets/misses the <= G x goal`` for a (model, px) with a goal of issue 13 (batch 1), else
    ``no goal``."""
    goal = GOALS.get((model, px)) if batch == 1 else None
    if goal is None:
        return "no goal"
    return f"{'meets' if ratio <= goal else 'misses'} the <= {goal:.2f}x goal"


def reading(rows) -> str:
    get = {(r["model"], r["px"], r.get("batch", 1), r["variant"]): r for r in rows}
    parts = []
    for model, px, batch in dict.fromkeys((r["model"], r["px"], r.get("batch", 1)) for r in rows):
        f, p, lo = (get.get((model, px, batch, v)) for v in ("lord_fused", "lord_plain", "lora"))
        head = f"{model} at {px} px" + (f", batch {batch}" if batch != 1 else "")
        bits = []
        if f and lo:
            bits.append(f"LoRD fused {f['vs_lora']:.3f}x stock LoRA ({goal_verdict(model, px, batch, f['vs_lora'])}; "
                        f"rounds {f['vs_lora_min']:.2f}-{f['vs_lora_max']:.2f})")
        if p and lo:
            bits.append(f"LoRD plain {p['vs_lora']:.3f}x")
        if lo and lo["vs_base"] is not None:
            bits.append(f"stock LoRA {lo['vs_base']:.3f}x base")
        parts.append(head + ": " + (", ".join(bits) or "no LoRD / stock LoRA pair measured"))
    return ("; ".join(parts) + ". ComfyUI merges the stock LoRA and the static clean branch of fused LoRD "
            "into the weights, so what fused LoRD adds per step is its forward hooks, which add the gated "
            "defense branch in place and allocate nothing once warm (rank-r down projection, rank-r gate MLP, one "
            "addmm into the layer output; a self-attention's q, k, v share one projection and one block-diagonal "
            "gate; cross-attention k/v outputs cached per text context): about 6-9 small ops per target, a "
            "fixed per-call cost (tens of microseconds of dispatch on this CPU) that weighs most on small layers. Measured on a shared 2-core VM: single rounds vary by several percent, so read "
            "differences under ~3% as noise, and a goal counts as met only when a second run agrees.")


def runs_text(rows) -> str:
    """``model size: N steps x R repeats`` per measured point."""
    pts = dict.fromkeys((r["model"], _size(r), r["steps"], r["repeats"]) for r in rows)
    return "; ".join(f"{m} {size}: {s} step{'s' * (s != 1)} x {n} repeats" for m, size, s, n in pts)


def write_markdown(path: pathlib.Path, rows, facts, max_other: float) -> None:
    discarded = sum(r["discarded"] for r in rows)
    batches = sorted({r.get("batch", 1) for r in rows})
    per_step = ("batch 2 per step" if batches == [1] else
                f"UNet batch 2 x the latent batch {' / '.join(map(str, batches))} per step")
    models = "; ".join(f"{m}: {MODEL_NAMES[m]}" for m in dict.fromkeys(r["model"] for r in rows))
    body = "\n".join([
        MARK_START, "## Sampling cost per step (bench/bench_sampling.py)", "",
        *B.header_lines(facts),
        f"Models: {models}; malloc: {facts['malloc']}.  ",
        f"Runs: {runs_text(rows)}; euler/normal, cfg {CFG} ({per_step}), rank 4 on all attention projections, "
        "random weights. Median over interleaved runs of (one `comfy.sample.sample` call of N steps, "
        "timed after an untimed `load_models_gpu`) / N, so one-off patching on variant switches is excluded; "
        "ratios are medians of per-round ratios (variants run round-robin, so paired runs are adjacent in time). "
        f"Runs disturbed by other processes (>= {max_other} cores) discarded and retried: {discarded}. "
        + ("The allocator is left stock (`--stock-malloc`)" if facts["malloc"] == "stock" else
         "The allocator is pinned (see `pinned_malloc`: no mmap, never trim)") + ": with stock glibc, oneDNN "
        "convolution scratch buffers page-fault on every call for whichever variants' allocation history is unlucky "
        "(+0.5 s/step on sd15), and with a 2 GiB trim threshold every variant page-faulted ~2.6e6 times per step at 512 px.",
        "", table(rows), "", reading(rows), MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


def main(argv=None) -> None:
    B.import_comfy()
    ap = B.new_parser(__doc__, quick="smoke run: tiny model, 64 px, 3 steps x 2 repeats, no markdown",
                      steps="steps per timed run (default: tiny 20; sd15 2 at 256 px, 1 at 512 px; ckpt 4)",
                      repeats="timed runs per variant (default: tiny 12; sd15 10 at 256 px, 6 at 512 px; ckpt 4)")
    ap.add_argument("--models", default=None, help="comma list of tiny,sd15,ckpt (default: tiny,sd15; --quick: tiny)")
    ap.add_argument("--sizes", default=None, help="image sizes in px, multiples of 8, for every model (default per "
                                                  "model: tiny 64, sd15 256,512, ckpt 256; --quick 64)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {','.join(VARIANTS)} (default all; lora or base needed as reference)")
    ap.add_argument("--batch", type=int, default=1, help="latent batch size (CFG doubles it; goals apply at 1)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    B.add_machine_args(ap, retries=False)
    B.add_output_args(ap)
    args = ap.parse_args(argv)
    models = (args.models or ("tiny" if args.quick else "tiny,sd15")).split(",")
    variants = args.variants.split(",")
    unknown = (set(models) - set(MODELS)) | (set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown models or variants: {', '.join(sorted(unknown))}")
    if not {"lora", "base"} & set(variants):
        ap.error("--variants needs a reference: lora or base")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    facts = B.machine_facts("bench")
    facts["malloc"] = "stock" if args.stock_malloc else pinned_malloc()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"{facts}")
    rows = []
    for m in models:
        sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else [64] if args.quick else MODELS[m].sizes)
        points = []
        for px in sizes:
            steps, repeats = (3, 2) if args.quick else default_runs(m, px)
            points.append(Point(px, args.steps or steps, args.repeats or repeats, args.batch))
        rows += bench_model(m, points, args.max_other_cpu, log, variants)
    facts["loadavg_end"] = os.getloadavg()[0]
    facts["total_min"] = (time.time() - start) / 60
    print(table(rows))
    print(reading(rows))
    B.finish(args, lambda path: write_markdown(path, rows, facts, args.max_other_cpu),
             {"facts": facts, "rows": rows}, say=log)


if __name__ == "__main__":
    main()
