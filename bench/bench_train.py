"""Stage-1 LoRD training cost vs core ComfyUI's Train LoRA node: time per sample and peak memory.

Variants, each a whole in-process training call under ``torch.inference_mode()`` (like ComfyUI's
executor) on the same MODEL, images, conditioning, rank, batch, resolution, fp32 and
gradient-checkpointing setting, with a fresh run each call (no checkpoint to resume):

* ``core`` -- ``comfy_extras.nodes_train.TrainLoraNode.execute`` (core ComfyUI's "Train LoRA" node,
  called on the class with one-element lists as the executor does for ``is_input_list`` nodes):
  algorithm LoRA, AdamW, MSE, ``training_dtype`` and ``lora_dtype`` fp32. It trains a LoRA on
  *every* weight that has a ``weight_function`` (all Linear and Conv layers of the UNet, merged into
  the weight on every forward), plus a full-size difference for every 1-D weight (norms) and every
  bias. One UNet forward/backward per sample (the standard denoising loss).
* ``lord`` -- ``lord_ops.comfy.stages.train_stage1`` (what the Stage-1 trainer node runs), default
  targets ``attn`` (q, k, v, out of every attn1/attn2: a LoRD = LoRA A, B, defense B' and a gate MLP
  per target, applied as forward hooks), AdamW, ``evaluate=False``. Eq. 7: per sample one clean and one
  PGD-2-perturbed UNet forward/backward (same timestep and noise) plus the gate BCE -- two UNet
  passes per sample by design.
* ``lord_proj`` (optional) -- the same with targets ``attn+proj`` (adds the transformer blocks'
  ``proj_in``/``proj_out``), a step towards core's coverage.

Timing. Every optimizer step's end is time-stamped by a global ``torch.optim`` step post-hook (the same
clock for both variants). A call runs ``N + 1`` steps; its value is (time from the end of step 1 to
the end of step N + 1) / (N x batch), i.e. steady-state seconds per training sample. Excluded
thereby: model loading/cloning/adapter creation, LoRD's VAE encoding of the training set and its
PGD-2 data generation (cached on disk in real use; reported separately, per image, timed once on a
fresh cache), the first step (optimizer state allocation) and evaluation. Call overhead (call wall
time minus N + 1 steady steps) is reported too. After one untimed warm-up call per variant, R rounds
run every variant once (order rotated each round); reported: medians over rounds, min - max, and
LoRD/core as the median of the per-round ratios. Shared machines: before each call the worker waits
until other processes are quiet (``/proc/stat``), and a call during which they used >=
``--max-other-cpu`` cores is redone (``--retries``); timing workers pin glibc malloc
(:func:`pinned_malloc`: no mmap chunks, no heap trimming) unless ``--stock-malloc``.

Peak memory: a 2-step call (N = 1) of each variant in a fresh subprocess, after the models are
loaded and LoRD's perturbation cache is filled. CPU: peak RSS during the call minus RSS before it
(Linux: peak reset through ``/proc/self/clear_refs`` after ``malloc_trim``; elsewhere the ``ru_maxrss``
high-water mark). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Models (random weights, nothing downloaded; conditioning is a random ``[1, 77, context]`` tensor):
``sd15`` = a UNet with the real SD1.5 geometry (``tiny.sd15_full_unet_config()``, 860M parameters,
fp32) + a random KL VAE with the SD1.5 geometry; ``ckpt`` = the SD15-geometry test checkpoint
(``tiny.write_sd15_geometry_checkpoint``: 13.6M-parameter UNet, TAESD, CLIP-L) loaded by
``comfy.sd.load_checkpoint_guess_config`` under inference mode like CheckpointLoaderSimple;
``tiny`` = the tiny SD1.x UNet + a random TAESD (smoke runs).

    make bench-train    # the defaults (last full run: 18 min on 2 CPU cores)
    python -m bench.bench_train [--quick] [--configs MODEL:PX[:GC[:VARIANTS]],...] [--variants core,lord,lord_proj]
                                [--rank 4] [--batch 1] [--gc off|on] [--steps N] [--repeats R] [--md PATH]

Default configs: ``ckpt`` at 64 and 256 px (gradient checkpointing off, and on at 256 px; ``core`` and
``lord``), ``sd15`` at 256 px (all variants) and 512 px (``core`` and ``lord``; 2 rounds only, to fit
a ~20 min budget on a 2-core CPU).

Writes its own section of ``BENCHMARKS.md`` (between the ``bench_train`` markers) unless ``--quick``
(a smoke run: tiny model, 64 px, 1 round of 1 step, no markdown) or ``--md ''``.
"""
from __future__ import annotations

