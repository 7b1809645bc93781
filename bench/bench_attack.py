"""Cost of the LoRD Protect attack on SD1.5-geometry models: glue overhead, peak memory, time per image.

Models: a random UNet with the real SD1.5 geometry (``tiny.sd15_full_unet_config()``, 860M parameters,
fp32) and, by default, a random KL VAE with the real SD1.5 geometry (the stock ``AutoencoderKL``
ddconfig, 83.7M parameters, built by ``comfy.sd.VAE`` from a state dict exactly as a checkpoint's VAE
is; ``--vae taesd`` uses a random TAESD instead). Conditioning is a random ``[1, 77, 768]`` tensor.
Nothing is downloaded.

Measured:

* **Iteration time**, ``glue`` vs ``bare``. ``glue`` = ``lord_ops.attacks.run_attack`` (method ace,
  the mist-v2 step sizes) driven by the ComfyUI glue of ``lord_ops/comfy/grad.py``
  (``load_for_gradients``, ``latent_encoder``, ``noise_predictor``, ``alphas_cumprod``,
  ``encode_target``), run under ``torch.inference_mode()`` like ComfyUI's executor. ``bare`` = the same
  iteration written directly against the two modules: ``vae.first_stage_model.encode`` with grad,
  times the latent scale, DDPM noise at a random timestep (the same generator draws as
  ``run_attack``), ``diffusion_model(z_t, t, context)``, MSE to the target latent, backward to the
  pixels, sign step and projection. Both start from the same image and draw the same timesteps and
  noise, so their first-step losses must agree (reported as a check). After one untimed warm-up
  iteration each, R rounds run ``glue`` and ``bare`` N iterations each (order alternating); a run's
  value is its wall time / N. Reported: medians, min-max, and the glue/bare ratio as the median of
  per-round ratios. Shared machines: before each timed run the worker waits until other processes are
  quiet, and a run during which they used >= ``--max-other-cpu`` cores is redone (``--retries``); the
  timing workers pin glibc malloc (:func:`steady_malloc`) unless ``--stock-malloc``.
* **Peak memory** of a 2-iteration glue attack with ``low_memory`` off and on, each in a fresh
  subprocess. CPU: peak RSS during the attack minus RSS before it (Linux: the peak is reset through
  ``/proc/self/clear_refs`` after the models are built and ``malloc_trim``'d; elsewhere the
  ``ru_maxrss`` high-water mark, which can hide a peak lower than the build's). CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the attack.
* **Seconds per 512 px image** for ``attacks.PRESETS["ace_fixed"]`` (150 iterations), extrapolated
  as 150 x the measured per-iteration time (plus nothing for the one-off target encode).
* **The mist_v2 preset** (``attacks.SURROGATE_PRESETS["mist_v2"]``: 5 rounds x 30 ACE iterations,
  10 surrogate LoRA steps between rounds, low_memory on) through the real entry point
  ``lord_ops.comfy.protect.protect`` (what the Protect node and ``training/attack.py`` call) on one
  512 px image, with low_memory on and off, each in a fresh process: a **reduced** schedule of the
  same code path (``--mist-schedule``, default 2 rounds x 2 ACE iterations, 2 LoRA steps; only the
  counts changed through ``dataclasses.replace``) is run with its phases time-stamped (pass-through
  wrappers around ``surrogate.run_attack`` / ``surrogate.train_surrogate_steps`` in the worker, steps
  from protect's ``on_progress``) and the peak memory of each phase read (:meth:`PeakMemory.lap`);
  the full preset's time is **extrapolated** from the per-phase times (:func:`mist_extrapolate`).

    make bench-attack    # the defaults (estimated ~15 min on 2 CPU cores: the last full run without the
                         # mist_v2 part took 9.8 min with 3 rounds at 256 px, now 2)
    python -m bench.bench_attack [--quick] [--sizes 256,512] [--steps N] [--repeats R] [--mist-px 512]
                                 [--mist-schedule 2,2,2] [--md PATH]

Writes its own section of ``BENCHMARKS.md`` (between the ``bench_attack`` markers) unless ``--quick``
(a smoke run: tiny UNet, random TAESD, 64 px, 1 iteration; mist_v2 at 64 px, 2 rounds x 1 iteration,
1 LoRA step) or ``--md ''``. The full run keeps to ``--budget-min`` (default 26, above the ~20 min the defaults
took on a 2-core Xeon VM, where an 18 min budget skipped the second mist_v2 run) minutes: a size or a mist_v2 run whose projected cost does not fit is skipped and the section
says so. Default timed rounds: 2 at 256 px (was 3, to make room for the mist_v2 runs), 3 at 512 px.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time

from bench import benchlib as B
from bench.benchlib import log, steady_malloc, sync

import torch

from lord_ops import attacks
from lord_ops.comfy import grad

MARK_START, MARK_END = "<!-- bench_attack:start -->", "<!-- bench_attack:end -->"
PRESET = attacks.PRESETS["ace_fixed"]
MIST = attacks.SURROGATE_PRESETS["mist_v2"]
# the reduced mist_v2 schedule that is run (rounds, ACE iterations per round, LoRA steps between rounds)
MIST_REDUCED = (2, 2, 2)
CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Models and inputs


VAE_NAMES = {"kl": "random KL VAE, real SD1.5 geometry (AutoencoderKL ch 128, mult 1-2-4-4)", "taesd": "random TAESD"}


def build_vae(kind: str):
    """:func:`benchlib.random_vae` and its description (parameters, encoder parameters, dtype)."""
    vae = B.random_vae(kind)
    enc = sum(p.numel() for n, p in vae.first_stage_model.named_parameters()
              if n.startswith(("encoder.", "quant_conv.", "taesd_encoder.")))
    return vae, (f"{VAE_NAMES[kind]}, {B.params_m(vae.first_stage_model):.1f}M parameters "
                 f"({enc / 1e6:.1f}M in the encoder), {vae.vae_dtype}")


def build_unet(kind: str):
    mp = B.random_unet(kind)
    return mp, f"{B.UNET_NAMES[kind]}, {B.params_m(mp.model.diffusion_model):.1f}M parameters, fp32"


def make_inputs(model_patcher, px: int, seed: int = 3):
    """A smooth random image ``[1, 3, px, px]`` in [0, 1] and a random CONDITIONING."""
    g = torch.Generator().manual_seed(seed)
    ctx = model_patcher.model.model_config.unet_config["context_dim"]
    img = B.smooth_image(px, g)
    cond = [[torch.randn(1, 77, ctx, generator=g) * 0.5, {}]]
    return img, cond


class Setup:
    """Models loaded for gradients plus the glue callables and target latent for one image size."""

    def __init__(self, unet: str, vae_kind: str, px: int):
        t = time.perf_counter()
        self.model, self.unet_desc = build_unet(unet)
        self.vae, self.vae_desc = build_vae(vae_kind)
        self.img, self.cond = make_inputs(self.model, px)
        grad.load_for_gradients(self.model, self.vae)
        self.encode = grad.latent_encoder(self.vae, self.model)
        self.predict = grad.noise_predictor(self.model, self.cond, (px, px))
        self.acp = grad.alphas_cumprod(self.model)
        self.target = grad.encode_target(self.vae, self.model, None, self.img)
        self.device = grad.compute_device(self.model)
        self.build_s = time.perf_counter() - t


def config(steps: int, low_memory: bool = False) -> attacks.AttackConfig:
    return attacks.AttackConfig(**{**PRESET.__dict__, "steps": steps, "low_memory": low_memory})


def glue_attack(s: Setup, steps: int, low_memory: bool = False) -> tuple[float, list]:
    """``run_attack`` with the ComfyUI glue, under inference mode like ComfyUI; (seconds, loss trace)."""
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        res = attacks.run_attack(s.img, config(steps, low_memory), s.encode, s.predict, s.acp, s.target)
    sync()
    return time.perf_counter() - t, res.loss_trace


def bare_attack(s: Setup, steps: int) -> tuple[float, list]:
    """The same attack written directly against ``first_stage_model`` and ``diffusion_model``."""
    cfg = config(steps)
    dev = grad.use_models(s.model, s.vae)  # loaded (and on its device) before the modules run, outside the timer
    vae_net, unet = s.vae.first_stage_model, s.model.model.diffusion_model
    scale = float(s.model.model.latent_format.scale_factor)
    context = s.cond[0][0].to(dev)
    acp = s.acp.to(dev)
    target = s.target.to(dev).float()
    eps, step = cfg.epsilon / 255.0, cfg.step_size / 255.0
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    trace = []
    sync()
    t0 = time.perf_counter()
    original = s.img.to(dev)
    x = original.clone()
    for _ in range(steps):
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (1,), generator=g)
        x_in = x.detach().requires_grad_(True)
        z = vae_net.encode((x_in * 2 - 1).to(s.vae.vae_dtype)).float() * scale
        noise = torch.randn(z.shape, generator=g).to(dev)
        a = acp[t.to(dev)].reshape(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(z_t, t.to(dev).float(), context=context).float()
        loss = (pred - target).square().mean()
        loss.backward()
        trace.append(float(loss.detach()))
        with torch.no_grad():
            x = torch.max(torch.min(x - step * x_in.grad.sign(), original + eps), original - eps).clamp(0, 1)
    sync()
    return time.perf_counter() - t0, trace


# ----------------------------------------------------------------------------------------------
# Workers (each runs in a fresh subprocess)


def worker_time(args) -> dict:
    malloc = "stock" if (args.stock_malloc or CUDA) else steady_malloc()
    s = Setup(args.unet, args.vae, args.px)
    log(f"[time {args.px}px] built in {s.build_s:.1f} s: {s.unet_desc}; {s.vae_desc}")
    # warm-up (one iteration each) and the same-computation check on the first step
    B.wait_until_quiet(args.max_other_cpu, args.quiet_timeout)
    gs, g_trace = glue_attack(s, 1)
    bs, b_trace = bare_attack(s, 1)
    first_diff = abs(g_trace[0] - b_trace[0]) / max(abs(b_trace[0]), 1e-12)
    log(f"[time {args.px}px] warm-up: glue {gs:.2f} s, bare {bs:.2f} s; first-step loss glue {g_trace[0]:.6g} "
        f"bare {b_trace[0]:.6g} (rel. diff {first_diff:.2e})")
    runs = {"glue": [], "bare": []}
    others = {"glue": [], "bare": []}
    faults = {"glue": [], "bare": []}
    waited, discarded = 0.0, 0
    for r in range(args.repeats):
        for kind in B.rotated(("glue", "bare"), r):
            fn = glue_attack if kind == "glue" else bare_attack
            run = B.quiet_run(lambda: fn(s, args.steps), args.max_other_cpu, args.retries, args.quiet_timeout,
                              on_redo=lambda other: log(f"[time {args.px}px] {kind} run disturbed "
                                                        f"(other processes {other:.2f} cores): redo"))
            waited, discarded = waited + run["waited"], discarded + run["redone"]
            faults[kind].append(run["minflt"] / args.steps)
            runs[kind].append(run["result"][0] / args.steps)
            others[kind].append(run["other"])
        log(f"[time {args.px}px] round {r + 1}/{args.repeats}: glue {runs['glue'][-1]:.3f} s/it, "
            f"bare {runs['bare'][-1]:.3f} s/it (other processes {max(others['glue'][-1], others['bare'][-1]):.2f} cores; "
            f"page faults/it glue {faults['glue'][-1]:.0f}, bare {faults['bare'][-1]:.0f})")
    ratios = B.paired_ratios(runs["glue"], runs["bare"])
    return {"px": args.px, "steps": args.steps, "repeats": args.repeats, "runs": runs, "other_cores": others,
            "minflt_per_iter": faults, "malloc": malloc, "discarded": discarded, **B.spread(runs),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_of_medians": statistics.median(runs["glue"]) / statistics.median(runs["bare"]),
            "first_step_loss": {"glue": g_trace[0], "bare": b_trace[0], "rel_diff": first_diff},
            "waited_s": waited, "build_s": s.build_s, "unet": s.unet_desc, "vae": s.vae_desc}


def worker_mem(args) -> dict:
    s = Setup(args.unet, args.vae, args.px)
    sync()
    mem = B.PeakMemory()
    t = []
    trace = []

    def on_step(i, loss, cur):
        sync()
        t.append(time.perf_counter())
        trace.append(loss)

    B.wait_until_quiet(args.max_other_cpu, args.quiet_timeout)
    t0 = time.perf_counter()

    def attack():
        with torch.inference_mode():
            attacks.run_attack(s.img, config(args.steps, bool(args.low_memory)), s.encode, s.predict, s.acp,
                               s.target, on_step)

    _, _, other = B.other_load(attack)
    iter_s = [b - a for a, b in zip([t0] + t[:-1], t)]
    out = {"px": args.px, "low_memory": bool(args.low_memory), **mem.result(), "iter_s": iter_s,
           "other_cores": other, "trace": trace, "build_s": s.build_s}
    log(f"[mem {args.px}px low_memory={bool(args.low_memory)}] peak delta {out['delta_bytes'] / 2**30:.2f} GiB "
        f"(before {out['before_bytes'] / 2**30:.2f} GiB), iterations {', '.join(f'{x:.2f}' for x in iter_s)} s, "
        f"other processes {other:.2f} cores")
    return out


def mist_configs(rounds: int, steps: int, train_steps: int, low_memory: bool):
    """The mist_v2 preset with only the counts (and low_memory) changed: the same code path."""
    return (dataclasses.replace(MIST.attack, steps=steps, low_memory=low_memory),
            dataclasses.replace(MIST.surrogate, rounds=rounds, train_steps=train_steps))


def mist_phases(events: list) -> dict:
    """Per-phase durations from the time line of a surrogate run: ``events`` = ``(kind, seconds)``
    with kinds ``call``, ``ace_start``, ``lora_start``, ``step`` (a progress callback), ``ace_end``,
    ``lora_end``, ``return``. ``ace`` / ``lora``: step durations per round / per LoRA phase (a step =
    from the previous step or the phase start to its callback); ``setup_s``: call -> first ACE round;
    ``between_s``: per transition, last ACE step of a round -> first ACE step's start of the next (the
    LoRA phase with its image encode, and the loop's bookkeeping); ``tail_s``: last step -> return."""
    ace, lora, between = [], [], []
    cur, prev, last_step, t_call, setup = None, None, None, None, None
    for kind, t in events:
        if kind == "call":
            t_call = t
        elif kind in ("ace_start", "lora_start"):
            if kind == "ace_start":
                if setup is None:
                    setup = t - t_call
                else:
                    between.append(t - last_step)
            cur, prev = [], t
            (ace if kind == "ace_start" else lora).append(cur)
        elif kind == "step":
            cur.append(t - prev)
            prev = t
            if ace and cur is ace[-1]:
                last_step = t
        elif kind == "return":
            return {"ace": ace, "lora": lora, "between": between, "setup_s": setup, "tail_s": t - last_step,
                    "wall_s": t - t_call}
    raise ValueError("the time line has no return")


