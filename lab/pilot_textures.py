"""Lab model 2's latent pilot (issue 21): before the long UNet training, how far do the published
attacks move this VAE's latents, compared with random noise of the same L-infinity size, and is the
ACE target visible in its decoded latent?

    python -m lab.pilot_textures --checkpoint .cache/lab2/pilot_checkpoint.safetensors --out docs/lab2/pilot
    python -m lab.pilot_textures --quick --checkpoint ... --out /tmp/pilot   # CI: 2 images, 1 budget, few steps
    python -m lab.pilot_textures --vae .cache/lab2/vae/vae_final.pt --out DIR   # no UNet yet: noise + encoder only

For each budget (pixel levels, 0..255 scale: 4 = mist-v2's published 8/255 in [-1, 1]) and each attack
-- ``encoder`` (PhotoGuard's encoder attack aimed at the ACE target's latent, 100 steps: how far the
budget can move this VAE's latent at all, no UNet involved), ``ace`` (mist-v2's objective against the fixed model: the ``ace_fixed`` preset), ``mist_v2`` (ACE +
surrogate LoRA, as published), ``aspl`` (Anti-DreamBooth's loop, 10 rounds as in EVIDENCE.md) and
``noise`` (uniform random +-budget per pixel, the same 8-bit quantisation) -- on the subject images of
the exploration replicates (``lab/texture_data/replicates/r000``, ``r001``; never used to confirm):

- ``rel_change``: ``||z' - z|| / ||z||``, the latent change relative to the clean latent (scaled
  latents as the UNet sees them),
- ``toward_target``: the share of the distance to the ACE target's latent that the change closes,
  ``(||z - z_T|| - ||z' - z_T||) / ||z - z_T||`` (0: none, 1: reached, < 0: moved away),
- ``pixel_target_corr``: the Pearson correlation of the perturbation (grey) with the target pattern
  (mean-removed), i.e. whether the pixels themselves carry the pattern.

Plus the target itself: its latent contrast (``attacks.latent_contrast``) and the correlation of the
decoded target latent with the target pattern (is the pattern representable by this VAE at all?).
Writes ``pilot.json``, ``pilot.md`` and ``pilot.png`` (target | decoded target; per attack one clean /
protected / amplified perturbation / decoded-latent strip).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ATTACKS = ("noise", "encoder", "ace", "mist_v2", "aspl")
VAE_ONLY = ("noise", "encoder")  # the attacks that never call the UNet
BUDGETS = (4.0, 8.0)
EXPLORATION_REPLICATES = (0, 1)


def _images(replicates, limit: int | None):
    import numpy as np
    import torch
    from PIL import Image

    from lab.textures import replicate_folder

    files = [p for r in replicates for p in sorted(replicate_folder(r).glob("*.png"))][:limit]
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])).float() / 255.0


def _protection(attack: str, budget: float, quick: bool, seed: int, target=None):
    """The Protection of ``attack`` at ``budget`` levels (``target``: the ACE target IMAGE ``[1, H, W, 3]``,
    which the encoder attack aims at; ACE's own default target is the same pattern)."""
    import dataclasses

    from lord_ops.attacks import PRESETS, SURROGATE_PRESETS
    from lord_ops.comfy.protect import Protection

    if attack in ("ace", "encoder"):
        a = PRESETS["ace_fixed" if attack == "ace" else "photoguard_encoder"]
        return Protection(dataclasses.replace(a, epsilon=budget, steps=3 if quick else a.steps, seed=seed),
                          target=target if attack == "encoder" else None)
    preset = SURROGATE_PRESETS["mist_v2" if attack == "mist_v2" else "anti_dreambooth_aspl"]
    a, s = preset.attack, preset.surrogate
    if attack == "aspl":  # the evidence protocol's schedule: 10 rounds, step = budget / 16
        a, s = dataclasses.replace(a, step_size=budget / 16), dataclasses.replace(s, rounds=10)
    if quick:
        a, s = dataclasses.replace(a, steps=2), dataclasses.replace(s, rounds=1)
    return Protection(dataclasses.replace(a, epsilon=budget, seed=seed), s)


def _noise(images, budget: float, seed: int):
    import torch

    from lord_ops.attacks import quantize_uint8

    g = torch.Generator().manual_seed(seed)
    x = images.movedim(-1, 1)
    noisy = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * budget / 255.0).clamp(0, 1)
    return (quantize_uint8(noisy, x, budget).float() / 255.0).movedim(1, -1)