import argparse
import gc as _gc
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import warnings

from bench import benchlib as B
from bench.benchlib import log, pinned_malloc, sync

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lord_ops import trainer as T
from lord_ops.train_config import TrainConfig
from lord_ops.comfy import data as cdata, perturb, stages

MARK_START, MARK_END = "<!-- bench_train:start -->", "<!-- bench_train:end -->"
CUDA = torch.cuda.is_available()
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
VARIANTS = ("core", "lord", "lord_proj")
LORD_TARGETS = {"lord": "attn", "lord_proj": "attn+proj"}
LEARNING_RATE = 1e-4
# per model: default (timed steps per call, rounds) below 512 px; from 512 px (2, 2)
DEFAULTS = {"tiny": (3, 3), "ckpt": (4, 5), "sd15": (2, 3)}
# the issue-13 goal is sd15 at 512 px; gradient-checkpointing and attn+proj rows run on request
# (--configs ckpt:256:on:core+lord,sd15:256:off:core+lord+lord_proj), to keep make bench-train near 25 min
DEFAULT_CONFIGS = "ckpt:64:off:core+lord,ckpt:256:off:core+lord,sd15:256:off:core+lord,sd15:512:off:core+lord"


# ----------------------------------------------------------------------------------------------
# Models and data


def build_vae(kind: str):
    """:func:`benchlib.random_vae` (``kl`` or ``taesd``) and its description."""
    vae = B.random_vae(kind)
    desc = "random KL VAE, SD1.5 geometry" if kind == "kl" else "random TAESD"
    return vae, f"{desc} ({B.params_m(vae.first_stage_model):.1f}M)"


class Setup:
    """MODEL, VAE, training images and conditioning of one configuration."""

    def __init__(self, model: str, px: int, images: int, work: pathlib.Path):
        t = time.perf_counter()
        if model in ("sd15", "tiny"):
            self.model = B.random_unet(model)
            self.vae, vdesc = build_vae("kl" if model == "sd15" else "taesd")
            name = B.UNET_NAMES[model]
        elif model == "ckpt":
            self.model, self.vae = B.test_checkpoint(work)
            name, vdesc = "SD15-geometry test checkpoint UNet", "its TAESD"
        else:
            raise ValueError(f"unknown model {model!r}")
        self.desc = f"{name}, {B.params_m(self.model.model.diffusion_model):.1f}M parameters, fp32; VAE: {vdesc}"
        ctx = self.model.model.model_config.unet_config["context_dim"]
        g = torch.Generator().manual_seed(3)
        imgs = [B.smooth_image(px, g)[0] for _ in range(images)]  # [3, px, px] in [0, 1]
        cond = [[torch.randn(1, 77, ctx, generator=g) * 0.5, {}]]
        self.data = cdata.TrainingData(images=imgs, conds=[cond], captions=[f"image {i}" for i in range(images)])
        self.cond = cond
        with torch.inference_mode():  # VAE Encode node: raw latents for core's node
            self.latents = self.vae.encode(torch.stack(imgs).movedim(1, -1))
        self.build_s = time.perf_counter() - t


def lord_config(args, variant: str, steps: int) -> TrainConfig:
    return TrainConfig(stage="stage1", steps=steps, batch_size=args.batch, rank=args.rank,
                       learning_rate=LEARNING_RATE, targets=LORD_TARGETS[variant], dtype="fp32",
                       gradient_checkpointing=args.gc == "on", checkpoint_every=10 ** 9, seed=0)


def wrapped_weights(s: Setup) -> int:
    """Modules of the UNet whose weight is computed through a ``weight_function`` (core's LoRA)."""
    return sum(bool(getattr(m, "weight_function", None)) or bool(getattr(m, "bias_function", None))
               for m in s.model.model.diffusion_model.modules())


def lord_hooks(s: Setup) -> int:
    return sum(bool(m._forward_hooks) for m in s.model.model.diffusion_model.modules())


