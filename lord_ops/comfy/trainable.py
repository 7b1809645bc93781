"""The training clone: a loaded, differentiable clone of a ComfyUI MODEL in the configured compute
dtype (with gradient checkpointing when asked), and what it reports about its dtypes.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..train_config import DTYPES, TrainConfig
from . import grad


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model, enabled: bool):
    """Gradient checkpointing on every layer (res block, transformer, up/down sample) of the UNet's
    input/middle/output blocks, undone on exit.

    ComfyUI's UNet runs a block through ``forward_timestep_embed``, which calls each layer of the
    block rather than ``block.forward``; so each layer's ``forward`` is wrapped (what core's trainer
    does too). Forward hooks inside a layer run again during the recompute.
    """
    layers = []
    if enabled:
        for attr in ("input_blocks", "middle_block", "output_blocks"):
            part = getattr(diffusion_model, attr, None)
            if part is None:
                continue
            for block in (part if isinstance(part, torch.nn.ModuleList) else [part]):
                layers.extend(block.children() if isinstance(block, torch.nn.Sequential) else [block])
    # a forward already replaced on the instance (newer ComfyUI's bypass LoRA injects that way) is
    # wrapped, and put back on exit
    before = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        original = layer.forward
        layer.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(original)
    try:
        yield
    finally:
        for layer, prev in zip(layers, before):
            if prev is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = prev


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


def effective_dtype(clone) -> dict:
    """How the training clone computes: ``compute`` (the dtype set with ``set_model_compute_dtype``,
    else the weights'), ``weights`` (storage dtype of the UNet weights; cast per layer to the compute
    dtype when they differ) and ``grad_scaler`` (fp16 compute: the loss is scaled, see
    ``lord_ops.trainer.train``). The adapters keep float32 master weights in every case."""
    weights = clone.model_dtype()
    compute = clone.get_model_object("manual_cast_dtype") if "manual_cast_dtype" in clone.object_patches else None
    compute = compute or weights
    return {"compute": _dtype_name(compute), "weights": _dtype_name(weights), "grad_scaler": compute == torch.float16}


def dtype_label(eff: dict) -> str:
    return f"compute {eff['compute']}, weights {eff['weights']}" + (", grad scaler" if eff["grad_scaler"] else "")


@contextlib.contextmanager
def trainable_model(model_patcher, vae, config: TrainConfig):
    """A loaded, differentiable clone of the MODEL (base frozen) for the duration of training.

    The compute dtype is ``config.dtype``, set explicitly (``set_model_compute_dtype``, as core's
    Train LoRA node does): weights stored in another dtype (an fp16 checkpoint on a GPU) are cast per
    layer, so node and CLI compute the same way whatever dtype ComfyUI stored the weights in.
    ``comfy.model_management.in_training`` is set for the duration where ComfyUI has it.
    """
    import comfy.model_management as mm

    clone = model_patcher.clone()
    clone.set_model_compute_dtype(DTYPES[config.dtype])
    with torch.inference_mode(False), torch.enable_grad(), grad.training_flag():
        grad.use_models(clone, vae)
        with checkpointed_blocks(clone.model.diffusion_model, config.gradient_checkpointing):
            try:
                yield clone
            finally:
                mm.soft_empty_cache()


def autocast_for(config: TrainConfig, device) -> Callable:
    """Autocast to the compute dtype (bf16/fp16; fp32 runs without autocast)."""
    dtype = DTYPES[config.dtype]
    if dtype != torch.float32:
        return lambda: torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext
