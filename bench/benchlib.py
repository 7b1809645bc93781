"""The scaffolding the benchmarks share, one owner per idea.

* start-up: :func:`import_comfy` (ComfyUI importable, ``--cpu`` without CUDA);
* models and inputs: :func:`random_vae`, :func:`random_unet`, :func:`test_checkpoint`, :func:`smooth_image`;
* a shared machine: :func:`cpu_ticks`, :func:`other_load`, :func:`wait_until_quiet`,
  :func:`quiet_run` (a timed run redone when other processes were busy), :func:`rotated` (round-robin
  order of interleaved rounds), :func:`minflt`;
* a steady allocator: :func:`steady_malloc`, :func:`pinned_malloc`;
* statistics: :func:`spread`, :func:`paired_ratios`;
* peak memory: :class:`PeakMemory`;
* subprocess workers: :func:`run_worker`, :func:`emit_result`;
* the report: :func:`repro_command`, :func:`machine_facts`, :func:`header_lines`, :func:`gib`,
  :func:`write_section`, :func:`new_parser`, :func:`add_machine_args`, :func:`add_output_args`, :func:`finish`.

Plain Python at import time: ComfyUI, torch and the pack are imported inside the functions; ComfyUI after
:func:`import_comfy`.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the stock SD1.5 AutoencoderKL ddconfig
SD_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the workers' ``RESULT`` line and the tables)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Start-up, models and inputs


def import_comfy() -> None:
    """Make ComfyUI importable (forcing ``--cpu`` when there is no CUDA); call before importing ``comfy``."""
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable()


def script_module(script) -> str:
    """The module name of a script file under the repository root (``bench/bench_train.py`` ->
    ``bench.bench_train``): scripts run as ``python -m <module>`` from the root."""
    rel = pathlib.Path(script).resolve().relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU), so a timer reads finished work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_vae(kind: str, seed: int = 2):
    """A random VAE loaded by ``comfy.sd.VAE`` from a state dict, as a checkpoint's VAE is: ``kl``, the
    SD1.5 AutoencoderKL geometry (:data:`SD_DDCONFIG`); ``taesd``, TAESD (scale 1, shift 0)."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.taesd.taesd
    import torch
    from tools import tiny

    with torch.inference_mode(False):
        if kind == "kl":
            net = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_DDCONFIG), embed_dim=4)
            tiny.init_module_(net, seed)
            sd = {k: v.contiguous() for k, v in net.state_dict().items()}
        elif kind == "taesd":
            net = tiny.init_module_(comfy.taesd.taesd.TAESD(), seed)
            with torch.no_grad():
                net.vae_scale.fill_(1.0)
                net.vae_shift.fill_(0.0)
            sd = dict(net.state_dict())
        else:
            raise ValueError(f"unknown VAE kind {kind!r} (kl or taesd)")
        del net
        return comfy.sd.VAE(sd=sd)


UNET_NAMES = {"sd15": "random UNet, real SD1.5 geometry", "tiny": "tiny random SD1.x UNet"}


def random_unet(kind: str):
    """A random MODEL (ModelPatcher, fp32, seed 0): ``sd15``, the real SD1.5 UNet geometry (860M
    parameters); ``tiny``, the tiny SD1.x UNet. Its description is :data:`UNET_NAMES` ``[kind]``."""
    from tools import tiny

    if kind == "sd15":
        return tiny.build_model_patcher(tiny.sd15_full_unet_config(), seed=0)
    if kind == "tiny":
        return tiny.build_tiny_model_patcher(seed=0)
    raise ValueError(f"unknown UNet kind {kind!r} (sd15 or tiny)")


TEST_CHECKPOINT = "sd15-geometry-test.safetensors"


def test_checkpoint(work):
    """The SD15-geometry test checkpoint (``tiny.write_sd15_geometry_checkpoint``: SD1.5's first-level
    UNet geometry, 320 channels, 8 heads, context 768; TAESD; CLIP-L; random weights), written into the
    folder ``work`` unless already there, and loaded by ``comfy.sd.load_checkpoint_guess_config`` under
    inference mode like CheckpointLoaderSimple under ComfyUI's executor: ``(MODEL, VAE)``."""
    import comfy.sd
    import torch

    from tools import tiny

    path = pathlib.Path(work) / TEST_CHECKPOINT
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tiny.write_sd15_geometry_checkpoint(path, seed=0)
    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    return out[0], out[2]