def run_call(s: Setup, variant: str, args, steps: int, cache_dir: pathlib.Path) -> dict:
    """One training call of ``steps`` optimizer steps; step-end time stamps and what it trained."""
    stamps, seen, calls = [], {}, []

    def post_hook(opt, a, kw):
        sync()
        stamps.append(time.perf_counter())
        seen.setdefault("probe_calls", []).append(len(calls))
        if len(stamps) == 1:  # what the UNet runs with (check that variants do not leak into each other)
            seen["wrapped"], seen["hooked"] = wrapped_weights(s), lord_hooks(s)

    handle = register_optimizer_step_post_hook(post_hook)
    # executions of one image-fed layer per step = UNet passes per step, recomputation included
    probe = next(m for n, m in s.model.model.diffusion_model.named_modules() if n.endswith("attn1.to_q"))
    probe_handle = probe.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = {}
    try:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if variant == "core":
                from comfy_extras.nodes_train import TrainLoraNode

                # a list of one LATENT per image: with a single LATENT input, 0.3.75's execute
                # raises UnboundLocalError (``multi_res`` is only set on the list path)
                res = TrainLoraNode.execute(
                    model=[s.model], latents=[{"samples": z[None]} for z in s.latents], positive=[s.cond], batch_size=[args.batch],
                    steps=[steps], grad_accumulation_steps=[1], learning_rate=[LEARNING_RATE], rank=[args.rank],
                    optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"],
                    lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[args.gc == "on"],
                    existing_lora=["[None]"])
                _, lora_sd, loss_map, _ = res.args
                out["params"] = sum(v.numel() for v in lora_sd.values())
                out["layers"] = sum(k.endswith(".lora_up.weight") for k in lora_sd)
                out["diffs"] = sum(k.endswith((".diff", ".diff_b")) for k in lora_sd)
                out["losses"] = list(loss_map["loss"])
                del res, lora_sd
            else:
                r = stages.train_stage1(s.model, s.vae, s.data, lord_config(args, variant, steps), cache_dir,
                                        checkpoint_path=None, evaluate=False)
                out["params"] = sum(getattr(w, f).numel() for w in r.lord.targets.values()
                                    for f in T.LoRDParameters.FIELDS)
                out["layers"] = len(r.lord.targets)
                out["losses"] = [h["loss"] for h in r.result.history]
                del r
        sync()
        out["wall"] = time.perf_counter() - t0
    finally:
        handle.remove()
        probe_handle.remove()
    pc = seen.pop("probe_calls", [])
    out["passes_per_step"] = (pc[-1] - pc[-2]) if len(pc) >= 2 else None
    out.update(seen)
    out["stamps"] = [x - t0 for x in stamps]
    if len(stamps) != steps:
        raise RuntimeError(f"{variant}: {len(stamps)} optimizer steps seen, expected {steps}")
    return out


