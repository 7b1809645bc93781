"""The lab model as shipped in the repository and as ComfyUI loads it.

``pack``: the trained parts only (UNet EMA weights -- int8 per channel by default, fp16 on
request -- and the TAESD VAE in fp16, the text encoder's
embedding rows and positions, the latent scale/shift) -> one small safetensors file.
``unpack``: that file -> the full SD1.x checkpoint (the identity CLIP-L rebuilt around the rows),
deterministically, for ``models/checkpoints/`` (setup or the demo run it).

    python -m lab.ship pack --vae .cache/lab/vae/vae_final.pt --unet .cache/lab/unet/checkpoint.pt --out lab/weights/lab_fashion_parts.safetensors
    python -m lab.ship unpack --parts lab/weights/lab_fashion_parts.safetensors --out ComfyUI/models/checkpoints/lab_fashion.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path


FORMAT = "comfyui-lord-lab-model-parts"


def pack(vae_path, unet_path, out, dtype_name: str = "int8", description: str = "lab model (Fashion-MNIST)") -> Path:
    import torch

    from lab.files import load_state
    from lord_ops.format import atomic_save_safetensors

    dtype = {"fp16": torch.float16, "int8": torch.float16, "fp32": torch.float32}[dtype_name]
    vae = load_state(vae_path)
    vae = vae.get("vae", vae)
    unet = load_state(unet_path)
    tensors = {}
    for k, v in unet["ema"].items():
        if dtype_name == "int8" and v.dim() >= 2 and v.numel() >= 4096:
            tensors[f"q8.unet.{k}"], tensors[f"q8scale.unet.{k}"] = quantize_int8(v)
        else:
            tensors[f"unet.{k}"] = v.to(dtype)
    tensors.update({f"vae.{k}": v.to(dtype) for k, v in vae.items() if k not in ("vae_scale", "vae_shift")})
    tensors["text.vocab"] = unet["text"]["vocab"].long()
    tensors["text.rows"] = unet["text"]["rows"].float()
    tensors["text.position"] = unet["text"]["position"].float()
    meta = {"format": FORMAT, "version": "1", "vae_scale": repr(float(unet["vae_scale"])),
            "vae_shift": repr(float(unet["vae_shift"])), "unet_steps": str(unet["step"]), "info": "{}",
            "description": description}
    return atomic_save_safetensors(out, tensors, meta)


def quantize_int8(weight):
    """Symmetric per-output-channel int8: ``(int8 weight, fp32 scale [out])`` with
    ``weight ~= q * scale`` (scale = max |w| of the channel / 127)."""
    import torch

    w = weight.float()
    scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale):
    return q.float() * scale.float().view(-1, *([1] * (q.dim() - 1)))


def read_parts(parts_path) -> tuple[dict, dict]:
    """A parts file's ``(tensors, metadata)``, int8 weights dequantized (deterministically) to float32."""
    from safetensors import safe_open

    with safe_open(str(parts_path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{parts_path} is not a lab model parts file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in [k for k in tensors if k.startswith("q8.")]:
        tensors[k[3:]] = dequantize_int8(tensors.pop(k), tensors.pop("q8scale." + k[3:]))
    return tensors, meta


def training_state(parts_path) -> dict:
    """What ``lab.train_unet --init-weights`` continues from: ``{"ema": UNet state (float32), "text":
    LabText state, "step", "vae_scale", "vae_shift"}`` of a parts file (its UNet is the EMA, as shipped)."""
    tensors, meta = read_parts(parts_path)
    return {"ema": {k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")},
            "text": {"vocab": tensors["text.vocab"], "rows": tensors["text.rows"].float(),
                     "position": tensors["text.position"].float()},
            "step": int(meta["unet_steps"]), "vae_scale": float(meta["vae_scale"]),
            "vae_shift": float(meta["vae_shift"])}


def checkpoint_state_dict(parts_path, dtype=None) -> dict:
    """The full SD1.x checkpoint state dict from the shipped parts."""
    import torch

    from lab import text

    tensors, meta = read_parts(parts_path)
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
    from safetensors import safe_open

    from lord_ops.format import atomic_save_safetensors
    from lord_ops.weights import file_sha256

    with safe_open(str(parts_path), "pt") as f:
        description = (f.metadata() or {}).get("description", "lab model (Fashion-MNIST)")
    return atomic_save_safetensors(out, checkpoint_state_dict(parts_path),
                                   {"comfyui_lord": f"{description}, assembled from " + Path(parts_path).name,
                                    "lab_parts_sha256": file_sha256(parts_path)})


REPO = Path(__file__).resolve().parents[1]
SHIPPED_PARTS = REPO / "lab" / "weights" / "lab_fashion_parts.safetensors"
SHIPPED_CLASSIFIER = REPO / "lab" / "weights" / "lab_classifier.safetensors"
CHECKPOINT_NAME = "lord_lab_fashion.safetensors"
# lab model 2 (64 px textures, lab/textures.py; lab/MODEL_CARD_2.md)
TEXTURES_PARTS = REPO / "lab" / "weights" / "lab_textures_parts.safetensors"
TEXTURES_CLASSIFIER = REPO / "lab" / "weights" / "lab_textures_classifier.safetensors"
TEXTURES_CHECKPOINT_NAME = "lord_lab_textures.safetensors"
TEXTURES_DESCRIPTION = "lab model 2 (ufoai textures, 64 px)"


def ensure_checkpoint(out: Path = REPO / ".cache" / "lab" / CHECKPOINT_NAME, parts: Path = SHIPPED_PARTS) -> Path:
    """The full checkpoint at ``out``, assembled from ``parts`` unless an up-to-date one is there
    (its metadata names the parts' sha256). Deterministic: the same parts give the same file."""
    from safetensors import safe_open

    from lord_ops.weights import file_sha256

    out, parts = Path(out), Path(parts)
    if not parts.is_file():
        raise FileNotFoundError(f"the lab model's parts file {parts} is missing (it ships in the repository; "
                                f"restore it with git checkout, or retrain with make lab-retrain: lab/MODEL_CARD.md)")
    if out.is_file():
        try:
            with safe_open(str(out), "pt") as f:
                if (f.metadata() or {}).get("lab_parts_sha256") == file_sha256(parts):
                    return out
        except Exception:  # noqa: BLE001 -- a broken file is rebuilt
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    return unpack(parts, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--vae", required=True)
    p.add_argument("--unet", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="int8", choices=["int8", "fp16", "fp32"],
                   help="int8: UNet matrices per-channel int8 (half the size), the rest fp16")
    p.add_argument("--description", default="lab model (Fashion-MNIST)",
                   help=f"what the assembled checkpoint's metadata calls it (lab model 2: {TEXTURES_DESCRIPTION!r})")
    u = sub.add_parser("unpack")
    u.add_argument("--parts", required=True)
    u.add_argument("--out", required=True)
    w = sub.add_parser("weights", help="one part of a training file as float32 safetensors (kept in the repository; "
                                       "read wherever the .pt file is)")
    w.add_argument("--checkpoint", required=True, help="a training file, e.g. .cache/lab2/vae/vae_final.pt")
    w.add_argument("--part", default="vae", help="which weights in it (default vae)")
    w.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "weights":
        from lab.files import export_weights

        path = export_weights(args.checkpoint, args.out, args.part)
        print(f"[lab] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    if args.cmd == "pack":
        path = pack(args.vae, args.unet, args.out, args.dtype, args.description)
    else:
        path = unpack(args.parts, args.out)
    print(f"[lab] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
