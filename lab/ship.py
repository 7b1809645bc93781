"""The lab model as shipped in the repository and as ComfyUI loads it.

``pack``: the trained parts only (UNet EMA weights and the TAESD VAE in fp16, the text encoder's
embedding rows and positions, the latent scale/shift) -> one small safetensors file.
``unpack``: that file -> the full SD1.x checkpoint (the identity CLIP-L rebuilt around the rows),
deterministically, for ``models/checkpoints/`` (setup or the demo run it).

    python -m lab.ship pack --vae .cache/lab/vae/vae_final.pt --unet .cache/lab/unet/checkpoint.pt --out lab/weights/lab_fashion_parts.safetensors
    python -m lab.ship unpack --parts lab/weights/lab_fashion_parts.safetensors --out ComfyUI/models/checkpoints/lab_fashion.safetensors

Work in progress (issue 11).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FORMAT = "comfyui-lord-lab-model-parts"


def pack(vae_path, unet_path, out, dtype_name: str = "fp16", info: dict | None = None) -> Path:
    import torch

    from lab.files import load_state
    from lord_ops.format import atomic_save_safetensors

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    vae = load_state(vae_path)
    vae = vae.get("vae", vae)
    unet = load_state(unet_path)
    tensors = {f"unet.{k}": v.to(dtype) for k, v in unet["ema"].items()}
    tensors.update({f"vae.{k}": v.to(dtype) for k, v in vae.items() if k not in ("vae_scale", "vae_shift")})
    tensors["text.vocab"] = unet["text"]["vocab"].long()
    tensors["text.rows"] = unet["text"]["rows"].float()
    tensors["text.position"] = unet["text"]["position"].float()
    meta = {"format": FORMAT, "version": "1", "vae_scale": repr(float(unet["vae_scale"])),
            "vae_shift": repr(float(unet["vae_shift"])), "unet_steps": str(unet["step"]),
            "info": json.dumps(info or {}, sort_keys=True)}
    return atomic_save_safetensors(out, tensors, meta)


def checkpoint_state_dict(parts_path, dtype=None) -> dict:
    """The full SD1.x checkpoint state dict from the shipped parts."""
    import torch
    from safetensors import safe_open

    from lab import text

    with safe_open(str(parts_path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{parts_path} is not a lab model parts file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lab_text = text.LabText(tensors["text.vocab"].tolist())
    lab_text.load_state_dict({"vocab": tensors["text.vocab"], "rows": tensors["text.rows"],
                              "position": tensors["text.position"]})
    sd = {f"model.diffusion_model.{k[5:]}": v for k, v in tensors.items() if k.startswith("unet.")}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in lab_text.clip_state_dict().items()})
    sd.update({f"first_stage_model.{k[4:]}": v for k, v in tensors.items() if k.startswith("vae.")})
    sd["first_stage_model.vae_scale"] = torch.tensor(float(meta["vae_scale"]))
    sd["first_stage_model.vae_shift"] = torch.tensor(float(meta["vae_shift"]))
    out_dtype = dtype or torch.float16
    return {k: (v.to(out_dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def unpack(parts_path, out) -> Path:
    from lord_ops.format import atomic_save_safetensors

    return atomic_save_safetensors(out, checkpoint_state_dict(parts_path),
                                   {"comfyui_lord": "lab model (Fashion-MNIST), assembled from " + Path(parts_path).name})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--vae", required=True)
    p.add_argument("--unet", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    u = sub.add_parser("unpack")
    u.add_argument("--parts", required=True)
    u.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from training.comfy_runtime import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    if args.cmd == "pack":
        path = pack(args.vae, args.unet, args.out, args.dtype)
    else:
        path = unpack(args.parts, args.out)
    print(f"[lab] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