def stage1_data_cost(s: Setup, args, cache_dir: pathlib.Path) -> float:
    """Seconds per image of LoRD's one-off PGD-2 data generation (empty cache)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        perturb.stage1_perturbations(s.model, s.vae, s.data, lord_config(args, "lord", 1), cache_dir)
    sync()
    return (time.perf_counter() - t) / len(s.data)


# ----------------------------------------------------------------------------------------------
# Workers (each runs in a fresh subprocess)


def worker_time(args) -> dict:
    import comfy.utils

    malloc = "stock" if (args.stock_malloc or CUDA) else pinned_malloc()
    comfy.utils.set_progress_bar_enabled(False)
    work = pathlib.Path(args.work)
    s = Setup(args.model, args.px, args.images, work)
    cache = work / f"pgd-{args.model}-{args.px}"
    tag = f"[time {args.model} {args.px}px gc={args.gc}]"
    log(f"{tag} built in {s.build_s:.1f} s: {s.desc}")
    variants = args.variants.split(",")
    B.wait_until_quiet(args.max_other_cpu, args.quiet_timeout)
    pgd_s = stage1_data_cost(s, args, cache)
    log(f"{tag} PGD-2 data generation {pgd_s:.2f} s/image ({len(s.data)} images)")
    facts, failed = {}, {}
    for v in list(variants):  # warm-up call each (2 steps); parameter counts
        try:
            r = run_call(s, v, args, 2, cache)
        except Exception as e:  # noqa: BLE001 -- report the variant as failed, time the others
            if v == "core":
                raise
            failed[v] = f"{type(e).__name__}: {e}"
            variants.remove(v)
            log(f"{tag} warm-up {v} failed: {failed[v]}")
            continue
        facts[v] = {k: r.get(k) for k in ("params", "layers", "diffs", "wrapped", "hooked", "passes_per_step")}
        log(f"{tag} warm-up {v}: {r['wall']:.2f} s, {r['params']:,} trainable parameters on {r['layers']} layers, "
            f"UNet modules with weight wrappers {r['wrapped']}, with forward hooks {r['hooked']}, UNet passes/step "
            f"{r['passes_per_step']}, losses "
            f"{', '.join(f'{x:.4g}' for x in r['losses'])}")
    n = args.steps
    runs = {v: [] for v in variants}
    overhead = {v: [] for v in variants}
    others = {v: [] for v in variants}
    faults = {v: [] for v in variants}
    discarded = 0
    for rnd in range(args.repeats):
        for v in B.rotated(variants, rnd):
            run = B.quiet_run(lambda: run_call(s, v, args, n + 1, cache), args.max_other_cpu, args.retries,
                              args.quiet_timeout, prepare=_gc.collect,
                              on_redo=lambda other: log(f"{tag} {v} call disturbed (other processes {other:.2f} "
                                                        "cores): redo"))
            r, other, discarded = run["result"], run["other"], discarded + run["redone"]
            st = r["stamps"]
            per_step = (st[-1] - st[0]) / n
            runs[v].append(per_step / args.batch)
            overhead[v].append(r["wall"] - (n + 1) * per_step)
            others[v].append(other)
            faults[v].append(run["minflt"] / (n + 1))
            if (r["wrapped"], r["hooked"]) != (facts[v]["wrapped"], facts[v]["hooked"]):
                raise RuntimeError(f"{v}: UNet state differs from the warm-up ({r['wrapped']}, {r['hooked']})")
        log(f"{tag} round {rnd + 1}/{args.repeats}: " + ", ".join(
            f"{v} {runs[v][-1]:.3f} s/sample (overhead {overhead[v][-1]:.1f} s, other {others[v][-1]:.2f} cores, "
            f"{faults[v][-1]:.0f} faults/step)" for v in variants))
    ratios = {v: B.paired_ratios(runs[v], runs["core"]) for v in variants if v != "core" and "core" in runs}
    return {"model": args.model, "px": args.px, "gc": args.gc, "batch": args.batch, "rank": args.rank,
            "images": len(s.data), "steps": n, "repeats": args.repeats, "desc": s.desc, "build_s": s.build_s,
            "pgd_s_per_image": pgd_s, "facts": facts, "failed": failed, "runs": runs, "overhead": overhead, "other_cores": others,
            "minflt_per_step": faults, "malloc": malloc, "discarded": discarded, **B.spread(runs),
            "overhead_median": {v: statistics.median(x) for v, x in overhead.items()},
            "ratio": {v: statistics.median(x) for v, x in ratios.items()},
            "ratio_min": {v: min(x) for v, x in ratios.items()}, "ratio_max": {v: max(x) for v, x in ratios.items()}}


def worker_mem(args) -> dict:
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    work = pathlib.Path(args.work)
    s = Setup(args.model, args.px, args.images, work)
    cache = work / f"pgd-{args.model}-{args.px}"
    v = args.variants
    with torch.inference_mode():
        perturb.stage1_perturbations(s.model, s.vae, s.data, lord_config(args, "lord", 1), cache)  # cache hit
    from lord_ops.comfy import grad

    grad.load_for_gradients(s.model, s.vae)
    mem = B.PeakMemory()
    B.wait_until_quiet(args.max_other_cpu, args.quiet_timeout)
    r, _, other = B.other_load(lambda: run_call(s, v, args, 2, cache))
    out = {"model": args.model, "px": args.px, "gc": args.gc, "variant": v, **mem.result(), "wall": r["wall"],
           "stamps": r["stamps"], "other_cores": other}
    log(f"[mem {args.model} {args.px}px gc={args.gc} {v}] peak delta {out['delta_bytes'] / 2**30:.2f} GiB "
        f"(before {out['before_bytes'] / 2**30:.2f} GiB), call {r['wall']:.1f} s, other processes {other:.2f} cores")
    return out


def run_worker(kind: str, args, model: str, px: int, gc: str, variants: str, steps: int = 1, repeats: int = 1) -> dict:
    argv = ["--worker", kind, "--model", model, "--px", px, "--gc", gc, "--variants", variants, "--steps", steps,
            "--repeats", repeats, "--rank", args.rank, "--batch", args.batch, "--images", args.images,
            "--work", args.work, "--max-other-cpu", args.max_other_cpu, "--quiet-timeout", args.quiet_timeout,
            "--retries", args.retries]
    argv += ["--stock-malloc"] if args.stock_malloc else []
    return B.run_worker(__file__, argv, {"model": model, "px": px, "gc": gc, "variant": variants})


# ----------------------------------------------------------------------------------------------
# Report


def _label(r) -> str:
    return f"{r['model']} {r['px']} px" + (", grad. ckpt" if r["gc"] == "on" else "")


def tables(times: list, mems: list, skipped: list) -> str:
    memo = {(m["model"], m["px"], m["gc"], m["variant"]): m for m in mems}
    lines = ["| config | variant | trains | trainable params | UNet passes/step | median ms/sample | min - max | "
             "vs core (median of rounds, min - max) | call overhead s | peak memory delta |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in times:
        for v in r["runs"]:
            f = r["facts"][v]
            if v == "core":
                what = f"LoRA on {f['layers']} Linear/Conv weights + {f['diffs']} norm/bias diffs"
            else:
                what = f"LoRD on {f['layers']} `{LORD_TARGETS[v]}` targets"
            ratio = (f"**{r['ratio'][v]:.3f}x** ({r['ratio_min'][v]:.3f} - {r['ratio_max'][v]:.3f})"
                     if v in r["ratio"] else "1")
            m = memo.get((r["model"], r["px"], r["gc"], v))
            mem = (m.get("error") or B.gib(m["delta_bytes"])) if m else "n/a"
            lines.append(f"| {_label(r)} | {v} | {what} | {f['params'] / 1e6:.2f}M | {f.get('passes_per_step')} | "
                         f"{1e3 * r['median'][v]:.0f} | "
                         f"{1e3 * r['min'][v]:.0f} - {1e3 * r['max'][v]:.0f} | {ratio} | "
                         f"{r['overhead_median'][v]:.1f} | {mem} |")
    for r in times:
        for v, err in r.get("failed", {}).items():
            lines.append(f"| {_label(r)} | {v} | failed: {err} | | | | | | | |")
    for s in skipped:
        lines.append(f"\nSkipped: {s}")
    return "\n".join(lines)


def one_offs(times: list, mems: list) -> str:
    parts = [f"{_label(r)}: {r['pgd_s_per_image']:.1f} s per image" for r in times]
    befores = {}
    for m in mems:
        if "before_bytes" in m:
            befores.setdefault(f"{m['model']} {m['px']} px", m["before_bytes"])
    return ("LoRD's one-off PGD-2 data generation (2 attack iterations through VAE encoder + UNet per image, "
            "then cached on disk and reused by every later run on the same images/model): " + "; ".join(parts) +
            ". RSS before the memory calls (models loaded): " +
            "; ".join(f"{k}: {B.gib(b)}" for k, b in befores.items()) + ".")


def reading(times: list, mems: list = ()) -> str:
    """Each LoRD row against the goals (<= 1.3x core per sample; peak memory <= core's), with the cost per
    UNet pass, which separates what a pass costs from Eq. 7's two passes per sample."""
    memo = {(m["model"], m["px"], m["gc"], m["variant"]): m.get("delta_bytes") for m in mems}
    parts, notes = [], []
    for r in times:
        idle = [v for v in r["ratio"] if r["gc"] == "on" and (r["facts"][v].get("passes_per_step") or 0) <= 2]
        core_mem = memo.get((r["model"], r["px"], r["gc"], "core"))
        core_passes = r["facts"].get("core", {}).get("passes_per_step") or 1
        for v, x in r["ratio"].items():
            verdict = ("not comparable: LoRD's checkpointing did not run, see below" if v in idle else
                       f"{'meets' if x <= 1.3 else 'misses'} the <= 1.3x goal")
            passes = r["facts"][v].get("passes_per_step") or 1
            per_pass = x * core_passes / passes
            mem = memo.get((r["model"], r["px"], r["gc"], v))
            mem_txt = ""
            if mem is not None and core_mem is not None:
                mem_txt = (f"; peak memory {B.gib(mem)} vs core's {B.gib(core_mem)} "
                           f"({'meets' if mem <= core_mem else 'misses'} the <= core goal)")
            parts.append(f"{_label(r)}: {v} {x:.3f}x core per sample ({verdict}), {per_pass:.2f}x per UNet pass{mem_txt}")
        if idle:
            notes.append(
                f"In the {_label(r)} rows LoRD's gradient checkpointing did not recompute anything (2 UNet "
                "passes per step, as without it, against core's 2 = 1 + 1 recomputed): "
                "those rows compare core with checkpointing against LoRD without.")
    return "; ".join(parts) + "." + "".join(" " + n for n in dict.fromkeys(notes))


def write_markdown(path: pathlib.Path, times, mems, skipped, facts, args, explain: str) -> None:
    rt = "; ".join(f"{_label(r)}: {r['repeats']} rounds x {r['steps']} timed steps per variant" for r in times)
    contended = max([max(v) for r in times for v in r["other_cores"].values()]
                    + [m["other_cores"] for m in mems if "other_cores" in m], default=0.0)
    method = next((m["method"] for m in mems if "method" in m), "n/a")
    models = "; ".join(dict.fromkeys(f"{r['model']}: {r['desc']}" for r in times))
    body = "\n".join([
        MARK_START, "## Training cost: Stage-1 LoRD vs core Train LoRA (bench/bench_train.py)", "",
        *B.header_lines(facts),
        f"Models: {models}; random conditioning [1, 77, context]; {args.images} training images.  ",
        f"Settings, identical for both: rank {args.rank}, batch {args.batch}, AdamW lr {LEARNING_RATE:g}, fp32 "
        "training and adapter dtype, gradient checkpointing as given per row, fresh run per call. `core` = "
        "`comfy_extras.nodes_train.TrainLoraNode.execute` (core ComfyUI's Train LoRA node; LoRA on every "
        "Linear/Conv weight via weight wrappers merged each forward, plus full-size diffs of norm weights and "
        "biases); `lord` = `train_stage1` with LoRD's default `attn` targets (Eq. 7: a clean and a PGD-2 "
        "perturbed UNet pass per sample plus the gate BCE); `lord_proj` = targets `attn+proj`.  ",
        f"Timing: {rt}. Value = (end of optimizer step N+1 - end of step 1) / (N x batch), from a global "
        "`torch.optim` step post-hook, so model loading, adapter creation, LoRD's VAE encoding and PGD-2 data "
        "generation and the first step are excluded (call overhead = call wall time - (N+1) steady steps, "
        "shown separately; negative when the first step was faster than the later ones). One untimed warm-up "
        "call per variant, then rounds with the order rotated; ratio = median of per-round LoRD/core ratios. "
        f"Timing workers' malloc: {times[0]['malloc'] if times else 'n/a'} (with `steady_malloc`'s 2 GiB trim "
        "threshold glibc returned core's per-step rebuilt weights, 3.2 GiB on the SD1.5 UNet, to the OS and "
        "page-faulted them back every step: about +25% on core's sd15 256 px step, nothing on LoRD's). "
        "Calls during which other processes used >= "
        f"{args.max_other_cpu} cores were redone (at most {args.retries} times): "
        f"{sum(r['discarded'] for r in times)} redone; most CPU used by other processes during a kept call: "
        f"{contended:.2f} cores.  ",
        f"Memory: one 2-step call per variant in a fresh process (models loaded, PGD cache filled first); {method}.",
        "", tables(times, mems, skipped), "", one_offs(times, mems), "", reading(times, mems) + " " + explain, MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


EXPLAIN = (
    "What sets the ratio: LoRD runs two UNet forward/backward passes per sample (clean + perturbed, Eq. 7), "
    "core one, so LoRD meets 1.3x per sample only where its pass costs at most 0.65x core's. Core's LoRA is a "
    "weight wrapper on every Linear/Conv weight: each forward rebuilds every weight as W + BA and its backward "
    "computes the full weight-sized gradient of every layer (dL/dW, as a full fine-tune would) before reducing "
    "it to A and B, whereas LoRD's hooks leave the base weights untouched, need only activation gradients "
    "through the frozen base and add their branches through the rank-r code (`layer.lord_add_lowrank`: one "
    "addmm into the layer output, no full-size intermediate saved). A LoRD pass is therefore cheaper than a "
    "core pass by about the weight-gradient work, which is a large share of a weight-heavy UNet at low "
    "resolution and a small one where activations dominate (larger images: attention grows with the square of "
    "the token count and is the same work in both). Memory: LoRD back-propagates the clean term as soon as "
    "the clean pass is done (`trainer.paired_losses(backward=...)`), so it holds one pass's autograd graph at "
    "a time; core's holds one pass plus a merged copy of every adapted weight saved for its backward. Left "
    "for the per-sample goal where it is missed: the second pass itself, which Eq. 7 requires; running the "
    "clean and perturbed samples as one batch of 2 would do the same arithmetic (the UNet mixes nothing across "
    "samples) but hold both graphs at once, i.e. give up the memory goal, for better GEMM utilisation that "
    "matters on a GPU more than on this CPU.")


def parse_args(argv=None):
    """The command line (``--images`` resolved to its default); :mod:`bench_scaling` builds its worker
    options here too."""
    ap = B.new_parser(__doc__, quick="smoke run: tiny model, 64 px, 1 round of 1 step, no markdown",
                      steps="timed optimizer steps per call (default: ckpt 4, sd15 2, tiny 3; 2 from 512 px)",
                      repeats="rounds (default: ckpt 5, sd15 3, tiny 3; 2 from 512 px; quick 1)")
    ap.add_argument("--configs", default=None,
                    help="comma list of model:px[:gc[:variants joined by +]] (models tiny, ckpt, sd15; gc on/off, "
                         f"default --gc; variants default --variants); default {DEFAULT_CONFIGS} (quick: tiny:64)")
    ap.add_argument("--variants", default=None,
                    help=f"comma list of {','.join(VARIANTS)} (default core,lord,lord_proj; quick: core,lord)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--images", type=int, default=None, help="training images (default max(2, batch))")
    ap.add_argument("--gc", default="off", choices=("off", "on"), help="gradient checkpointing for both (default off)")
    B.add_machine_args(ap)
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory workers")
    ap.add_argument("--work", default=None, help="folder for the test checkpoint and PGD caches (default: a temp dir)")
    B.add_output_args(ap)
    ap.add_argument("--worker", choices=("time", "mem"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--px", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.images = args.images or max(2, args.batch)
    return ap, args


def main(argv=None) -> None:
    B.import_comfy()
    ap, args = parse_args(argv)
    if args.worker:
        res = worker_time(args) if args.worker == "time" else worker_mem(args)
        B.emit_result(res)
        return

    start = time.time()
    facts = B.machine_facts("bench-train")
    log(json.dumps(facts))
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="bench_train_")
    variants = args.variants or ("core,lord" if args.quick else "core,lord,lord_proj")
    configs = []
    for c in (args.configs or ("tiny:64" if args.quick else DEFAULT_CONFIGS)).split(","):
        parts = c.split(":")
        vs = parts[3].replace("+", ",") if len(parts) > 3 else variants
        if "core" not in vs.split(","):
            ap.error(f"config {c}: the variants must include core (the reference)")
        configs.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 and parts[2] else args.gc, vs))
    times, mems, skipped = [], [], []
    try:
        for model, px, gc, variants in configs:
            steps, repeats = DEFAULTS[model] if px < 512 else (2, 2)
            steps, repeats = (1, 1) if args.quick else (args.steps or steps, args.repeats or repeats)
            t = run_worker("time", args, model, px, gc, variants, steps, repeats)
            if "error" in t:
                skipped.append(f"{model} {px} px timing: {t['error']}")
                log(skipped[-1])
                continue
            times.append(t)
            log(f"[{model} {px}px gc={gc}] " + ", ".join(f"{v} {1e3 * x:.0f} ms/sample" for v, x in t["median"].items())
                + "; " + ", ".join(f"{v}/core {x:.3f}x" for v, x in t["ratio"].items()))
            if not args.no_mem:
                for v in t["runs"]:  # the variants that ran
                    mems.append(run_worker("mem", args, model, px, gc, v))
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    facts["loadavg_end"] = os.getloadavg()[0]
    facts["total_min"] = (time.time() - start) / 60
    print(tables(times, mems, skipped))
    print()
    print(one_offs(times, mems))
    print(reading(times))
    B.finish(args, lambda path: write_markdown(path, times, mems, skipped, facts, args, EXPLAIN),
             {"facts": facts, "times": times, "mems": mems, "skipped": skipped})


if __name__ == "__main__":
    main()