def measure(model, vae, images, protected, target_latent, target_pixels) -> tuple[dict, "torch.Tensor"]:  # noqa: F821
    """Per-image latent statistics of ``protected`` against ``images`` (both ``[B, H, W, 3]`` in [0, 1])
    and the protected images' latents ``[B, 4, h, w]`` (CPU)."""
    import torch

    from lord_ops.comfy import grad

    encode = grad.latent_encoder(vae, model)
    with torch.no_grad():
        z = encode(images.movedim(-1, 1)).cpu()
        zp = encode(protected.movedim(-1, 1)).cpu()
    zt = target_latent.cpu().expand_as(z)
    flat = lambda t: t.flatten(1)  # noqa: E731
    rel = (flat(zp - z).norm(dim=1) / flat(z).norm(dim=1))
    before, after = flat(z - zt).norm(dim=1), flat(zp - zt).norm(dim=1)
    delta = (protected - images).mean(dim=-1).flatten(1)
    pattern = target_pixels.mean(dim=1).flatten(1).expand_as(delta)
    d, p = delta - delta.mean(1, keepdim=True), pattern - pattern.mean(1, keepdim=True)
    corr = (d * p).sum(1) / (d.norm(dim=1) * p.norm(dim=1)).clamp_min(1e-12)
    linf = (protected - images).abs().amax().item() * 255
    return {"rel_change": rel.tolist(), "toward_target": ((before - after) / before).tolist(),
            "pixel_target_corr": corr.tolist(), "linf_levels": round(linf, 3)}, zp


def _mean_ci(values):
    from lord_ops.analysis import mean_interval

    m, _sd, lo, hi = mean_interval(values) if len(values) > 1 else (values[0], 0.0, values[0], values[0])
    return {"mean": m, "ci_low": lo, "ci_high": hi, "n": len(values)}


def vae_only_checkpoint(vae_path: Path, folder: Path) -> Path:
    """A lab-2 checkpoint of the trained VAE ``vae_path`` with an **untrained** UNet and text rows (the
    real classes, torch's default init): enough for the attacks that never call the UNet
    (:data:`VAE_ONLY`) and for checking the assembly; its UNet must not be used for anything else."""
    import torch

    from lab.ship import TEXTURES_DESCRIPTION, pack, unpack
    from lab.train_unet import new_model, vocabulary_ids

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet, lab_text = new_model(vocabulary_ids("textures"))
    torch.save({"ema": unet.state_dict(), "text": lab_text.state_dict(), "vae_scale": 1.0, "vae_shift": 0.0,
                "step": 0}, folder / "untrained_unet.pt")
    parts = pack(vae_path, folder / "untrained_unet.pt", folder / "vae_only_parts.safetensors",
                 description=TEXTURES_DESCRIPTION + ", untrained UNet")
    return unpack(parts, folder / "vae_only_checkpoint.safetensors")