def mist_extrapolate(ph: dict, rounds: int, steps: int, train_steps: int) -> dict:
    """Seconds of a surrogate run with ``rounds`` x ``steps`` ACE iterations and ``train_steps`` LoRA
    steps between rounds, from the measured phases ``ph`` (:func:`mist_phases`):
    ``one_off + rounds*steps*ace_s + (rounds-1)*(train_steps*lora_s + overhead_s)`` where ``ace_s`` =
    median ACE iteration except the run's first (warm-up), ``lora_s`` = median LoRA step except the
    first of each phase (all when a phase has one), ``overhead_s`` = mean between-rounds time minus
    its LoRA steps at ``lora_s`` (image encode, fresh optimizer, first-step excess), ``one_off`` =
    setup + the first iteration's excess + tail."""
    flat = [x for r in ph["ace"] for x in r]
    ace_s = statistics.median(flat[1:] or flat)
    later = [x for p in ph["lora"] for x in p[1:]] or [x for p in ph["lora"] for x in p]
    lora_s = statistics.median(later) if later else 0.0
    measured_t = statistics.mean(len(p) for p in ph["lora"]) if ph["lora"] else 0
    overhead = statistics.mean(ph["between"]) - measured_t * lora_s if ph["between"] else 0.0
    one_off = ph["setup_s"] + (flat[0] - ace_s) + ph["tail_s"]
    total = one_off + rounds * steps * ace_s + (rounds - 1) * (train_steps * lora_s + overhead)
    return {"ace_s": ace_s, "lora_s": lora_s, "overhead_s": overhead, "one_off_s": one_off, "total_s": total,
            "ace_samples": len(flat[1:] or flat), "lora_samples": len(later)}


