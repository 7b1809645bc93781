"""One check of the pack on a CUDA machine; writes one JSON (``bench/gpu_check.sh`` runs it).

Each step runs in its own subprocess (a crash or hang in one does not stop the others), with a time
limit, and records status, seconds, peak GPU memory (device-wide, sampled with ``nvidia-smi`` every
0.2 s, minus the use before the step; ``null`` without nvidia-smi) and the tail of its output on
failure. Steps, in order of value when device time is short:

``devices``     ``pytest tests/test_devices.py`` on the GPU: every ComfyUI-managed module loaded
                before use (here load and offload devices really differ), dtype discipline.
``cli``         ``python -m training.train`` Stage 1 (PGD-2 cached), Stage 2 ``lord`` with that LoRD,
                and Stage 2 ``plain`` with ``dtype=fp16`` (GradScaler path), on the random
                SD15-geometry checkpoint (``tools.tiny.write_sd15_geometry_checkpoint``,
                fp16, as ComfyUI stores it on a GPU); records the effective dtype from the files.
``mist_v2``     ``python -m training.attack --preset mist_v2`` (the surrogate loop) on one 512 px image,
                time and peak VRAM, next to mist-v2's reported 3-5 min and about 6 GB per image on
                SD1.5. Pass ``--sd15 PATH`` to use a real SD1.5 checkpoint; the default random SD15-geometry
                checkpoint has a smaller UNet (13.6M parameters, TAESD), so its numbers are a floor.
``workflows``   ``python -m lab.demo``: every shipped workflow through a real ComfyUI server on
                the GPU (the fp16 checkpoint loads in fp16 there), the two training workflows with
                ``--train-steps`` steps.
``bench``       ``bench/bench_sampling.py``, ``bench/bench_train.py``, ``bench/bench_attack.py``
                (``--bench quick`` for their smoke runs; ``full`` for the real-geometry runs),
                JSON results kept, ``BENCHMARKS.md`` left alone. A quick run whose JSON shows a
                skipped or failed worker counts as failed.

    bash bench/gpu_check.sh [--out DIR] [--only devices,cli,mist_v2,workflows,bench] [--bench quick|full]
    bash bench/gpu_check.sh --dry-run [--out DIR] [--only ...]

``--dry-run`` runs every step on the CPU (CUDA hidden from every step: ``CUDA_VISIBLE_DEVICES=""``)
at tiny sizes, so that CI, which has no GPU, catches a broken check: the same commands with smaller
arguments -- ``devices`` one test of ``tests/test_devices.py`` (``-k spy_sees``; the suite runs the
file), ``cli`` 2 training steps (``--train-steps``), ``mist_v2`` one 64 px image with 1 PGD step per round (the preset's 5 rounds and
LoRA steps kept: the CLI has no flag for them), ``workflows`` ``lab.demo --skip-evaluation
--stage1-per-class 1 --node-steps 2`` with 2 trainer steps, ``bench`` the ``--quick`` runs (not
waiting for a quiet machine: ``--max-other-cpu 1000``; their Markdown sections go to
``OUT/BENCHMARKS_dry_run.md``). The JSON has the same shape, with ``"dry_run": true``; the CUDA-only
measurements are ``null`` and named in ``"skipped"`` (top level: ``device``; per step:
``peak_vram_mib``). Its numbers say nothing about a GPU. About 3.5 CPU-minutes (6 min wall on 2 cores shared with
two other jobs, 2026-12-04).

Exit status: 0 every step passed, 1 a step failed, 2 no CUDA device without ``--dry-run`` (nothing
is run) or bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("devices", "cli", "mist_v2", "workflows", "bench")
DRY_RUN_SKIP = "dry run: CPU only, no CUDA"  # why a CUDA-only measurement is null in a dry run
# the devices step's selection in a dry run: the load-spy test only, which checks that the step runs
# pytest on that file and records its outcome (the test suite runs the whole file on the CPU anyway;
# the rest of the file takes minutes there)
DRY_RUN_DEVICE_TESTS = "spy_sees"


class VramPeak:
    """Device-wide GPU memory in use (MiB), sampled from ``nvidia-smi`` in a thread."""

    def __init__(self, interval: float = 0.2, enabled: bool = True):
        self.interval, self.tool = interval, shutil.which("nvidia-smi") if enabled else None
        self.baseline = self.peak = None
        self._stop = threading.Event()
        self._thread = None

    def sample(self):
        if not self.tool:
            return None
        try:
            out = subprocess.run([self.tool, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            return float(out[0]) if out else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        self.baseline = self.peak = self.sample()
        if self.baseline is not None:
            def loop():
                while not self._stop.wait(self.interval):
                    v = self.sample()
                    if v is not None:
                        self.peak = max(self.peak, v)
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    @property
    def used_mib(self):
        return None if self.baseline is None else round(self.peak - self.baseline, 1)


def run_step(name: str, cmd: list, timeout: float, log_dir: Path, env=None, dry_run: bool = False) -> dict:
    """Run ``cmd`` from the repository root; returns the step record (stdout+stderr to ``log_dir``).
    ``dry_run``: no VRAM sampling; ``peak_vram_mib`` is null and named in the record's ``skipped``."""
    log = log_dir / f"{name}.log"
    print(f"[gpu_check] {name}: {' '.join(map(str, cmd))}", flush=True)
    t0 = time.time()
    with VramPeak(enabled=not dry_run) as vram, open(log, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    rec = {"status": "ok" if rc == 0 else "failed", "returncode": rc, "seconds": round(time.time() - t0, 1),
           "peak_vram_mib": vram.used_mib, "log": str(log)}
    if dry_run:
        rec["skipped"] = {"peak_vram_mib": DRY_RUN_SKIP}
    if rc != 0:
        rec["output_tail"] = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    vram_text = "skipped (dry run)" if dry_run else f"{rec['peak_vram_mib']} MiB"
    print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s, peak VRAM {vram_text}", flush=True)
    return rec


def bench_problems(name: str, result: dict) -> list[str]:
    """What a benchmark's JSON says went wrong: nothing measured, a skipped size or a failed worker
    (benchmarks record those and still exit 0)."""
    problems = [f"skipped: {s}" for s in result.get("skipped", [])]
    measured = {"bench_sampling": "rows", "bench_train": "times", "bench_attack": "times"}.get(name)
    if measured and not result.get(measured):
        problems.append(f"no {measured} measured")
    for key in ("mems", "mists"):
        problems += [f"{key}: {r['error']}" for r in result.get(key, []) if isinstance(r, dict) and "error" in r]
    return problems


def file_provenance(path: Path, key: str) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get(key, "{}") or "{}")


