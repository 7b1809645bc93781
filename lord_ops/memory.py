"""Peak memory of a training run, estimated before it starts (issue 22): the arithmetic, the
allocation peak of a measured probe, and what the device has free. Plain torch, no ComfyUI; the probe
itself (one forward + backward of the real training model) is ``lord_ops.comfy.memory``.

What a run adds on its device, on top of the weights already loaded there (the MODEL, the VAE):

* the trainable adapters (float32 master weights) and, for the part that trains, its gradients and
  AdamW's two moments (:data:`OPTIMIZER_COPIES` x the trainable bytes);
* the training latents kept on the device;
* the activations of one micro-batch: the **measured** peak of one batch-1 forward + backward
  (``activation_bytes``, one UNet pass) x ``batch`` x the passes whose graphs are alive at once
  (1: ``trainer.train`` back-propagates each pass of a sample -- Stage 1's clean and perturbed pass,
  Stage 2's instance and prior pass -- before the next one runs; under DDP, which needs one backward
  per forward, all of them); with Stage 1's online perturbations the step also runs one attack
  iteration per image (``attack_bytes``, measured the same way), before the passes, so the step
  holds the larger of the two;
* the allocator's overhead on the activations (:data:`ACTIVATION_FACTOR`, real peak / allocation
  peak, calibrated by ``bench/bench_memory.py``) and a fixed workspace (:data:`WORKSPACE`).

The run fits when that is at most what the device has free (:func:`available_memory`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch

GIB = 1 << 30
MIB = 1 << 20
SKIP_ENV = "LORD_SKIP_MEMORY_CHECK"
# gradient + AdamW exp_avg + exp_avg_sq, each the size of the trainable (float32) parameters
OPTIMIZER_COPIES = 3
# real peak / allocation peak of the activations (bench/bench_memory.py; BENCHMARKS.md "Memory check").
# cpu: peak RSS per sample was 1.7-2.0x the probe's allocation peak at 256 px (batch 1, 2, 4, Stage 1 and 2, two
# runs; SD15-geometry test checkpoint) and about 1.3x at 512 px: glibc keeps freed activation blocks in its heap (with
# MALLOC_TRIM_THRESHOLD_=131072 the same run peaked at about 1.0x + the fixed parts). 2.1 covers the worst.
# cuda: the caching allocator's fragmentation (reserved vs allocated); an assumption, not measured (no GPU here)
ACTIVATION_FACTOR = {"cpu": 2.1, "cuda": 1.15}
# fixed: one-off buffers of the first step (thread pools, kernel caches; cuBLAS/cuDNN workspaces); cpu: the
# measured runs' peaks at 64 px, where activations are negligible, were about 0.06 GiB
WORKSPACE = {"cpu": 128 * MIB, "cuda": 512 * MIB}
# the documented error of the estimate on the CPU (estimate / measured peak, bench_memory's runs)
MEASURED_RATIO = "1.1-1.7x at 256-512 px"


class NotEnoughMemory(ValueError):
    """The run will not fit on its device; the message says what was estimated and the fixes."""

    def __init__(self, estimate: "TrainingMemory"):
        super().__init__(estimate.explain())
        self.estimate = estimate


def skipped_by_env() -> bool:
    """``LORD_SKIP_MEMORY_CHECK`` is set to anything but empty/0/false/no."""
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no")


def gib(n: Optional[float]) -> str:
    return "unknown" if n is None else f"{n / GIB:.2f} GiB"


@dataclasses.dataclass
class TrainingMemory:
    """The estimate of one run (bytes). ``activation_bytes``: allocation peak of one batch-1 forward
    + backward of the training model (one UNet pass, adapters hooked, as the run trains), None when
    it could not be measured (then the run is not refused)."""

    device: str
    stage: str
    batch: int
    resident_bytes: int  # weights already on the device for this run (MODEL, VAE): not counted again
    adapter_bytes: int  # the adapters' float32 parameters
    trainable_bytes: int  # the part of them that trains
    activation_bytes: Optional[int]
    passes_alive: int = 1
    data_bytes: int = 0
    attack_bytes: int = 0  # Stage 1 online: one attack iteration (one image), inside every step
    available_bytes: Optional[int] = None
    available_from: str = ""
    method: str = ""
    gradient_checkpointing: bool = False
    online_perturbations: bool = False
    dtype: str = "fp32"

    @property
    def kind(self) -> str:
        return torch.device(self.device).type

    @property
    def factor(self) -> float:
        return ACTIVATION_FACTOR.get(self.kind, ACTIVATION_FACTOR["cuda"])

    @property
    def workspace_bytes(self) -> int:
        return WORKSPACE.get(self.kind, WORKSPACE["cuda"])

    @property
    def optimizer_bytes(self) -> int:
        return OPTIMIZER_COPIES * self.trainable_bytes

    def activations(self, batch: Optional[int] = None) -> int:
        """The micro-batch's activation peak with the allocator factor: the larger of the passes
        alive at once and the online attack."""
        b = self.batch if batch is None else batch
        raw = max((self.activation_bytes or 0) * b * self.passes_alive, self.attack_bytes)
        return int(self.factor * raw)

    def fixed_bytes(self) -> int:
        """What does not grow with the batch."""
        return self.adapter_bytes + self.optimizer_bytes + self.data_bytes + self.workspace_bytes

    def needed(self, batch: Optional[int] = None) -> int:
        """Bytes the run adds on its device on top of the weights already there."""
        return self.fixed_bytes() + self.activations(batch)

    def total(self, batch: Optional[int] = None) -> int:
        """The run's estimated peak on the device, loaded weights included."""
        return self.resident_bytes + self.needed(batch)

    @property
    def measured(self) -> bool:
        return self.activation_bytes is not None

    def fits(self, batch: Optional[int] = None) -> bool:
        return not self.measured or self.available_bytes is None or self.needed(batch) <= self.available_bytes

    def largest_batch(self, limit: int = 1024) -> int:
        """The largest micro-batch (<= ``limit``) that fits; 0 when not even 1 does."""
        if not self.fits(1):
            return 0
        if not self.measured or self.available_bytes is None or not self.activation_bytes:
            return limit
        lo, hi = 1, limit
        while lo < hi:  # fits() is monotone in the batch
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(mid) else (lo, mid - 1)
        return lo

    def summary(self) -> str:
        """One line: what the run needs on top of the loaded weights, and what the device has."""
        if not self.measured:
            return f"memory ({self.device}): not estimated ({self.method})"
        attack = f", online attack {gib(self.attack_bytes)}" if self.attack_bytes else ""
        return (f"memory ({self.device}): needs ~{gib(self.needed())} on top of {gib(self.resident_bytes)} of loaded "
                f"weights (adapters + AdamW {gib(self.adapter_bytes + self.optimizer_bytes)}, activations "
                f"{gib(self.activation_bytes)}/sample x {self.batch}"
                f"{f' x {self.passes_alive} passes' if self.passes_alive > 1 else ''}{attack} x{self.factor:g}, "
                f"latents {gib(self.data_bytes)}, workspace {gib(self.workspace_bytes)}); "
                f"available {gib(self.available_bytes)}")

    def fixes(self) -> list[str]:
        out = []
        best = self.largest_batch()
        if best >= 1 and best < self.batch:
            out.append(f"batch_size {best} fits (about {gib(self.needed(best))}); raise grad_accumulation to keep "
                       f"the effective batch (batch_size x grad_accumulation), e.g. batch_size {best} x "
                       f"grad_accumulation {-(-self.batch // best)}")
        elif best == 0 and self.batch > 1:
            out.append(f"even batch_size 1 needs about {gib(self.needed(1))}")
        if not self.gradient_checkpointing:
            out.append("turn gradient_checkpointing on: the UNet blocks are recomputed in the backward pass, so "
                       "only their inputs stay alive (less activation memory, slower steps)")
        if self.online_perturbations and self.attack_bytes >= (self.activation_bytes or 0) * self.batch * self.passes_alive:
            out.append("turn online_perturbations off: the attack (its VAE-encoder graph beside the UNet's) then "
                       "runs once per image before training, against the base model, instead of inside every "
                       "step on top of the optimizer state")
        if self.dtype == "fp32" and self.kind == "cuda":
            out.append("training_dtype bf16 (or fp16): about half the activation memory")
        out.append("train at a lower resolution, or free memory on the device (other models, other programs)")
        return out

    def explain(self) -> str:
        """The refusal: the estimate, what the device has, the fixes, how to skip the check."""
        passes = f" x {self.passes_alive} passes alive at once (DDP)" if self.passes_alive > 1 else ""
        lines = [
            f"not enough memory on {self.device} for this {self.stage} run: it needs about {gib(self.needed())} "
            f"on top of the {gib(self.resident_bytes)} of weights already loaded there, and "
            f"{gib(self.available_bytes)} are available ({self.available_from}).",
            f"Estimate: adapters {gib(self.adapter_bytes)}, their gradients + AdamW state {gib(self.optimizer_bytes)}; "
            f"activations {gib(self.activation_bytes)} per sample x batch_size {self.batch}{passes}"
            + (f" (online attack: {gib(self.attack_bytes)})" if self.attack_bytes else "")
            + f" x {self.factor:g} allocator overhead = {gib(self.activations())}; latents {gib(self.data_bytes)}; "
            f"workspace {gib(self.workspace_bytes)}. Activations measured: {self.method}.",
            "Fixes:",
            *(f"- {f}" for f in self.fixes()),
            f"The estimate errs high (on the CPU it was {MEASURED_RATIO} the measured peak, BENCHMARKS.md "
            f"'Memory check'); set {SKIP_ENV}=1 to train anyway.",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The run report's ``memory`` entry (bytes, and the same in GiB for reading)."""
        d = dataclasses.asdict(self)
        d.update(factor=self.factor, workspace_bytes=self.workspace_bytes, optimizer_bytes=self.optimizer_bytes,
                 activations_total_bytes=self.activations() if self.measured else None,
                 needed_bytes=self.needed() if self.measured else None,
                 total_bytes=self.total() if self.measured else None,
                 fits=self.fits(), largest_batch=self.largest_batch() if self.measured else None,
                 summary=self.summary())
        return d


# ----------------------------------------------------------------------------------------------
# Measuring: the allocation peak of a piece of work, and what the device has free


class AllocationPeak:
    """Peak of the memory torch allocates on ``device`` while the ``with`` block runs, relative to
    the start (bytes, :attr:`peak_bytes`; None when it cannot be measured, with the reason in
    :attr:`method`).

    cuda: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (this resets the
    device's peak statistics). cpu: the allocation and free events of the torch profiler
    (``profile_memory``) summed in time order: what the CPU allocator handed out, as CUDA's counter
    counts it (unlike saved-tensor bytes, it sees gradient checkpointing's recomputation and the
    backward's temporaries; unlike RSS, it is this work's alone and needs no process-wide reset).
    Other devices: not measured."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self.method = ""
        self._prof = None
        self._before = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated during one batch-1 forward + backward"
        elif self.device.type == "cpu":
            try:
                from torch.profiler import ProfilerActivity, profile

                self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._prof.__enter__()
                self.method = "torch profiler allocation peak (CPU) during one batch-1 forward + backward"
            except Exception as e:  # noqa: BLE001 -- e.g. a profiler already running: not measured
                self._prof = None
                self.method = f"not measured: torch profiler unavailable ({type(e).__name__}: {e})"
        else:
            self.method = f"not measured on {self.device.type} (cuda and cpu only)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        elif self._prof is not None:
            self._prof.__exit__(*exc)
            if exc[0] is None:
                self.peak_bytes = self._cpu_peak(self._prof)
        return False

    def _cpu_peak(self, prof) -> Optional[int]:
        try:
            cpu = torch.autograd.DeviceType.CPU
            events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]" and e.device_type() == cpu)
        except Exception as e:  # noqa: BLE001 -- a torch without these profiler fields
            self.method = f"not measured: no profiler memory events ({type(e).__name__}: {e})"
            return None
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        return peak


def _proc_kib(path: str, field: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":") or line.startswith(field + " "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_available() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``): limit - usage + inactive file cache; None without a limit."""
    for limit_f, usage_f, stat_f, inactive in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        return max(0, limit - usage + (_proc_kib(stat_f, inactive) or 0))
    return None


def available_memory(device) -> tuple[Optional[int], str]:
    """``(bytes, where from)``: what ``device`` can still give this process. cuda: free device memory
    (``torch.cuda.mem_get_info``) + what torch's caching allocator holds unused; cpu: ``MemAvailable``
    of ``/proc/meminfo`` (or psutil's ``available``), capped by a cgroup limit; (None, reason) when
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "torch.cuda.mem_get_info free + torch's unused cache"
    if device.type != "cpu":
        return None, f"unknown on {device.type}"
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    avail, source = (kib * 1024, "MemAvailable of /proc/meminfo") if kib is not None else (None, "")
    if avail is None:
        with contextlib.suppress(Exception):
            import psutil

            avail, source = int(psutil.virtual_memory().available), "psutil available"
    limit = cgroup_available()
    if limit is not None and (avail is None or limit < avail):
        avail, source = limit, "cgroup memory limit - usage"
    return avail, source or "unknown"
