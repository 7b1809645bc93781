"""Per-step sampling cost of LoRD vs a stock LoRA, in-process ComfyUI, random weights.

Variants (all on the same shared UNet, rank 4 on every attention projection):
``base``, ``lora`` (stock kohya LoRA through ``comfy.sd.load_lora_for_models``), ``lord_plain`` and
``lord_fused`` (``patch.apply_lord`` with ``gate_mode="learned"``). Models: the tiny SD1.x UNet and a
random UNet with the real SD1.5 geometry (860M parameters, fp32); image sizes 64 and 256 px (latent
8x8 and 32x32); euler / normal, cfg 7.5, so every step is one UNet call on a batch of 2.

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
``--stock-malloc``, glibc is told not to use mmap or trim the heap (:func:`steady_malloc`), which
removes a page-fault artefact of oneDNN convolutions on CPU; page faults per step are reported.

    python bench/bench_sampling.py [--quick] [--steps N] [--repeats R] [--json PATH] [--md PATH]

Writes its own section of ``BENCHMARKS.md`` (between the ``bench_sampling`` markers) unless
``--quick`` (a smoke run, tiny model only) or ``--md ''``.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

import benchlib as B
from benchlib import steady_malloc

B.import_comfy()
from comfyui_lord.lord_ops.comfy import patch  # noqa: E402

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

VARIANTS = ("base", "lora", "lord_plain", "lord_fused")
MARK_START, MARK_END = "<!-- bench_sampling:start -->", "<!-- bench_sampling:end -->"
CFG, SIZES = 7.5, (64, 256)
# per model: builder, context_dim, default (steps, repeats); chosen to keep a full run near 10 min
MODELS = {
    "tiny": (lambda: B.random_unet("tiny"), 64, (20, 12)),
    "sd15": (lambda: B.random_unet("sd15"), 768, (2, 10)),
}


def stock_lora(model, lord, seed: int = 2):
    """A kohya LoRA with LoRD's rank, alpha and down weights and random up weights, loaded the stock way."""
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