def worker_mist(args) -> dict:
    """The mist_v2 preset through ``lord_ops.comfy.protect.protect`` (what the Protect node and the
    CLI call) on one image, with the reduced schedule; phase time stamps and per-phase peak memory.

    The two phase functions that ``comfy/surrogate.py`` calls (``run_attack``: one ACE round;
    ``train_surrogate_steps``: one LoRA phase) are wrapped, for this process only, by pass-throughs
    that record a time stamp and a memory lap at their start and end; the steps are timed from
    protect's own ``on_progress`` callback."""
    from lord_ops.comfy import protect as P
    from lord_ops.comfy import surrogate as S

    malloc = "stock" if (args.stock_malloc or CUDA) else steady_malloc()
    t = time.perf_counter()
    model, unet_desc = build_unet(args.unet)
    vae, vae_desc = build_vae(args.vae)
    img, cond = make_inputs(model, args.px)
    build_s = time.perf_counter() - t
    attack, sur = mist_configs(args.rounds, args.steps, args.train_steps, bool(args.low_memory))
    events, laps = [], []
    B.wait_until_quiet(args.max_other_cpu, args.quiet_timeout)
    sync()
    mem = B.PeakMemory()

    def mark(kind: str, ended: str = "") -> None:
        sync()
        events.append((kind, time.perf_counter()))
        if ended:
            laps.append((ended, mem.lap()))

    real_run, real_train = S.run_attack, S.train_surrogate_steps

    def run_attack(*a, **k):
        mark("ace_start", "setup" if not laps else "lora")
        res = real_run(*a, **k)
        mark("ace_end", "ace")
        return res

    def train_surrogate_steps(*a, **k):
        mark("lora_start", "lora")  # the phase's image encode ran since the ACE round ended
        res = real_train(*a, **k)
        mark("lora_end", "lora")
        return res

    def attack_once():
        mark("call")
        with torch.inference_mode():
            out = P.protect(model, vae, cond, img.movedim(1, -1), P.Protection(attack, sur),
                            lambda done, total, loss, preview: mark("step"))
        mark("return", "tail")
        return out

    S.run_attack, S.train_surrogate_steps = run_attack, train_surrogate_steps
    try:
        (_, report), _, other = B.other_load(attack_once)
    finally:
        S.run_attack, S.train_surrogate_steps = real_run, real_train
    ph = mist_phases(events)
    counts = ([len(r) for r in ph["ace"]], [len(p) for p in ph["lora"]])
    expected = ([args.steps] * args.rounds, [args.train_steps] * (args.rounds - 1 if args.train_steps else 0))
    if counts != expected:
        raise RuntimeError(f"phase counts {counts} != schedule {expected}")
    peaks = {}
    for label, b in laps:
        peaks[label] = max(peaks.get(label, 0), b)
    out = {"px": args.px, "low_memory": bool(args.low_memory), **mem.result(), "peaks": peaks,
           "schedule": [args.rounds, args.steps, args.train_steps], "phases": ph,
           "fit": mist_extrapolate(ph, args.rounds, args.steps, args.train_steps),
           "full": mist_extrapolate(ph, MIST.surrogate.rounds, MIST.attack.steps, MIST.surrogate.train_steps),
           "surrogate_layers": report["surrogate_layers"], "compute_dtype": report["compute_dtype"],
           "other_cores": other, "malloc": malloc, "build_s": build_s, "unet": unet_desc, "vae": vae_desc}
    log(f"[mist {args.px}px low_memory={bool(args.low_memory)}] ACE {out['full']['ace_s']:.2f} s/it, LoRA "
        f"{out['full']['lora_s']:.2f} s/step, per-round overhead {out['full']['overhead_s']:.2f} s, one-off "
        f"{out['full']['one_off_s']:.1f} s; peak delta {B.gib(out['delta_bytes'])} (ACE "
        f"{B.gib(peaks.get('ace', 0))}, LoRA {B.gib(peaks.get('lora', 0))}); full preset extrapolated "
        f"{out['full']['total_s'] / 60:.1f} min; other processes {other:.2f} cores")
    return out


