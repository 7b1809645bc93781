"""Training engine for Stage-1 (LoRD, Eq. 7-8) and Stage-2 (DreamBooth-LoRA, Eq. 9); plain torch.

A run's settings are :class:`lord_ops.train_config.TrainConfig` (defaults, validation, help text).
ComfyUI-specific glue (loading the MODEL for gradients, encoding images and captions) lives in
``lord_ops/comfy/stages.py``; this module owns the trainable parameter sets, the loss terms, the
deterministic sample schedule, checkpoints and the optimisation loop (single process or PyTorch DDP).

Determinism: which dataset item, timestep and noise a sample uses depends only on
``(seed, step, position in the global batch)``, never on the process count or on earlier steps. A run
resumed from a checkpoint (weights + optimizer + step) therefore continues exactly like an
uninterrupted run, and ``N`` DDP processes with per-process batch ``b`` match one process with batch
``N * b`` (up to float summation order).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .diffusion import denoising_loss
from .format import CONTEXT_GATE_OFF, LoRDFile
from .keys import CONTEXT_FED
from .layer import ConvGeometry, LoRDWeights, init_lora, lora_add, lord_add_lowrank
from .train_config import RESUMABLE_FIELDS, TrainConfig

CHECKPOINT_FORMAT = "comfyui-lord-train-checkpoint"
# 2: float32 Stage-1 copies, gate BCE on logits, text-fed gates off (version-1 runs trained differently)
CHECKPOINT_VERSION = 2


# ----------------------------------------------------------------------------------------------
# Trainable parameter sets (float32 master weights)


class LoRDParameters(torch.nn.Module):
    """One target's LoRD tensors as parameters (A, B, B', gate)."""

    FIELDS = ("down", "up", "up_defense", "gate_w1", "gate_b1", "gate_w2", "gate_b2")

    def __init__(self, w: LoRDWeights):
        super().__init__()
        for f in self.FIELDS:
            setattr(self, f, torch.nn.Parameter(getattr(w, f).detach().float().clone()))
        self.alpha = float(w.alpha)

    def weights(self) -> LoRDWeights:
        return LoRDWeights(*(getattr(self, f) for f in self.FIELDS), self.alpha)


class TrainableLoRD(torch.nn.Module):
    """All targets of a LoRD, trainable. ``add(name, output, x)`` adds the LoRD delta of
    ``layer.lord_delta_plain`` (gate learned) to a layer's output, evaluated by ``layer.lord_add_lowrank``
    (the same value and gradients through the rank-r code, no full-size intermediates); it returns
    ``(new output, gate logit)``.

    Text-fed layers (cross-attention ``to_k``/``to_v``, :data:`lord_ops.keys.CONTEXT_FED`) read the
    caption, identical for clean and perturbed samples, so no BCE can supervise their gate: it is
    forced to 0 there (``context_gate = "off"`` in the file), their ``B'`` and gate MLP are frozen
    (``B'`` stays 0), and those layers train as a plain LoRA. Their logit is None. With
    ``defense_branch=False`` every layer is treated so (the paper's one-branch control).
    """

    def __init__(self, lord: LoRDFile, defense_branch: bool = True):
        super().__init__()
        self.layers = torch.nn.ModuleDict({n: LoRDParameters(w) for n, w in sorted(lord.targets.items())})
        self.gate_activation = lord.gate_activation
        self.base_family = lord.base_family
        self.provenance = dict(lord.provenance)
        # defense_branch=False: the one-branch control -- every gate off, B' frozen at 0 (a plain LoRA A, B)
        self.gate_off = {n for n in self.layers if CONTEXT_FED.search(n) or not defense_branch}
        for n in self.gate_off:  # never used with the gate off: frozen (DDP refuses parameters without gradients)
            for f in ("up_defense", "gate_w1", "gate_b1", "gate_w2", "gate_b2"):
                getattr(self.layers[n], f).requires_grad_(False)

    def add(self, name: str, output: torch.Tensor, x: torch.Tensor, geometry: Optional[ConvGeometry]):
        mode = "clean" if name in self.gate_off else "learned"
        return lord_add_lowrank(output, x, self.layers[name].weights(), self.gate_activation, mode, geometry)

    def export(self, provenance: Optional[dict] = None) -> LoRDFile:
        targets = {}
        for n, p in self.layers.items():
            w = p.weights()
            targets[n] = LoRDWeights(*(getattr(w, f).detach().float().cpu().clone() for f in LoRDParameters.FIELDS),
                                     w.alpha)
        return LoRDFile(targets, self.gate_activation, self.base_family, {**self.provenance, **(provenance or {})},
                        context_gate=CONTEXT_GATE_OFF)


class LoRAParameters(torch.nn.Module):
    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        self.down = torch.nn.Parameter(down.float())
        self.up = torch.nn.Parameter(up.float())
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]


class TrainableLoRA(torch.nn.Module):
    """A standard LoRA (kohya ``lora_down``/``lora_up``/``alpha``) on named targets.

    Init: ``layer.init_lora`` (as diffusers/mist-v2: ``A ~ N(0, (1/r)^2)``, ``B = 0``, a no-op untrained).
    """

    def __init__(self, layers: dict[str, LoRAParameters]):
        super().__init__()
        self.layers = torch.nn.ModuleDict(dict(sorted(layers.items())))

    @classmethod
    def create(cls, shapes: dict[str, tuple[int, int, Optional[tuple]]], rank: int, alpha: Optional[float],
               seed: int) -> "TrainableLoRA":
        """``shapes``: ``{name: (in_features, out_features, kernel_size or None)}``."""
        g = torch.Generator().manual_seed(seed)
        alpha = float(rank if alpha is None else alpha)
        layers = {}
        for name in sorted(shapes):
            d_in, d_out, kernel = shapes[name]
            layers[name] = LoRAParameters(*init_lora(d_in, d_out, rank, kernel, g), alpha)
        return cls(layers)

    def add(self, name: str, output: torch.Tensor, x: torch.Tensor, geometry: Optional[ConvGeometry]):
        """``(output + s B A x, None)`` (``layer.lora_add``)."""
        p = self.layers[name]
        return lora_add(output, x, p.down, p.up, p.scale, geometry), None

    def export(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{kohya name: (down, up, alpha)}`` for ``format.save_kohya_lora``."""
        return {n: (p.down.detach().cpu().clone(), p.up.detach().cpu().clone(), p.alpha) for n, p in self.layers.items()}


class AdapterHooks:
    """Forward hooks adding an adapter to the outputs of named modules (``adapter.add(name, output, x,
    geometry) -> (new output, gate logit or None)``).

    Gate logits (LoRD) of every hooked call are collected in ``records`` as ``(name, logit)``;
    :meth:`take` hands them over and starts a new list (gradient checkpointing re-runs hooks during
    backward; those late records land in a list nobody reads).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], adapter):
        self.records: list = []
        self._hooks = []
        for name, module in modules.items():
            geometry = ConvGeometry.of(module) if isinstance(module, torch.nn.Conv2d) else None
            self._hooks.append((module, self._hook(adapter, name, geometry)))
        self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def reattach(self) -> None:
        """Register the hooks again, so that each runs after every other forward hook of its module, as
        when they were first registered on a loaded model. ComfyUI re-injects a model's injections (a
        LoRD's hooks) whenever it loads the model again (e.g. at the start of sampling), which puts them
        after these; outputs summed in another order differ in the last float bits."""
        self.remove()
        self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def _hook(self, adapter, name, geometry):
        def hook(module, args, output):
            output, logit = adapter.add(name, output, args[0], geometry)
            if logit is not None:
                self.records.append((name, logit))
            return output

        return hook

    def take(self) -> list:
        out, self.records = self.records, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# ----------------------------------------------------------------------------------------------
# Loss terms


def gate_bce(records: Iterable[tuple[str, torch.Tensor]], label: float, names: Optional[set] = None) -> torch.Tensor:
    """Per-sample BCE of the gates against ``label`` (0 clean, 1 perturbed): ``[B]``.

    ``records`` hold gate **logits** (``lambda = sigmoid(logit)``); the BCE is taken on the logits
    (``binary_cross_entropy_with_logits``: exact and with a gradient even where the sigmoid saturates).
    Averaged over the features of each layer, then over layers (each layer counts once). Layers not
    in ``names`` (e.g. cross-attention k/v, whose input is the text, identical for both labels) are
    skipped. A logit is ``[B, T, 1]`` (Linear) or ``[B, 1, H, W]`` (Conv2d).
    """
    per_layer = []
    for name, logit in records:
        if names is not None and name not in names:
            continue
        z = logit.float()
        bce = F.binary_cross_entropy_with_logits(z, torch.full_like(z, float(label)), reduction="none")
        per_layer.append(bce.flatten(1).mean(dim=1))
    if not per_layer:
        raise ValueError("no gate values were recorded: the LoRD hooks did not run on an image-fed layer")
    return torch.stack(per_layer, dim=0).mean(dim=0)


def gate_scores(records: Iterable[tuple[str, torch.Tensor]], names: Optional[set] = None) -> torch.Tensor:
    """Per-sample mean gate value ``lambda = sigmoid(logit)`` ``[B]`` over the (image-fed) layers: the
    adversarial score. ``records`` hold logits, as for :func:`gate_bce`."""
    per_layer = [torch.sigmoid(logit.detach().float()).flatten(1).mean(dim=1) for name, logit in records
                 if names is None or name in names]
    if not per_layer:
        raise ValueError("no gate values were recorded")
    return torch.stack(per_layer, dim=0).mean(dim=0)


@dataclasses.dataclass
class PairedBatch:
    """Stage-1 pairs: clean and perturbed latents ``[B, C, h, w]`` (the model's scaled latents) sharing
    integer timesteps ``t`` ``[B]`` and ``noise`` (like the latents)."""

    z_clean: torch.Tensor
    z_adv: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


@dataclasses.dataclass
class PairedLoss:
    """The terms of Eq. 7 and how they are computed: the schedule ``alphas_cumprod`` ``[T]``, lambda1
    (``lambda_adv``), lambda2 (``lambda_gate``), the layers whose gates the BCE reads (None: all that
    recorded one), the model's prediction type (native loss weighting) and the autocast context."""

    alphas_cumprod: torch.Tensor
    lambda_adv: float = 1.0
    lambda_gate: float = 1.0
    gate_names: Optional[set] = None
    prediction: str = "eps"
    autocast: Callable = contextlib.nullcontext


def paired_losses(predict, hooks: Optional[AdapterHooks], batch: PairedBatch, loss: PairedLoss,
                  backward: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7: ``L_clean + lambda1 L_adv + lambda2 BCE(lambda, y)`` per sample ``[B]``.

    Both samples of a pair share timestep and noise; ``loss.prediction`` is the model's native loss
    weighting (:func:`lord_ops.diffusion.denoising_loss`). With ``lambda_gate == 0`` (or no hooks) this is
    adversarial training of a plain LoRA on clean + perturbed samples.

    The sum splits into a clean term (``L_clean + lambda2/2 BCE(lambda_clean, 0)``) and a perturbed term.
    With ``backward`` (see :func:`train`), the clean term is back-propagated as soon as the clean pass is
    done, so its autograd graph is freed before the perturbed pass runs (peak memory of one pass, not
    two); the returned total then carries gradients of the perturbed term only (same value, same
    accumulated gradients).
    """
    z_clean, z_adv, t, noise = batch.z_clean, batch.z_adv, batch.t, batch.noise
    alphas_cumprod, lambda_adv, lambda_gate = loss.alphas_cumprod, loss.lambda_adv, loss.lambda_gate
    gate_names, autocast, prediction = loss.gate_names, loss.autocast, loss.prediction
    use_gate = hooks is not None and lambda_gate > 0
    if hooks is not None:
        hooks.take()
    with autocast():
        l_clean = denoising_loss(predict, z_clean, t, noise, alphas_cumprod, prediction)
    gates_clean = hooks.take() if hooks is not None else []
    first = l_clean.float()
    if use_gate:
        bce_clean = gate_bce(gates_clean, 0.0, gate_names)
        first = first + 0.5 * lambda_gate * bce_clean
    if backward is not None:
        backward(first)
        first = first.detach()
        if hooks is not None:  # gradient checkpointing re-ran the clean pass's hooks during that backward
            hooks.take()
    with autocast():
        l_adv = denoising_loss(predict, z_adv, t, noise, alphas_cumprod, prediction)
    gates_adv = hooks.take() if hooks is not None else []
    total = first + lambda_adv * l_adv.float()
    parts = {"clean": l_clean.detach().float(), "adv": l_adv.detach().float()}
    if use_gate:
        bce_adv = gate_bce(gates_adv, 1.0, gate_names)
        total = total + 0.5 * lambda_gate * bce_adv
        parts["gate_bce"] = 0.5 * (bce_clean.detach() + bce_adv.detach())
        parts["gate_clean"] = gate_scores(gates_clean, gate_names)
        parts["gate_adv"] = gate_scores(gates_adv, gate_names)
    return total, parts


# ----------------------------------------------------------------------------------------------
# Deterministic sample schedule


def mix_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, size: int, stream: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(mix_seed(seed, "epoch", stream, epoch))
    return tuple(torch.randperm(size, generator=g).tolist())


def dataset_index(seed: int, sample_number: int, size: int, stream: int = 0) -> int:
    """Item of the ``sample_number``-th sample of the run: epochs are seeded permutations."""
    epoch, within = divmod(sample_number, size)
    return _epoch_order(seed, epoch, size, stream)[within]


@dataclasses.dataclass
class Draw:
    """Randomness of one sample: timestep and a generator for its noise."""

    t: int
    noise_seed: int

    def noise(self, shape, device=None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn(shape, generator=g).to(device)


def sample_draw(seed: int, step: int, position: int, t_min: int, t_max: int) -> Draw:
    g = torch.Generator().manual_seed(mix_seed(seed, "draw", step, position))
    t = int(torch.randint(t_min, t_max + 1, (1,), generator=g))
    return Draw(t, mix_seed(seed, "noise", step, position))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, state: dict) -> Path:
    """Atomically write a training checkpoint (temp file + rename; never a half-written file)."""
    from .atomic import atomic_write

    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- report the file and what to do
        raise ValueError(f"training checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to "
                         f"start the run from step 0") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a ComfyUI-LoRD training checkpoint; choose another run name/output folder")
    return state


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class StepRecord:
    step: int
    steps: int
    loss: float
    parts: dict[str, float]
    elapsed_s: float
    samples: int  # global samples processed so far (this session)


@dataclasses.dataclass
class TrainResult:
    history: list[dict]  # one dict per optimizer step: {"step", "loss", <parts>}
    resumed_from: int
    steps: int
    stopped_early: bool = False

    @property
    def loss_map(self) -> dict:
        """Core ComfyUI's ``LOSS_MAP`` (``{"loss": [...]}``), plotted by its Plot Loss Graph node."""
        return {"loss": [h["loss"] for h in self.history]}


class _StepModule(torch.nn.Module):
    """Owns the trainable parameters; ``forward`` is one micro-batch's mean loss (what DDP wraps)."""

    def __init__(self, trainable: torch.nn.Module, sample_losses: Callable):
        super().__init__()
        self.trainable = trainable
        self._sample_losses = sample_losses

    def forward(self, indices: list[int], draws: list[Draw], backward: Optional[Callable] = None):
        losses, parts = self._sample_losses(indices, draws, backward)
        return losses.mean(), {k: v.detach().float().sum() for k, v in parts.items()}


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(config: TrainConfig, trainable: torch.nn.Module, sample_losses: Callable, dataset_size: int,
          checkpoint_path=None, on_step: Optional[Callable[[StepRecord], None]] = None,
          device: Optional[torch.device] = None, identity: Optional[dict[str, str]] = None) -> TrainResult:
    """Optimise ``trainable`` with AdamW for ``config.steps`` steps.

    ``sample_losses(indices, draws, backward) -> (losses [b], {part: [b]})`` computes one micro-batch
    (items ``indices`` of the dataset, randomness ``draws``). ``backward`` (None under DDP, which needs
    one backward per forward) back-propagates per-sample losses ``[b]`` right away, with the same
    scaling as the final loss: a micro-batch made of several UNet passes may call it on each finished
    term that later terms do not depend on (freeing that pass's graph) and return the rest, with the
    finished terms detached. One optimizer step sees
    ``batch_size * grad_accumulation * world_size`` samples. Under an initialised process group the
    parameters are wrapped in DDP; only rank 0 writes checkpoints. ``on_step`` runs after each
    optimizer step (progress, logs, cancellation: raise to stop -- the finished step is checkpointed
    first, weights + optimizer + step, so a rerun resumes from it).
    A checkpoint at ``checkpoint_path`` from an earlier run with the same trajectory settings and the
    same ``identity`` (digests of what the run trains on: dataset, model, LoRD) is resumed; one from
    different settings or inputs is refused, naming what differs.
    """
    config.validate()
    rank, world = distributed_context()
    if dataset_size < 1:
        raise ValueError("the training set is empty")
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # fp16 compute: scale the loss so small gradients survive fp16 activations (core PyTorch AMP recipe)
    scaler = torch.amp.GradScaler(torch.device(device if device is not None else "cpu").type) if config.dtype == "fp16" else None
    history: list[dict] = []
    start = 0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {checkpoint_path} was written by an older version of ComfyUI-LoRD (checkpoint "
                             f"version {state.get('version')}, now {CHECKPOINT_VERSION}), which trained differently; use "
                             f"another run name / output folder, or delete the checkpoint to start over")
        if state["digest"] != config.trajectory_digest():
            old = state.get("config", {})
            changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS and old.get(k) != v)
            raise ValueError(f"checkpoint {checkpoint_path} is from a run with different settings ({', '.join(changed)}); "
                             f"use another run name / output folder, or delete the checkpoint to start over")
        changed = sorted(k for k in set(identity or {}) | set(state.get("identity") or {})
                         if (identity or {}).get(k) != (state.get("identity") or {}).get(k))
        if changed:
            raise ValueError(f"checkpoint {checkpoint_path} was trained on a different {' and '.join(changed)}; "
                             f"use another run name / output folder, or delete the checkpoint to start over")
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        start, history = int(state["step"]), list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def checkpoint(step: int) -> None:
        if checkpoint_path is None or rank != 0:
            return
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "digest": config.trajectory_digest(),
            "config": config.to_dict(), "identity": dict(identity or {}), "step": step, "history": history,
            "trainable": {k: v.detach().cpu() for k, v in trainable.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        })

    module = _StepModule(trainable, sample_losses)
    runner = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(module, device_ids=[device] if device is not None and device.type == "cuda" else None,
                                         broadcast_buffers=False)
    b, accum = config.batch_size, config.grad_accumulation
    global_batch = b * accum * world

    def backward_mean(loss: torch.Tensor) -> None:
        (loss / accum if scaler is None else scaler.scale(loss / accum)).backward()

    early_calls = [0]

    def early_backward(losses: torch.Tensor) -> None:
        early_calls[0] += 1
        backward_mean(losses.mean())

    t0, seen = time.perf_counter(), 0
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        part_sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            positions = [(micro * world + rank) * b + j for j in range(b)]
            indices = [dataset_index(config.seed, step * global_batch + p, dataset_size) for p in positions]
            draws = [sample_draw(config.seed, step, p, config.t_min, config.t_max) for p in positions]
            sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1) else runner.no_sync()
            with sync:
                early_calls[0] = 0
                loss, parts = runner(indices, draws, early_backward if world == 1 else None)
                if loss.requires_grad or not early_calls[0]:  # all of it may have gone back early
                    backward_mean(loss)
            loss_sum += loss.detach().float().cpu() * b
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, torch.zeros(())) + v.cpu()
        if scaler is None:
            optimizer.step()
        else:  # skips the step when a scaled gradient overflowed, then adapts the scale
            scaler.step(optimizer)
            scaler.update()
        if world > 1:
            keys = sorted(part_sums)
            packed = torch.stack([loss_sum] + [part_sums[k] for k in keys])
            torch.distributed.all_reduce(packed)
            loss_sum, part_sums = packed[0], {k: packed[i + 1] for i, k in enumerate(keys)}
        n = global_batch
        entry = {"step": step + 1, "loss": float(loss_sum) / n, **{k: float(v) / n for k, v in part_sums.items()}}
        if not all(math.isfinite(v) for v in entry.values()):
            raise FloatingPointError(f"step {step + 1}: loss is not finite ({entry}); lower the learning rate or use "
                                     f"fp32; the last checkpoint is kept")
        history.append(entry)
        seen += n
        saved = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
        if saved:
            checkpoint(step + 1)
        if world > 1:
            torch.distributed.barrier()
        if on_step is not None:
            try:
                on_step(StepRecord(step + 1, config.steps, entry["loss"],
                                   {k: v for k, v in entry.items() if k not in ("step", "loss")},
                                   time.perf_counter() - t0, seen))
            except BaseException:  # Cancel (ComfyUI's interrupt), Ctrl+C: keep this finished step, then stop
                if not saved:
                    checkpoint(step + 1)
                raise
    return TrainResult(history, start, config.steps)
