"""Assemble the lab model into one SD1.x checkpoint that ComfyUI's stock CheckpointLoaderSimple
loads as SD15: UNet (EMA weights), the identity CLIP-L with the lab's embedding rows, and the TAESD
VAE with the scale/shift that give the UNet unit-variance latents.

    python -m lab.assemble --vae .cache/lab/vae/vae_final.pt --unet .cache/lab/unet/checkpoint.pt \
        --out ComfyUI/models/checkpoints/lab_fashion.safetensors

Work in progress (issue 11): the shipped form (only the non-zero parts, assembled at setup) comes next.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def checkpoint_state_dict(vae_path, unet_path, dtype=None) -> dict:
    import torch

    from lab import text
    from lab.files import load_state

    vae_state = load_state(vae_path)
    vae_state = vae_state.get("vae", vae_state)
    unet_state = load_state(unet_path)
    vocab = unet_state["text"]["vocab"].tolist()
    lab_text = text.LabText(vocab)
    lab_text.load_state_dict(unet_state["text"])
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_state["ema"].items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in lab_text.clip_state_dict().items()})
    vae = {k: v.clone() for k, v in vae_state.items()}
    vae["vae_scale"] = torch.tensor(float(unet_state["vae_scale"]))
    vae["vae_shift"] = torch.tensor(float(unet_state["vae_shift"]))
    sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", required=True)
    ap.add_argument("--unet", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from training.comfy_runtime import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    from lord_ops.format import atomic_save_safetensors

    atomic_save_safetensors(args.out, checkpoint_state_dict(args.vae, args.unet),
                            {"comfyui_lord": "lab model (Fashion-MNIST, work in progress)"})
    print(f"[assemble] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