def run_worker(kind: str, args, px: int, low_memory: int = 0, steps: int = 2, repeats: int = 1,
               extra: tuple = ()) -> dict:
    argv = ["--worker", kind, "--px", px, "--unet", args.unet, "--vae", args.vae, "--steps", steps,
            "--repeats", repeats, "--low-memory", low_memory, "--max-other-cpu", args.max_other_cpu,
            "--quiet-timeout", args.quiet_timeout, "--retries", args.retries, *extra]
    argv += ["--stock-malloc"] if args.stock_malloc else []
    return B.run_worker(__file__, argv, {"px": px, "low_memory": bool(low_memory)})


# ----------------------------------------------------------------------------------------------
# Report


def tables(times: list, mems: list, skipped: list) -> str:
    lines = ["| size | path | median s/iteration | min - max | glue / bare (median of rounds, min - max) |",
             "|---|---|---:|---|---|"]
    for r in times:
        for kind in ("glue", "bare"):
            ratio = (f"**{r['ratio']:.3f}x** ({r['ratio_min']:.3f} - {r['ratio_max']:.3f})" if kind == "glue" else "")
            lines.append(f"| {r['px']} px | {kind} | {r['median'][kind]:.2f} | {r['min'][kind]:.2f} - "
                         f"{r['max'][kind]:.2f} | {ratio} |")
    lines += ["", "| size | low_memory | peak memory delta during the attack | RSS/allocated before | "
              "iteration times (s; stock malloc, for the low_memory ratio only) |", "|---|---|---:|---:|---|"]
    for m in mems:
        if "error" in m:
            lines.append(f"| {m['px']} px | {m['low_memory']} | {m['error']} | | |")
            continue
        lines.append(f"| {m['px']} px | {m['low_memory']} | {B.gib(m['delta_bytes'])} | {B.gib(m['before_bytes'])} | "
                     f"{', '.join(f'{x:.2f}' for x in m['iter_s'])} |")
    for s in skipped:
        lines.append(f"\nSkipped: {s}")
    return "\n".join(lines)