def bench_model(key: str, steps: int, repeats: int, sizes, max_other: float, log) -> list[dict]:
    build, ctx, _ = MODELS[key]
    t = time.perf_counter()
    base = build()
    lord = patch.init_lord_for_model(base, random_up=0.05, seed=1)
    variants = {
        "base": base.clone(),
        "lora": stock_lora(base, lord),
        "lord_plain": patch.apply_lord(base, lord, 1.0, "learned", implementation="plain"),
        "lord_fused": patch.apply_lord(base, lord, 1.0, "learned", implementation="fused"),
    }
    hooks = {v: (len(lord.targets) if v.startswith("lord") else 0) for v in VARIANTS}
    log(f"[{key}] built in {time.perf_counter() - t:.1f} s, {len(lord.targets)} targets")
    rows = []
    g = torch.Generator().manual_seed(3)
    for px in sizes:
        latent = torch.zeros(1, 4, px // 8, px // 8)
        inputs = (comfy.sample.prepare_noise(latent, 0), [[torch.randn(1, 77, ctx, generator=g), {}]],
                  [[torch.randn(1, 77, ctx, generator=g), {}]], latent)
        runs = {v: [] for v in VARIANTS}
        with torch.inference_mode():
            warm = {v: timed_sample(variants[v], 1, inputs, hooks[v])["out"] for v in VARIANTS}
            for r in range(repeats):
                for v in B.rotated(VARIANTS, r):
                    runs[v].append(timed_sample(variants[v], steps, inputs, hooks[v], max_other))
        # sanity (relative max abs difference of the 1-step outputs): adapters act, fused == plain
        diff = lambda a, b: float((warm[a] - warm[b]).abs().max() / warm[b].abs().max())  # noqa: E731
        check = {"lora_vs_base": diff("lora", "base"), "lord_vs_base": diff("lord_plain", "base"),
                 "fused_vs_plain": diff("lord_fused", "lord_plain")}
        per_step = {v: [x["s"] / steps for x in runs[v]] for v in VARIANTS}
        med = {v: statistics.median(per_step[v]) for v in VARIANTS}
        paired = lambda v, ref: B.paired_ratios(per_step[v], per_step[ref])  # noqa: E731
        for v in VARIANTS:
            rows.append({"model": key, "px": px, "variant": v, "steps": steps, "repeats": repeats,
                         "median_ms": 1e3 * med[v], "min_ms": 1e3 * min(per_step[v]),
                         "max_ms": 1e3 * max(per_step[v]), "vs_base": statistics.median(paired(v, "base")),
                         "vs_lora": statistics.median(paired(v, "lora")),
                         "vs_lora_min": min(paired(v, "lora")), "vs_lora_max": max(paired(v, "lora")),
                         "vs_lora_of_medians": med[v] / med["lora"], "runs_ms": [1e3 * x for x in per_step[v]],
                         "other_cores": [x["other"] for x in runs[v]],
                         "minflt_per_step": statistics.median(x["minflt"] / steps for x in runs[v]),
                         "discarded": sum(x["retries"] for x in runs[v]), "rel_diff_1step": check})
        log(f"[{key} {px}px] " + ", ".join(f"{r['variant']} {r['median_ms']:.1f}" for r in rows[-4:])
            + " ms/step; page faults/step " + ", ".join(f"{r['minflt_per_step']:.0f}" for r in rows[-4:])
            + f"; discarded {sum(r['discarded'] for r in rows[-4:])} contended runs; "
            + f"rel. diffs {json.dumps({k: round(x, 6) for k, x in check.items()})}")
    del variants, base
    mm.unload_all_models()
    return rows


def table(rows) -> str:
    lines = ["| model | size | variant | median ms/step | vs base | vs stock LoRA | (min - max over rounds) |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        spread = "" if r["variant"] == "lora" else f"{r['vs_lora_min']:.2f} - {r['vs_lora_max']:.2f}"
        lines.append(f"| {r['model']} | {r['px']} px | {r['variant']} | {r['median_ms']:.1f} | "
                     f"{r['vs_base']:.3f}x | {r['vs_lora']:.3f}x | {spread} |")
    return "\n".join(lines)


def reading(rows) -> str:
    get = {(r["model"], r["px"], r["variant"]): r for r in rows}
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        px = max(r["px"] for r in rows if r["model"] == model)
        f, p, lo = (get[(model, px, v)] for v in ("lord_fused", "lord_plain", "lora"))
        parts.append(f"{model} at {px} px: LoRD fused {f['vs_lora']:.3f}x stock LoRA "
                     f"({'meets' if f['vs_lora'] <= 1.05 else 'misses'} the <= 1.05x goal; rounds "
                     f"{f['vs_lora_min']:.2f}-{f['vs_lora_max']:.2f}), LoRD plain {p['vs_lora']:.3f}x, "
                     f"stock LoRA {lo['vs_base']:.3f}x base")
    return ("; ".join(parts) + ". ComfyUI merges the stock LoRA and the static clean branch of fused LoRD "
            "into the weights, so what fused LoRD adds per step is its forward hooks (rank-r down projection, "
            "rank-r gate MLP, defense up-projection, scale and add on every target): a fixed per-call cost that "
            "weighs most on small layers (tiny UNet, 64 px). Measured on a shared 2-core VM: single rounds "
            "vary by several percent, so read differences under ~3% as noise.")


def write_markdown(path: pathlib.Path, rows, facts, steps_repeats, max_other: float) -> None:
    discarded = sum(r["discarded"] for r in rows)
    runs = "; ".join(f"{m}: {s} steps x {r} repeats" for m, (s, r) in steps_repeats.items())
    body = "\n".join([
        MARK_START, "## Sampling cost per step (bench/bench_sampling.py)", "",
        f"Command: `{facts['command']}`  ", f"Machine: {facts['cpu']}, torch {facts['torch']}, "
        f"{facts['threads']} threads, device {facts['device']}, Python {facts['python']}, 1-min load average "
        f"{facts['loadavg_start']:.2f} at start / {facts['loadavg_end']:.2f} at end, malloc: {facts['malloc']}  ",
        f"Runs: {runs}; euler/normal, cfg {CFG} (batch 2 per step), rank 4 on all attention projections, "
        "random weights. Median over interleaved runs of (one `comfy.sample.sample` call of N steps, "
        "timed after an untimed `load_models_gpu`) / N, so one-off patching on variant switches is excluded; "
        "ratios are medians of per-round ratios (variants run round-robin, so paired runs are adjacent in time). "
        f"Runs disturbed by other processes (>= {max_other} cores) discarded and retried: {discarded}. "
        "The allocator is pinned (see `steady_malloc`): with stock glibc, oneDNN convolution scratch buffers "
        "page-fault on every call for whichever variants' allocation history is unlucky (+0.5 s/step on sd15).",
        "", table(rows), "", reading(rows), MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


def main(argv=None) -> None:
    ap = B.new_parser(__doc__, quick="smoke run: tiny model, 3 steps x 2 repeats, no markdown",
                      steps="steps per timed run (default: tiny 20, sd15 2)",
                      repeats="timed runs per variant (default: tiny 12, sd15 10)")
    ap.add_argument("--models", default=None, help="comma list of tiny,sd15 (default: both; --quick: tiny)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image sizes in px (multiples of 8)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    B.add_machine_args(ap, retries=False)
    B.add_output_args(ap)
    args = ap.parse_args(argv)
    models = (args.models or ("tiny" if args.quick else "tiny,sd15")).split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = B.machine_facts("bench")
    facts["malloc"] = "stock" if args.stock_malloc else steady_malloc()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"{facts}")
    rows, steps_repeats = [], {}
    for m in models:
        steps, repeats = (3, 2) if args.quick else MODELS[m][2]
        steps_repeats[m] = (args.steps or steps, args.repeats or repeats)
        rows += bench_model(m, *steps_repeats[m], sizes, args.max_other_cpu, log)
    facts["loadavg_end"] = os.getloadavg()[0]
    print(table(rows))
    print(reading(rows))
    B.finish(args, lambda path: write_markdown(path, rows, facts, steps_repeats, args.max_other_cpu),
             {"facts": facts, "rows": rows}, say=log)


if __name__ == "__main__":
    main()