def run(checkpoint: Path, out: Path, quick: bool = False, seed: int = 0, attacks: tuple = ATTACKS) -> dict:
    import torch

    from lord_ops.attacks import high_contrast_target, latent_contrast
    from lord_ops.metrics import pattern_correlation
    from lord_ops.comfy import grad
    from lord_ops.comfy.bootstrap import load_checkpoint_models
    from lord_ops.comfy.protect import protect

    from lab.textures import SUBJECT_PROMPT
    from lord_ops.comfy.generate import encode_prompt

    model, clip, vae = load_checkpoint_models(checkpoint)[:3]
    cond = encode_prompt(clip, SUBJECT_PROMPT)
    images = _images(EXPLORATION_REPLICATES, 2 if quick else None)
    h, w = images.shape[1:3]
    target_pixels = high_contrast_target(h, w, min_cell=grad.vae_downscale(vae))
    target_latent = grad.encode_target(vae, model, None, target_pixels)
    with torch.no_grad():
        decoded = vae.decode(model.model.latent_format.process_out(target_latent.cpu())).float()[..., :3]
    result = {"checkpoint": str(checkpoint), "attacks_run": list(attacks), "images": int(images.shape[0]), "replicates": list(EXPLORATION_REPLICATES),
              "target": {"latent_contrast": latent_contrast(target_latent),
                         "decoded_corr": float(pattern_correlation(decoded, target_pixels)[0])},
              "attacks": {}}
    strips = []
    for budget in (BUDGETS[:1] if quick else BUDGETS):
        for attack in attacks:
            t0 = time.time()
            if attack == "noise":
                protected = _noise(images, budget, seed)
            else:
                protected, _ = protect(model, vae, cond, images, _protection(attack, budget, quick, seed,
                                                                          target_pixels.movedim(1, -1)))
            stats, latents = measure(model, vae, images, protected, target_latent, target_pixels)
            key = f"{attack}_{budget:g}"
            result["attacks"][key] = {"attack": attack, "budget_levels": budget, "seconds": round(time.time() - t0, 1),
                                      "linf_levels": stats["linf_levels"],
                                      **{k: _mean_ci(stats[k]) for k in ("rel_change", "toward_target",
                                                                          "pixel_target_corr")},
                                      "per_image": {k: stats[k] for k in ("rel_change", "toward_target")}}
            print(f"[pilot] {key}: rel change {result['attacks'][key]['rel_change']['mean']:.4f}, toward target "
                  f"{result['attacks'][key]['toward_target']['mean']:+.4f} ({time.time() - t0:.0f} s)", flush=True)
            strips.append((key, images[0], protected[0], latents[:1]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "pilot.md").write_text(markdown(result), encoding="utf-8")
    _picture(out / "pilot.png", target_pixels, decoded, strips, vae, model)  # strips: (key, clean, protected, latent)
    return result


def markdown(result: dict) -> str:
    t = result["target"]
    lines = [f"# Lab model 2: latent pilot ({result['images']} subject images of exploration replicates "
             f"{result['replicates']})", "",
             f"ACE target: latent contrast {t['latent_contrast']:.3f}; correlation of the decoded target latent with "
             f"the target pattern {t['decoded_corr']:+.3f}.", "",
             "| attack | budget (levels) | latent change, rel. L2 | share of the distance to the target closed | "
             "perturbation-pattern correlation | s |", "|---|---|---|---|---|---|"]
    for key, a in result["attacks"].items():
        cell = lambda s: f"{s['mean']:+.4f} ({s['ci_low']:+.4f} to {s['ci_high']:+.4f})"  # noqa: E731
        lines.append(f"| {a['attack']} | {a['budget_levels']:g} | {cell(a['rel_change'])} | {cell(a['toward_target'])} "
                     f"| {cell(a['pixel_target_corr'])} | {a['seconds']:.0f} |")
    lines += ["", "Means over images with 95% t intervals; noise = uniform random +-budget per pixel (8-bit)."]
    return "\n".join(lines) + "\n"


def _picture(path: Path, target_pixels, decoded, strips, vae, model) -> None:
    import numpy as np
    import torch
    from PIL import Image

    def u8(x):  # [H, W, 3] in [0, 1]
        return (x.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)

    rows = [np.concatenate([u8(target_pixels[0].movedim(0, -1)), u8(decoded[0]),
                            np.full_like(u8(decoded[0]), 255), np.full_like(u8(decoded[0]), 255)], axis=1)]
    for _key, clean, prot, latent in strips:
        with torch.no_grad():
            dec = vae.decode(model.model.latent_format.process_out(latent)).float()[0, ..., :3]
        amplified = (0.5 + (prot - clean) * 255 / 16).clamp(0, 1)  # +-8 levels -> full range
        rows.append(np.concatenate([u8(clean), u8(prot), u8(amplified), u8(dec)], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="an assembled lab-2 checkpoint (lab.ship unpack): every attack")
    which.add_argument("--vae", help="a trained lab-2 VAE only (lab.train_vae's file): noise and the encoder attack, "
                                     "on a checkpoint assembled with an untrained UNet that nothing else uses")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="2 images, budget 4 only, a few steps (CI)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    if args.vae:
        # the assembled files (~390 MB) go beside the VAE file, never into --out (which may be docs/)
        checkpoint = vae_only_checkpoint(Path(args.vae), Path(args.vae).parent / "vae_only")
        result = run(checkpoint, Path(args.out), args.quick, args.seed, VAE_ONLY)
        result["vae"] = str(args.vae)
        (Path(args.out) / "pilot.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    else:
        result = run(Path(args.checkpoint), Path(args.out), args.quick, args.seed)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