def low_memory_slowdown(mems: list, px: int):
    """Second-iteration time with low_memory / without, from the memory runs at ``px`` (same conditions)."""
    by = {m["low_memory"]: m for m in mems if m.get("px") == px and "iter_s" in m}
    if True in by and False in by:
        return by[True]["iter_s"][-1] / by[False]["iter_s"][-1]
    return None


def extrapolation(times: list, mems: list) -> str:
    if times and "SD1.5 geometry" not in times[0]["unet"]:
        return "(no 512 px extrapolation: not the SD1.5-geometry UNet)"
    big = [r for r in times if r["px"] == 512]
    if big:
        per = big[0]["median"]["glue"]
        src = "the measured 512 px glue median"
    elif times:
        r = max(times, key=lambda x: x["px"])
        per = r["median"]["glue"] * (512 / r["px"]) ** 2
        src = f"the {r['px']} px glue median scaled by pixel count (x{(512 / r['px']) ** 2:.0f}; 512 px not measured)"
    else:
        return ""
    slow = low_memory_slowdown(mems, 512)
    extra = ""
    if slow:
        extra = (f"; with low_memory about {PRESET.steps * per * slow / 60:.0f} min (x{slow:.2f}, the low_memory / "
                 f"normal ratio of the 512 px memory runs' second iterations)")
    return (f"ACE with mist-v2's numbers against the fixed model (`ace_fixed`, {PRESET.steps} iterations) on one 512 px image: "
            f"**about {PRESET.steps * per:.0f} s ({PRESET.steps * per / 60:.1f} min), extrapolated** as "
            f"{PRESET.steps} x {per:.2f} s ({src}){extra}.")


def reading(times: list, mems: list) -> str:
    parts = []
    for r in times:
        parts.append(f"{r['px']} px: the glue costs {r['ratio']:.3f}x the bare loop "
                     f"({'meets' if r['ratio'] <= 1.10 else 'misses'} the <= 1.10x goal)")
    by = {(m["px"], m["low_memory"]): m for m in mems if "delta_bytes" in m}
    for px in sorted({p for p, _ in by}):
        if (px, False) in by and (px, True) in by:
            a, b = by[(px, False)]["delta_bytes"], by[(px, True)]["delta_bytes"]
            slow = low_memory_slowdown(mems, px)
            parts.append(f"at {px} px low_memory changes the attack's peak from {B.gib(a)} to {B.gib(b)} "
                         f"({(b - a) / max(a, 1) * 100:+.0f}%)" + (f" for x{slow:.2f} the iteration time" if slow else ""))
    return ("; ".join(parts) + ". The glue adds a sigma-space round trip, ComfyUI's `extra_conds`/`apply_model` "
            "wrappers and a loss trace per step, all negligible next to the VAE encoder and UNet forward/backward "
            "that both paths run identically, so ratios within a few percent of 1.0 are noise. low_memory frees the encoder graph while the UNet graph is alive and "
            "re-runs the encoder once (checkpointed), so it trades one extra encoder forward per step for memory; "
            "on CPU, RSS also holds the allocator's caches, so read small memory differences with care. "
            "Single runs on a shared 2-core VM vary by several percent.")


# mist-v2's own figures as cited in issue 13 (a quotation, not a result of this benchmark)
MIST_PUBLISHED = "3-5 min and about 6 GB of GPU memory per image on an A100-class GPU"


def mist_table(mists: list) -> str:
    if not mists:
        return ""
    px = mists[0]["px"]
    lines = [(f"| low_memory | s per ACE iteration | s per LoRA step | overhead per round (s) | one-off (s) | "
              f"mist_v2 per {px} px image, **extrapolated** | reduced run: measured / same formula | peak memory "
              f"delta: overall (ACE phase / LoRA phase) | RSS/allocated before |"),
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for m in mists:
        if "error" in m:
            lines.append(f"| {m['low_memory']} | {m['error']} | | | | | | | |")
            continue
        f, r = m["full"], m["fit"]
        lines.append(f"| {m['low_memory']} | {f['ace_s']:.2f} | {f['lora_s']:.2f} | {f['overhead_s']:.1f} | "
                     f"{f['one_off_s']:.1f} | **{f['total_s'] / 60:.1f} min** | {m['phases']['wall_s']:.0f} s / "
                     f"{r['total_s']:.0f} s | {B.gib(m['delta_bytes'])} ({B.gib(m['peaks'].get('ace', 0))} / "
                     f"{B.gib(m['peaks'].get('lora', 0))}) | {B.gib(m['before_bytes'])} |")
    return "\n".join(lines)


def mist_reading(mists: list, facts: dict) -> str:
    """The mist_v2 lines: what was run, the extrapolation with its numbers, low_memory, the published figures."""
    ok = [m for m in mists if "error" not in m]
    if not ok:
        return ""
    a, sur = MIST.attack, MIST.surrogate
    rm, sm, tm = ok[0]["schedule"]
    px = ok[0]["px"]
    parts = [(
        f"`mist_v2` as it stands ({sur.rounds} rounds x {a.steps} ACE iterations, {sur.train_steps} surrogate LoRA "
        f"steps between rounds: rank {sur.rank}, `{sur.targets}` targets ({ok[0]['surrogate_layers']} layers here), "
        f"lr {sur.learning_rate:g}, prior_weight {sur.prior_weight:g} (no class images here, so no prior term)) "
        f"through the real entry point `lord_ops.comfy.protect.protect` (what the LoRD Protect node and "
        f"`training/attack.py` call), one {px} px image, compute {ok[0]['compute_dtype']}. Run: a **reduced** "
        f"schedule of the same code path, only the counts changed ({rm} rounds x {sm} ACE iterations, {tm} LoRA "
        f"steps between), in a fresh process per row (malloc: {ok[0]['malloc']}); pass-through wrappers around the "
        f"two phase functions `comfy/surrogate.py` calls (`run_attack`, `train_surrogate_steps`) stamp each phase's "
        f"start and end and read the phase's peak memory, the steps are timed from protect's `on_progress` callback. "
        f"The full preset is **extrapolated, not measured**: one-off + {sur.rounds * a.steps} x s/ACE iteration + "
        f"{sur.rounds - 1} x ({sur.train_steps} x s/LoRA step + overhead per round), with s/ACE iteration = median "
        f"of the run's ACE iterations but its first, s/LoRA step = median of the LoRA steps but each phase's first, "
        f"overhead per round = the measured time between two ACE rounds minus its LoRA steps at that median (the "
        f"phase's image encode, a fresh optimizer, first-step excess), one-off = setup (clone, LoRA, target encode) "
        f"+ the first iteration's excess + the tail: ")]
    for m in ok:
        f = m["full"]
        parts.append(f"low_memory {m['low_memory']}: {f['one_off_s']:.0f} + {sur.rounds * a.steps} x {f['ace_s']:.2f} "
                     f"+ {sur.rounds - 1} x ({sur.train_steps} x {f['lora_s']:.2f} + {f['overhead_s']:.1f}) = "
                     f"{f['total_s']:.0f} s = **{f['total_s'] / 60:.1f} min** "
                     f"({f['ace_samples']} ACE / {f['lora_samples']} LoRA samples); ")
    text = "".join(parts).rstrip("; ") + (". Check of the formula: on the reduced schedule it gives " + ", ".join(
        f"{m['fit']['total_s']:.0f} s against the measured {m['phases']['wall_s']:.0f} s (low_memory {m['low_memory']})"
        for m in ok) + f". For a set of n images the ACE iterations scale with n, the "
        f"{(sur.rounds - 1) * sur.train_steps} LoRA steps do not.")
    by = {m["low_memory"]: m for m in ok}
    if True in by and False in by:
        on, off = by[True], by[False]
        text += (f" low_memory (the preset's default; off = the CLI's `--no-low-memory`, the Protect node keeps it "
                 f"on for this preset) changes the peak from {B.gib(off['delta_bytes'])} to "
                 f"{B.gib(on['delta_bytes'])} ({(on['delta_bytes'] - off['delta_bytes']) / max(off['delta_bytes'], 1) * 100:+.0f}%) "
                 f"for x{on['full']['ace_s'] / off['full']['ace_s']:.2f} the ACE iteration time "
                 f"(x{on['full']['total_s'] / off['full']['total_s']:.2f} the whole preset).")
    if "cuda" not in facts.get("device", ""):
        text += (" On CPU a phase's peak RSS includes what the allocator kept from the phase before it (the "
                 "high-water mark restarts at the current RSS), so the LoRA-phase figure, read after an ACE round, "
                 "is an upper bound; the overall peak is read as in the rows above.")
    ref = by.get(True, ok[0])
    total = ref["before_bytes"] + ref["delta_bytes"]
    if "cuda" in facts.get("device", ""):
        text += (f" mist-v2 reports {MIST_PUBLISHED}. This run, on {facts['device']}: "
                 f"{ref['full']['total_s'] / 60:.1f} min (low_memory {ref['low_memory']}, extrapolated) and a peak of "
                 f"{B.gib(total)} allocated (the models, loaded onto the GPU during the call, included), compute "
                 f"{ref['compute_dtype']}.")
    else:
        text += (f" mist-v2 reports {MIST_PUBLISHED}. No GPU was available for this run (device "
                 f"{facts.get('device', 'cpu')}): the minutes above are **not comparable** with those (2 CPU cores "
                 f"against a GPU, {ref['compute_dtype']} against mist-v2's mixed precision); memory is comparable in "
                 f"order only: the low_memory {ref['low_memory']} run peaked at {B.gib(ref['delta_bytes'])} over the "
                 f"{B.gib(ref['before_bytes'])} the process already held with its {ref['compute_dtype']} models ({B.gib(total)} "
                 f"in all, CPU RSS with the allocator's caches) against ~6 GB.")
    return text


def write_markdown(path: pathlib.Path, times, mems, skipped, facts, args, mists=()) -> None:
    rt = "; ".join(f"{r['px']} px: {r['repeats']} rounds x {r['steps']} iteration(s) per path"
                   for r in times) or "none"
    checks = "; ".join(f"{r['px']} px first-step loss glue {r['first_step_loss']['glue']:.6g} vs bare "
                       f"{r['first_step_loss']['bare']:.6g} (rel. diff {r['first_step_loss']['rel_diff']:.1e})"
                       for r in times)
    contended = max([max(v) for r in times for v in r["other_cores"].values()]
                    + [m["other_cores"] for m in [*mems, *mists] if "other_cores" in m], default=0.0)
    method = next((m["method"] for m in mems if "method" in m), "n/a")
    body = "\n".join([
        MARK_START, "## Attack cost: LoRD Protect on SD1.5 geometry (bench/bench_attack.py)", "",
        *B.header_lines(facts),
        f"Models: {times[0]['unet'] if times else args.unet}; {times[0]['vae'] if times else args.vae}; "
        "random conditioning [1, 77, 768]. Attack: ace with the mist-v2 step sizes (eps 4 levels, step "
        "0.6375 levels), uniform timesteps 0..999, default high-contrast target.  ",
        f"Timing: {rt}, one warm-up iteration per path, median of (run time / iterations); glue = "
        "`attacks.run_attack` + `comfy/grad.py` under `torch.inference_mode()`, bare = the same "
        "encode -> noise -> UNet -> MSE -> backward -> sign step written directly against "
        "`first_stage_model.encode` and `diffusion_model`. Check (same computation): " + (checks or "n/a") +
        f". Timing workers' malloc: {times[0]['malloc'] if times else 'n/a'}. Timed runs during which other "
        f"processes used >= {args.max_other_cpu} cores were redone (at most {args.retries} times): "
        f"{sum(r['discarded'] for r in times)} redone; most CPU used by other processes during a kept timed run or "
        f"a memory run or a mist_v2 run: {contended:.2f} cores.  ",
        f"Memory: 2 glue iterations in a fresh process per row; {method}.", "",
        tables(times, mems, skipped), "", extrapolation(times, mems), "", reading(times, mems), "",
        "### The mist_v2 preset (surrogate LoRA loop)", "", mist_table(list(mists)) or "(not run)", "",
        mist_reading(list(mists), facts), MARK_END])
    B.write_section(path, MARK_START, MARK_END, body)


def main(argv=None) -> None:
    B.import_comfy()
    ap = B.new_parser(__doc__,
                      quick="smoke run: tiny UNet, random TAESD, 64 px, 1 iteration, mist_v2 2x1+1, no markdown",
                      steps="iterations per timed run (default: 256 px 2, 512 px 1)",
                      repeats="timed rounds (default: 2 below 512 px, 3 at 512 px)")
    ap.add_argument("--sizes", default=None, help="image sizes in px, multiples of 8 (default 256,512; quick 64)")
    ap.add_argument("--unet", default=None, choices=("sd15", "tiny"), help="default sd15 (quick: tiny)")
    ap.add_argument("--vae", default=None, choices=("kl", "taesd"),
                    help="kl: real SD1.5 VAE geometry (default; quick: taesd, the smoke run's small model)")
    ap.add_argument("--budget-min", type=float, default=26.0,
                    help="skip a size or a mist_v2 run whose projected cost would not fit (default 26; the defaults "
                         "take about 20)")
    ap.add_argument("--mist-px", type=int, default=None, help="image size of the mist_v2 runs (default 512, quick 64; "
                                                              "0: skip them)")
    ap.add_argument("--mist-schedule", default=None,
                    help="reduced mist_v2 schedule run: rounds,ACE iterations per round,LoRA steps between rounds "
                         f"(default {','.join(map(str, MIST_REDUCED))}, quick 2,1,1; rounds >= 2 so that a LoRA "
                         f"phase is timed)")
    B.add_machine_args(ap)
    B.add_output_args(ap)
    ap.add_argument("--worker", choices=("time", "mem", "mist"), help=argparse.SUPPRESS)
    ap.add_argument("--px", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--train-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.unet is None:
        args.unet = "tiny" if args.quick else "sd15"
    if args.vae is None:
        args.vae = "taesd" if args.quick else "kl"
    if args.worker:
        res = {"time": worker_time, "mem": worker_mem, "mist": worker_mist}[args.worker](args)
        B.emit_result(res)
        return
    mist_schedule = ([int(x) for x in args.mist_schedule.split(",")] if args.mist_schedule
                     else [2, 1, 1] if args.quick else list(MIST_REDUCED))
    if len(mist_schedule) != 3 or mist_schedule[0] < 2 or min(mist_schedule) < 1:
        ap.error("--mist-schedule needs rounds >= 2, ACE iterations >= 1, LoRA steps >= 1")

    start = time.time()
    facts = B.machine_facts("bench-attack")
    log(json.dumps(facts))
    sizes = [int(x) for x in (args.sizes or ("64" if args.quick else "256,512")).split(",")]
    times, mems, skipped = [], [], []
    per_iter = None  # last measured (px, glue s/iteration, build s)
    budget = args.budget_min * 60
    for px in sorted(sizes):
        steps = args.steps or (1 if args.quick or px >= 512 else 2)
        repeats = args.repeats or (1 if args.quick else (2 if px < 512 else 3))
        if per_iter is not None:
            p0, s0, build = per_iter
            guess = s0 * (px / p0) ** 2 * 1.1
            # time worker: build + 2 warm-ups + 2 x repeats x steps; mem workers: 2 x (build + 2.2 iterations)
            cost = build + guess * (2 + 2 * repeats * steps) + 2 * (build + 2.2 * guess)
            left = budget - (time.time() - start)
            if cost > left:
                skipped.append(f"{px} px (projected {cost / 60:.1f} min from the {p0} px timings, "
                               f"{left / 60:.1f} min of the {args.budget_min:.0f} min budget left)")
                log("skip: " + skipped[-1])
                continue
        t = run_worker("time", args, px, steps=steps, repeats=repeats)
        if "error" in t:
            skipped.append(f"{px} px timing: {t['error']}")
            log(skipped[-1])
            continue
        times.append(t)
        per_iter = (px, t["median"]["glue"], t["build_s"])
        log(f"[{px}px] glue {t['median']['glue']:.3f} s/it, bare {t['median']['bare']:.3f} s/it, "
            f"ratio {t['ratio']:.3f}x")
        for low in (0, 1):
            mems.append(run_worker("mem", args, px, low_memory=low, steps=2))
    mists = []
    mist_px = args.mist_px if args.mist_px is not None else (64 if args.quick else 512)
    rounds, steps, train = mist_schedule
    for low in ((1, 0) if mist_px else ()):  # the preset's default (low_memory on) first
        if per_iter is not None:
            p0, s0, build = per_iter
            it = s0 * (mist_px / p0) ** 2  # an ACE iteration; a LoRA step (UNet only) is cheaper
            cost = build + 10 + rounds * steps * it * (1.25 if low else 1.05) + (rounds - 1) * (train * 0.5 + 0.3) * it
            left = budget - (time.time() - start)
            if cost > left:
                mists.append({"px": mist_px, "low_memory": bool(low),
                              "error": f"skipped: projected {cost / 60:.1f} min from the {p0} px timings, "
                                       f"{left / 60:.1f} min of the {args.budget_min:.0f} min budget left"})
                log(f"skip mist_v2 {mist_px} px low_memory={bool(low)}: {mists[-1]['error']}")
                continue
        m = run_worker("mist", args, mist_px, low_memory=low, steps=steps,
                       extra=("--rounds", rounds, "--train-steps", train))
        if "error" in m:
            log(f"mist_v2 {mist_px} px low_memory={bool(low)}: {m['error']}")
        mists.append(m)
    facts["loadavg_end"] = os.getloadavg()[0]
    facts["total_min"] = (time.time() - start) / 60
    print(tables(times, mems, skipped))
    print()
    print(extrapolation(times, mems))
    print(reading(times, mems))
    print()
    print(mist_table(mists))
    print()
    print(mist_reading(mists, facts))
    B.finish(args, lambda path: write_markdown(path, times, mems, skipped, facts, args, mists),
             {"facts": facts, "times": times, "mems": mems, "mists": mists, "skipped": skipped})


if __name__ == "__main__":
    main()
