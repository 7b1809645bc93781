"""How well a lab-2 VAE (``lab.train_vae --data textures``) reconstructs crops it never trained on.

    python -m lab.eval_vae --vae .cache/lab2/vae/vae_final.pt --out docs/lab2/vae_eval
    python -m lab.eval_vae --vae .cache/lab2/vae_step1500.pt --vae .cache/lab2/vae/vae_final.pt --out ...

Sets (all committed in ``lab/texture_data``, none trained on by the VAE): the 120 **reference** crops of
the held-out subject's reference textures, the 80 **Stage-1** crops of the pre-training categories'
*test* textures, and replicate **r000**'s 8 subject crops. Per set and VAE: PSNR (dB, 8-bit images,
data range 255, mean over images of ``lord_ops.metrics.psnr``), the **high-frequency spectrum distance**
of the reconstructions to the originals (``lord_ops.metrics.high_frequency_distance``, signed < 0 =
blurrier) and the **colour shift** (mean |difference| of the per-image RGB means, pixel levels 0..255).
Writes ``vae_eval.json``, ``vae_eval.md`` and ``vae_reconstructions.png`` (per VAE: 8 Stage-1 + 8
reference originals, then their reconstructions). ``--quick``: 4 images per set (CI, any VAE).
"""
from __future__ import annotations

import argparse
from pathlib import Path

SETS = {"reference": "reference", "stage1": "stage1", "r000": "replicates/r000"}


def reconstruct(vae, images_u8):
    """uint8 ``[N, 64, 64, 3]`` -> uint8 reconstructions, same layout (TAESD in [0, 1] pixels)."""
    import torch

    x = torch.as_tensor(images_u8).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        y = vae.taesd_decoder(vae.taesd_encoder(x)).clamp(0, 1)
    return (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def set_images(name: str, limit: int | None = None):
    import numpy as np
    from PIL import Image

    from lab.textures import DATA_DIR

    files = sorted((DATA_DIR / SETS[name]).glob("*.png"))[:limit]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def measure(originals, recon) -> dict:
    import numpy as np
    import torch

    from lord_ops.metrics import high_frequency_distance, psnr

    o, r = torch.as_tensor(originals), torch.as_tensor(recon)
    per = [psnr(o[i], r[i]) for i in range(len(o))]
    hf = high_frequency_distance(r.float() / 255, o.float() / 255)
    shift = (o.float().mean(dim=(1, 2)) - r.float().mean(dim=(1, 2))).abs().mean()
    return {"images": len(per), "psnr_db": float(np.mean([min(p, 99.0) for p in per])),
            "psnr_db_min": float(min(per)), "hf_distance": hf["value"], "hf_signed": hf["signed"],
            "colour_shift_levels": float(shift)}


def run(vae_paths: list[Path], out: Path, quick: bool = False) -> dict:
    import numpy as np
    from PIL import Image

    from lab.train_vae import load_vae
    from lord_ops.atomic import atomic_write, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    limit = 4 if quick else None
    sets = {name: set_images(name, limit) for name in SETS}
    result, rows = {"quick": quick, "vaes": []}, []
    show = np.concatenate([sets["stage1"][::max(1, len(sets["stage1"]) // 8)][:8], sets["reference"][:8]])
    picture = [np.concatenate(list(show), axis=1)]
    for path in vae_paths:
        vae, step = load_vae(path)
        entry = {"vae": str(path), "step": step,
                 "sets": {name: measure(images, reconstruct(vae, images).numpy()) for name, images in sets.items()}}
        result["vaes"].append(entry)
        picture.append(np.concatenate(list(reconstruct(vae, show).numpy()), axis=1))
        for name, m in entry["sets"].items():
            rows.append(f"| {path.name} (step {step}) | {name} ({m['images']}) | {m['psnr_db']:.2f} | "
                        f"{m['psnr_db_min']:.2f} | {m['hf_signed']:+.3f} | {m['colour_shift_levels']:.1f} |")
    atomic_write_json(out / "vae_eval.json", result)
    text = "\n".join([
        "# Lab-2 VAE reconstructions of crops it never trained on (`python -m lab.eval_vae`)", "",
        "PSNR: 8-bit images, mean over the set (and its worst image); HF: signed high-frequency spectrum "
        "distance of the reconstructions to the originals (log10 power above a quarter of Nyquist; < 0 = "
        "blurrier, -0.3 = half the power); colour shift: mean |difference| of per-image RGB means, pixel levels.",
        "", "| VAE | set (images) | PSNR dB | worst dB | HF signed | colour shift |", "|---|---|---|---|---|---|",
        *rows, ""])
    atomic_write(out / "vae_eval.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    grid = np.concatenate(picture, axis=0)
    atomic_write(out / "vae_reconstructions.png",
                 lambda tmp: Image.fromarray(grid).save(tmp, format="PNG", optimize=True))
    print(text)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", type=Path, action="append", required=True, help="a train_vae file (repeat to compare)")
    ap.add_argument("--out", type=Path, default=Path("docs/lab2/vae_eval"))
    ap.add_argument("--quick", action="store_true", help="4 images per set (CI)")
    args = ap.parse_args(argv)
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    missing = [str(p) for p in args.vae if not p.is_file()]
    if missing:
        raise SystemExit(f"no VAE file at {', '.join(missing)} (python -m lab.train_vae --data textures writes "
                         f"vae_final.pt and checkpoint.pt in its --out folder)")
    run(args.vae, args.out, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
