"""Random-weight SD1.x-family models built from ComfyUI's own classes (developer tooling for the tests,
the demo and the benchmarks; the node pack never imports it).

Module names match real SD1.5, so code that works on these works on the real model. ComfyUI
leaves weights uninitialised (``torch.empty``); everything here is initialised from a seed.
Nothing is downloaded and no weights are committed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch


def sd15_unet_config(model_channels: int = 32, channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                     context_dim: int = 64, num_heads: int = 8, middle_block: bool = True,
                     dtype: torch.dtype = torch.float32) -> dict:
    """A UNet config in the form ``comfy.model_detection`` produces for SD1.x.

    The defaults give a tiny UNet; ``model_channels=320, channel_mult=(1,), context_dim=768,
    middle_block=False`` is the SD15-geometry test checkpoint that CheckpointLoaderSimple detects
    as SD15; ``model_channels=320, channel_mult=(1,2,4,4), num_res_blocks=2, context_dim=768`` with
    ``attention_levels=3`` is the real SD1.5 geometry (see :func:`sd15_full_unet_config`).
    """
    levels = len(channel_mult)
    depth_in = [1] * (levels * num_res_blocks)
    depth_out = [1] * (levels * (num_res_blocks + 1))
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": dtype, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": depth_in, "channel_mult": list(channel_mult),
        "transformer_depth_middle": 1 if middle_block else -2, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": num_heads, "transformer_depth_output": depth_out,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sd15_full_unet_config(dtype: torch.dtype = torch.float32) -> dict:
    """The real SD1.5 UNet geometry (860M parameters), for benchmarks."""
    cfg = sd15_unet_config(320, (1, 2, 4, 4), 2, 768, dtype=dtype)
    cfg["transformer_depth"] = [1, 1, 1, 1, 1, 1, 0, 0]
    cfg["transformer_depth_output"] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    return cfg


@torch.no_grad()
def init_module_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random init of every parameter (ComfyUI creates them uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norms
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def family_unet_config(family: str, dtype: torch.dtype = torch.float32) -> dict:
    """Tiny UNet configs with the layer types of each family: ``sd1`` (conv proj_in/out, heads by
    count), ``sd2`` (linear proj_in/out, 64-channel heads) and ``sdxl`` (linear proj, no attention
    at the first level, ADM vector input of 2816)."""
    if family == "sd1":
        return sd15_unet_config(dtype=dtype)
    if family == "sd2":
        cfg = sd15_unet_config(64, (1, 2), 1, 64, dtype=dtype)
        cfg.update(use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
        return cfg
    if family == "sdxl":
        cfg = sd15_unet_config(32, (1, 2), 1, 64, dtype=dtype)
        cfg.update(use_linear_in_transformer=True, num_heads=-1, num_head_channels=32, adm_in_channels=2816, num_classes="sequential",
                   transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1])
        return cfg
    raise ValueError(f"unknown family {family!r}")


_FAMILY_CONFIGS = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}


def build_model_patcher(unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                        manual_cast_dtype: torch.dtype | None = None, family: str = "sd1"):
    """A ``ModelPatcher`` around a random ``BaseModel`` of ``family`` (sd1/sd2/sdxl) on the CPU.

    ``dtype`` is the storage dtype of the UNet weights; ``manual_cast_dtype`` the compute dtype
    ComfyUI should cast them to (``None``: compute in ``dtype``).
    """
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(unet_config, dtype=dtype)
    model_config = getattr(comfy.supported_models, _FAMILY_CONFIGS[family])(cfg)
    model_config.unet_config.update({k: v for k, v in cfg.items() if k in ("num_heads", "num_head_channels")})
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    with torch.inference_mode(False):
        model = model_config.get_model({}, device=torch.device("cpu"))
        init_module_(model.diffusion_model, seed)
        model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def build_tiny_model_patcher(seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """The tiny SD1.x-family UNet (about 1M parameters) wrapped for sampling."""
    return build_model_patcher(sd15_unet_config(**config), seed=seed, dtype=dtype)


LATENT_GAIN = 28.0


def sd15_geometry_checkpoint_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16,
                                        latent_gain: float = LATENT_GAIN) -> dict[str, torch.Tensor]:
    """A state dict that the stock CheckpointLoaderSimple loads as SD15.

    ``latent_gain`` scales the random TAESD's latents (through its ``vae_scale``) so that the model's
    scaled latents have about unit standard deviation, like real SD latents; without it they are
    ~0.04 and the UNet, whose input is then mostly noise, barely sees the image.

    UNet: model_channels 320, context_dim 768, channel_mult [1], one res block, transformer depth 1,
    no middle block (13.6M parameters). Text encoder: the complete CLIP-L (123.7M parameters; a
    missing or partial one gives no CLIP or NaN conditioning). VAE: TAESD-keyed. All random.
    """
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd

    sd: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False):
        cfg = sd15_unet_config(320, (1,), 1, 768, middle_block=False)
        unet = init_module_(openaimodel.UNetModel(**cfg, operations=comfy.ops.disable_weight_init), seed)
        sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        init_module_(clip.transformer, seed + 1)
        with torch.no_grad():
            clip.transformer.text_model.embeddings.token_embedding.weight.mul_(0.02)
            clip.transformer.text_model.embeddings.position_embedding.weight.mul_(0.02)
        sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.transformer.state_dict().items()})
        taesd = init_module_(comfy.taesd.taesd.TAESD(), seed + 2)
        with torch.no_grad():
            taesd.vae_scale.fill_(1.0 / latent_gain)
            taesd.vae_shift.fill_(0.0)
        sd.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()})
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_sd15_geometry_checkpoint(path, seed: int = 0) -> Path:
    """Write :func:`sd15_geometry_checkpoint_state_dict` (fp16, about 265 MB) atomically."""
    from lord_ops.format import atomic_save_safetensors

    return atomic_save_safetensors(path, sd15_geometry_checkpoint_state_dict(seed),
                                   {"comfyui_lord": "random-weight SD15-geometry test checkpoint", "seed": str(seed)})


# ----------------------------------------------------------------------------------------------
# Metric networks with random weights (tests only: the files have the real layouts, not real weights)

TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def write_tiny_open_clip(folder, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model (ViT geometry, random weights): ``(config .json, weights .pt)``.
    The config file's stem is the model name it registers as."""
    import json

    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "lord-tiny-clip.json"
    config.write_text(json.dumps({**TINY_OPEN_CLIP}), encoding="utf-8")
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("lord-tiny-clip", pretrained=None)
    weights = folder / "lord-tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def write_random_inception(path, seed: int = 0) -> Path:
    """Inception-v3 with the FID network's layout (pytorch-fid / torch-fidelity keys, 1008 classes)
    and random weights."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