def params_m(module) -> float:
    """Parameters of ``module`` in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def smooth_image(px: int, g):
    """A smooth random image ``[1, 3, px, px]`` in [0, 1], drawn from the torch generator ``g``."""
    import torch

    low = torch.rand(1, 3, max(px // 16, 2), max(px // 16, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(px, px), mode="bilinear", align_corners=False)
    return (0.8 * img + 0.2 * torch.rand(1, 3, px, px, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# A shared machine: other processes' load, waiting for quiet, redoing disturbed runs


def cpu_ticks() -> tuple[int, int]:
    """(busy CPU ticks of the whole machine, CPU ticks of this process); (0, 0) off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


def other_load(fn) -> tuple[object, float, float]:
    """Run ``fn``; return (result, wall seconds, CPU cores used meanwhile by other processes)."""
    (b0, o0), t0 = cpu_ticks(), time.perf_counter()
    result = fn()
    (b1, o1), dt = cpu_ticks(), time.perf_counter() - t0
    return result, dt, max(0.0, (b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / max(dt, 1e-9)


def wait_until_quiet(max_other: float, timeout: float) -> float:
    """Wait (at most ``timeout`` s) until other processes use < ``max_other`` cores over a 0.5 s
    window; returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < timeout and other_load(lambda: time.sleep(0.5))[2] >= max_other:
        time.sleep(2.0)
    return time.time() - t0


def minflt() -> int:
    """Minor page faults of this process so far (allocator churn shows here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def quiet_run(fn, max_other: float, retries: int, quiet_timeout: float, prepare=None, on_redo=None) -> dict:
    """Time ``fn()`` once the machine is quiet; an attempt during which other processes used >=
    ``max_other`` cores is redone, at most ``retries`` times (the last attempt is kept whatever the
    load). ``prepare()`` runs untimed before every attempt; ``on_redo(other_cores)`` is told of a redo.

    Returns ``result``, ``s`` (wall seconds of ``fn``), ``other`` (cores), ``minflt`` (minor page
    faults, ``prepare`` excluded), ``waited`` (seconds spent waiting for quiet) and ``redone``."""
    waited = 0.0
    for attempt in range(retries + 1):
        waited += wait_until_quiet(max_other, quiet_timeout)
        if prepare is not None:
            prepare()
        f0 = minflt()
        result, dt, other = other_load(fn)
        faults = minflt() - f0
        if other < max_other or attempt == retries:
            return {"result": result, "s": dt, "other": other, "minflt": faults, "waited": waited, "redone": attempt}
        if on_redo is not None:
            on_redo(other)
    raise AssertionError("unreachable")


def rotated(seq, r: int) -> list:
    """``seq`` started at element ``r mod len``: the order of round ``r`` of interleaved rounds."""
    seq = list(seq)
    k = r % len(seq)
    return seq[k:] + seq[:k]


def spread(runs: dict) -> dict:
    """``{"median", "min", "max"}``, each a dict over the keys of ``runs`` (lists of numbers)."""
    return {"median": {k: statistics.median(v) for k, v in runs.items()},
            "min": {k: min(v) for k, v in runs.items()}, "max": {k: max(v) for k, v in runs.items()}}


def paired_ratios(a: list, b: list) -> list:
    """Per-round ratios ``a[i] / b[i]`` (paired runs seconds apart cancel a shared machine's drift)."""
    return [x / y for x, y in zip(a, b)]


# ----------------------------------------------------------------------------------------------
# A steady allocator


def steady_malloc() -> str:
    """Serve every allocation from a never-trimmed glibc heap (no mmap chunks).

    On CPU, oneDNN scratch buffers and large activations are big allocations that glibc by default
    maps and unmaps on every call, so whether they page-fault afresh depends on the allocation
    history (measured: ~4.6e5 page faults and +0.5 s per step on the SD1.5 UNet for whichever
    variant lands in the unlucky state). Pinning the allocator removes that artefact.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1  # M_MMAP_MAX, M_TRIM_THRESHOLD
        return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else "stock (mallopt failed)"
    except (OSError, AttributeError):
        return "stock (no glibc)"


def pinned_malloc() -> str:
    """:func:`steady_malloc`, and never trim the heap at all.

    steady_malloc's trim threshold (2^31 - 1 bytes, mallopt's int limit) is below what a training
    step can free at once: core's Train LoRA node rebuilds every adapted weight (3.2 GiB on the SD1.5
    UNet) each step, so with it glibc handed the memory back and page-faulted it in again every step
    (measured: ~2e5 page faults and about +25% on core's SD1.5 256 px step, none on LoRD's).
    ``mallopt(M_TRIM_THRESHOLD, -1)`` sets the threshold to SIZE_MAX.
    """
    base = steady_malloc()
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(-1, -1) == 1  # M_TRIM_THRESHOLD = (size_t)-1
    except (OSError, AttributeError):
        ok = False
    return base.replace("M_TRIM_THRESHOLD=2^31-1", "M_TRIM_THRESHOLD=-1, i.e. never trim") if ok else base


# ----------------------------------------------------------------------------------------------
# Peak memory


def _proc_field(path: str, field: str) -> int:
    """A ``kB`` field of a ``/proc`` status file (``VmRSS``, ``VmHWM``, ``MemTotal``) in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory of what runs between construction and :meth:`result`, in this process.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at construction. CPU (Linux): peak
    RSS minus RSS at construction, the peak reset through ``/proc/self/clear_refs`` after
    ``gc.collect`` and ``malloc_trim``; elsewhere the ``ru_maxrss`` high-water mark, which is not
    reset and can hide a peak lower than what came before. :meth:`lap` splits a run into phases: the
    peak since the previous lap, with the high-water mark restarted there (CUDA, Linux)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.high = 0  # highest peak seen by lap()
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated - allocated before"
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.before = _proc_field("/proc/self/status", "VmRSS")
            self.method = "peak RSS (VmHWM after clear_refs) - RSS before"
        except OSError:
            self.before = _maxrss_bytes()
            self.method = "ru_maxrss high-water mark (not reset)"

    def _peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.method.startswith("peak RSS"):
            return _proc_field("/proc/self/status", "VmHWM")
        return _maxrss_bytes()

    def lap(self) -> int:
        """Peak - before (>= 0) since construction or the previous lap, and restart the high-water
        mark at the current use (CUDA: ``reset_peak_memory_stats``; Linux: ``clear_refs``; elsewhere
        nothing is reset, so a lap reads the peak so far). Cheap: no ``gc``, no ``malloc_trim``."""
        import torch

        peak = self._peak()
        self.high = max(self.high, peak)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("peak RSS"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return max(0, peak - self.before)

    def result(self) -> dict:
        """``method``, ``before_bytes``, ``peak_bytes`` and ``delta_bytes`` (peak - before, >= 0);
        the peak covers every lap."""
        peak = max(self._peak(), self.high)
        return {"method": self.method, "before_bytes": self.before, "peak_bytes": peak,
                "delta_bytes": max(0, peak - self.before)}


# ----------------------------------------------------------------------------------------------
# Subprocess workers


def emit_result(res: dict) -> None:
    """A worker's answer: one ``RESULT <json>`` line on stdout, read by :func:`run_worker`."""
    print("RESULT " + json.dumps(res), flush=True)


def run_worker(script: str, argv: list, on_error: dict) -> dict:
    """Run ``python -m <script's module> argv`` in a fresh process from the repository root and return
    the dict of its last ``RESULT`` line, or ``on_error`` plus an ``error`` message when it failed (a
    worker killed for memory prints none)."""
    cmd = [sys.executable, "-m", script_module(script), *[str(a) for a in argv]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        kind = argv[argv.index("--worker") + 1] if "--worker" in argv else "process"
        return {**on_error, "error": f"worker {kind} exited with {proc.returncode} (killed for memory?)"}
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# The report


# options that only name where results go: not needed to reproduce a run
OUTPUT_OPTIONS = ("--json", "--md", "--png", "--work")


def repro_command(make_target: str, argv=None, script=None) -> str:
    """The command a user runs from the repository root to reproduce this run: ``make <make_target>``
    when ``argv`` (default ``sys.argv[1:]``) holds nothing but output options (:data:`OUTPUT_OPTIONS`,
    ``--opt VALUE`` or ``--opt=VALUE``), else ``python -m <module> <the other arguments>`` with the
    module of ``script`` (default ``sys.argv[0]``). No interpreter path, no output path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in OUTPUT_OPTIONS:
            i += 2
            continue
        if not a.startswith(tuple(o + "=" for o in OUTPUT_OPTIONS)):
            kept.append(a)
        i += 1
    if not kept:
        return f"make {make_target}"
    path = pathlib.Path(script or sys.argv[0]).resolve()
    try:
        module = script_module(path)
    except ValueError:
        module = path.stem
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *kept])


def machine_facts(make_target: str) -> dict:
    """What a reader needs to weigh the numbers: CPU, cores, RAM, torch, threads, device, Python, the
    1-min load average at start, ``command`` (:func:`repro_command` with ``make_target``: what a user
    runs to reproduce the run) and ``invocation`` (the literal command line, with ``COMFYUI_PATH`` when
    set; for the JSON only)."""
    import torch

    import comfy.model_management as mm

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "unknown"
    try:
        mem = f"{_proc_field('/proc/meminfo', 'MemTotal') / 2**30:.1f} GiB"
    except (OSError, KeyError, ValueError):
        pass
    device = str(mm.get_torch_device())
    if torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name()})"
    env = [f"COMFYUI_PATH={shlex.quote(os.environ['COMFYUI_PATH'])}"] if os.environ.get("COMFYUI_PATH") else []
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": cpu,
            "ram": mem, "python": platform.python_version(), "device": device, "loadavg_start": os.getloadavg()[0],
            "command": repro_command(make_target),
            "invocation": " ".join(env + [shlex.quote(a) for a in [sys.executable, *sys.argv]])}


def header_lines(facts: dict) -> list:
    """The ``Command:`` and ``Machine:`` lines of a section (``facts`` from :func:`machine_facts`
    plus ``loadavg_end`` and ``total_min``)."""
    return [f"Command: `{facts['command']}`  ",
            f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['ram']} RAM, torch {facts['torch']}, "
            f"{facts['threads']} threads, device {facts['device']}, Python {facts['python']}; 1-min load average "
            f"{facts['loadavg_start']:.2f} at start / {facts['loadavg_end']:.2f} at end; total run "
            f"{facts['total_min']:.1f} min.  "]


def gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def write_section(path: pathlib.Path, start: str, end: str, body: str) -> None:
    """Replace the ``start``..``end`` section of a Markdown file (``body`` includes both markers),
    or append it; other sections are kept."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + body + "\n"
    path.write_text(text)


def new_parser(doc: str, quick: str, steps: str, repeats: str):
    """A benchmark's ``ArgumentParser`` (description: the first line of ``doc``) with the options every
    benchmark has: ``--quick`` (a smoke run, no Markdown), ``--steps`` and ``--repeats``; the help
    texts say what they mean for this benchmark."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--steps", type=int, help=steps)
    ap.add_argument("--repeats", type=int, help=repeats)
    return ap


def add_machine_args(ap, retries: bool = True) -> None:
    """The shared-machine options: ``--max-other-cpu``, ``--retries``, ``--quiet-timeout`` (with
    ``retries``) and ``--stock-malloc``."""
    ap.add_argument("--max-other-cpu", type=float, default=0.3,
                    help="before each timed run wait until other processes use fewer cores than this, and redo "
                         "a run during which they used this many (default 0.3)")
    if retries:
        ap.add_argument("--retries", type=int, default=2, help="redo a disturbed timed run up to this often")
        ap.add_argument("--quiet-timeout", type=float, default=120.0, help="longest wait for a quiet machine (s)")
    ap.add_argument("--stock-malloc", action="store_true", help="timing: leave glibc malloc as is (see benchlib)")


def add_output_args(ap) -> None:
    """``--md`` (the Markdown file whose section is rewritten) and ``--json``."""
    ap.add_argument("--md", default=None, help="markdown file to update ('' to skip; default BENCHMARKS.md, "
                                               "none with --quick)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results as JSON here")


def finish(args, write_markdown, results: dict, say=log) -> None:
    """Write the section through ``write_markdown(path)`` (into ``--md``; by default BENCHMARKS.md,
    none with ``--quick``) and ``results`` into ``--json`` when given."""
    md = args.md if args.md is not None else ("" if args.quick else str(ROOT / "BENCHMARKS.md"))
    if md:
        write_markdown(pathlib.Path(md))
        say(f"updated {md}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        say(f"wrote {args.json}")