def make_inputs(work: Path, ckpt_override, image_px: int = 512) -> dict:
    """The SD15-geometry checkpoint, the demo's small training sets and one ``image_px`` image."""
    from PIL import Image

    from tools import tiny
    from lord_ops.comfy.bootstrap import find_comfyui
    from tools.example_inputs import prepare_training_inputs

    example = find_comfyui(None) / "input" / "example.png"
    ckpt = work / "sd15_geometry_fp16.safetensors"
    if not ckpt.is_file():
        tiny.write_sd15_geometry_checkpoint(ckpt)
    prepare_training_inputs(work / "data", example, size=64)
    one = work / "mist_input"
    shutil.rmtree(one, ignore_errors=True)  # one image only (an earlier run may have used another size)
    one.mkdir(parents=True)
    with Image.open(example) as im:
        im.convert("RGB").resize((image_px, image_px), Image.LANCZOS).save(one / f"example_{image_px}.png")
    return {"checkpoint": str(ckpt), "attack_checkpoint": str(ckpt_override or ckpt), "data": str(work / "data"),
            "mist_input": str(one), "mist_image_px": image_px}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_output", help="work folder; the JSON is OUT/gpu_check.json")
    ap.add_argument("--only", default=",".join(STEPS),
                    help=f"comma list of steps to run (default all: {','.join(STEPS)})")
    ap.add_argument("--bench", default="quick", choices=("quick", "full"), help="benchmark size (default quick)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="steps of each training run (CLI and workflows; default 20, dry run 2)")
    ap.add_argument("--sd15", default=None,
                    help="a real SD1.5 checkpoint for the mist-v2 timing (default: the random one)")
    ap.add_argument("--step-timeout", type=float, default=900.0, help="seconds before a step is stopped")
    ap.add_argument("--dry-run", action="store_true",
                    help="every step on the CPU at tiny sizes (no CUDA needed; CUDA-only fields null, marked skipped): "
                         "checks that this script and the commands it runs still work")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        print(f"error: unknown step(s) {unknown}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    dry = args.dry_run
    if dry and args.bench != "quick":
        print("error: --dry-run runs the benchmarks' --quick runs; --bench full needs a GPU", file=sys.stderr)
        return 2
    if args.train_steps is None:
        args.train_steps = 2 if dry else 20
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, here and in every step (set before torch starts)

    import torch

    if not torch.cuda.is_available() and not dry:
        print("error: no CUDA device: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). This check is for a machine with an NVIDIA GPU "
              "and a CUDA build of PyTorch (`--dry-run` runs the steps on the CPU at tiny sizes); the CPU test "
              "suite is `make test`.", file=sys.stderr)
        return 2

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    comfy_root = ensure_comfyui_importable()
    work = Path(args.out).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    result = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry, "device": None if dry else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "comfyui": str(comfy_root), "steps": {}}
    if dry:
        result["skipped"] = {"device": DRY_RUN_SKIP}
    try:
        from comfyui_version import __version__ as comfy_version  # type: ignore

        result["comfyui_version"] = comfy_version
    except ImportError:
        pass
    inputs = make_inputs(work, args.sd15, image_px=64 if dry else 512)
    result["inputs"] = inputs
    n = str(args.train_steps)
    steps = result["steps"]

    def run(name, cmd, timeout):
        return run_step(name, cmd, timeout, logs, dry_run=dry)

    def save():
        (work / "gpu_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    if "devices" in only:
        select = ["-k", DRY_RUN_DEVICE_TESTS] if dry else []
        steps["devices"] = run("devices", [py, "-m", "pytest", "-q", "tests/test_devices.py", *select],
                               args.step_timeout)
        save()
    if "cli" in only:
        ckpt, data = inputs["checkpoint"], Path(inputs["data"])
        runs = work / "cli"
        shutil.rmtree(runs, ignore_errors=True)
        common = ["--checkpoint", ckpt, "--quiet", "--steps", n]
        train = [py, "-m", "training.train"]
        sks = ["--data", data / "lord_sks", "--instance-prompt", "a photo of sks person"]
        steps["cli_stage1"] = rec = run("cli_stage1", [*train, "stage1", *common, "--data", data / "lord_train",
                                                       "--output", runs / "s1"], args.step_timeout)
        rec["effective_dtype"] = file_provenance(runs / "s1" / "lord.safetensors", "provenance").get("effective_dtype")
        lord = ["--mode", "lord", "--lord", runs / "s1" / "lord.safetensors"]
        steps["cli_stage2_lord"] = rec = run("cli_stage2_lord", [*train, "stage2", *common, *sks, "--output",
                                                                 runs / "s2", *lord], args.step_timeout)
        rec["effective_dtype"] = file_provenance(runs / "s2" / "lora.safetensors",
                                                 "lord_provenance").get("effective_dtype")
        fp16 = ["--mode", "plain", "--set", "dtype=fp16"]
        steps["cli_stage2_fp16"] = rec = run("cli_stage2_fp16", [*train, "stage2", *common, *sks, "--output",
                                                                 runs / "s2_fp16", *fp16], args.step_timeout)
        rec["effective_dtype"] = file_provenance(runs / "s2_fp16" / "lora.safetensors",
                                                 "lord_provenance").get("effective_dtype")
        save()
    if "mist_v2" in only:
        preset = "mist_v2"
        out = work / "mist_v2_out"
        shutil.rmtree(out, ignore_errors=True)
        px = inputs["mist_image_px"]
        small = ["--steps", "1"] if dry else []  # PGD steps per round (the preset: 30)
        rec = run("mist_v2", [py, "-m", "training.attack", "--checkpoint", inputs["attack_checkpoint"], "--input",
                              inputs["mist_input"], "--output", out, "--preset", preset, *small], args.step_timeout)
        rec.update(preset=preset, checkpoint=inputs["attack_checkpoint"], image_px=px,
                   reference="mist-v2 README: 3-5 min and about 6 GB VRAM per 512 px image on SD1.5")
        if dry:
            rec["note"] = "dry run: 1 PGD step per round instead of 30, 64 px; not comparable with the reference"
        side = out / f"example_{px}.json"
        if side.is_file():
            rec["attack_seconds"] = json.loads(side.read_text()).get("seconds")
        steps["mist_v2"] = rec
        save()
    if "workflows" in only:
        small = ["--skip-evaluation", "--stage1-per-class", "1", "--node-steps", "2"] if dry else []
        rec = run("workflows", [py, "-m", "lab.demo", "--out", work / "demo", "--stage1-steps", n, "--stage2-steps", n,
                                *small], args.step_timeout * 2)
        summary = work / "demo" / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            rec["workflows"] = {k: {"status": v.get("status"), "seconds": v.get("seconds")}
                                for k, v in s.get("workflows", {}).items()}
            rec["trained"] = s.get("trained_by_workflows")  # what the trained LoRD / LoRA files record
        steps["workflows"] = rec
        save()
    if "bench" in only:
        quick = ["--quick"] if args.bench == "quick" else []
        md = ""  # BENCHMARKS.md left alone
        if dry:  # a smoke run: no waiting for a quiet machine; the sections go to a scratch file
            quick += ["--max-other-cpu", "1000"]
            md = work / "BENCHMARKS_dry_run.md"
            md.unlink(missing_ok=True)
        for name in ("bench_sampling", "bench_train", "bench_attack"):
            js = work / f"{name}.json"
            js.unlink(missing_ok=True)
            rec = run(name, [py, "-m", f"bench.{name}", *quick, "--md", md, "--json", js], args.step_timeout * 2)
            if js.is_file():
                rec["result"] = json.loads(js.read_text())
                rec["problems"] = bench_problems(name, rec["result"])
                if rec["problems"] and args.bench == "quick" and rec["status"] == "ok":
                    rec["status"] = "failed"  # a smoke run skips nothing
                    print(f"[gpu_check] {name}: failed: {'; '.join(rec['problems'])}", flush=True)
            elif rec["status"] == "ok":
                rec.update(status="failed", problems=[f"no JSON written ({js})"])
            steps[name] = rec
            save()
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["ok"] = all(r["status"] == "ok" for r in steps.values())
    save()
    failed = [k for k, r in steps.items() if r["status"] != "ok"]
    verdict = "FAILED: " + ", ".join(failed) if failed else "all steps passed"
    print(f"[gpu_check] {'dry run (CPU): ' if dry else ''}{verdict} -> {work / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
