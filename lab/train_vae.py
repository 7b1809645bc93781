"""Stage A of a lab model: train a TAESD-architecture VAE (ComfyUI's own class, f=8, 4 latent
channels) on the lab's pre-training images: 32 px Fashion-MNIST without the held-out class (lab
model 1, ``--data fashion``) or 64 px texture crops without the held-out subject (lab model 2,
``--data textures``: ``lab/textures.py``; 64 px <-> 8x8x4 latents).

    python -m lab.train_vae --out .cache/lab/vae --steps 3000 --stop-after 1700   # the shipped VAE; resumable
    python -m lab.train_vae --data textures --out .cache/lab2/vae --batch-size 16 --steps 4000

Loss: mean squared error of the reconstruction in [-1, 1] plus a small penalty on the encoder
output (keeps latents in the decoder's tanh range).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


def new_vae(seed: int = 0):
    """An untrained TAESD (ComfyUI's class) with torch's default init (ComfyUI's layers skip init)."""
    import torch

    import comfy.taesd.taesd as taesd_mod

    torch.manual_seed(seed)
    vae = taesd_mod.TAESD()
    for m in vae.modules():
        if hasattr(m, "reset_parameters") and isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    return vae


def load_vae(path):
    """``(TAESD, step)``: a trained lab VAE (eval mode, no gradients) from a ``train_vae`` file
    (``vae_final.pt`` / ``checkpoint.pt``: ``{"vae": state, "step"}``), its exported weights
    (``python -m lab.ship weights``, e.g. ``lab/weights/lab_textures_vae.safetensors``) or a bare
    TAESD state dict (step 0)."""
    from lab.files import load_state

    state = load_state(path)
    vae = new_vae()
    vae.load_state_dict(state["vae"] if "vae" in state else state)
    return vae.eval().requires_grad_(False), int(state.get("step", 0)) if "vae" in state else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion", choices=("fashion", "textures"),
                    help="fashion: lab model 1 (32 px); textures: lab model 2 (64 px crops, drawn per step)")
    ap.add_argument("--out", default=".cache/lab/vae")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--latent-penalty", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--init-weights", type=Path, default=None,
                    help="when --out holds no checkpoint.pt: continue from these weights (a `python -m lab.ship weights` "
                         "file, which the repository keeps) at their step, with a fresh AdamW state and a 100-step "
                         "re-warm-up of the learning rate; the schedule over --steps is unchanged")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop after this many steps (the learning-rate schedule still spans --steps); 0: --steps")
    args = ap.parse_args(argv)

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    import numpy as np
    import torch

    from lab import data
    from lord_ops.atomic import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "fashion":
        images, _labels = data.pretraining_split("train")
        x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]

        def batch(step):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            return x_all[torch.randint(0, len(x_all), (args.batch_size,), generator=g)]
    else:
        from lab import textures

        pool = textures.Pool("train")
        print(f"[vae] texture sources per category: {pool.counts}", flush=True)

        def batch(step):  # uint8 [B, 3, 64, 64]: fresh seeded crops every step
            images, _ = pool.sample(args.batch_size, args.seed * 1_000_003 + step)
            return torch.from_numpy(images).permute(0, 3, 1, 2)
    vae = new_vae(args.seed)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm_from = [0]  # the step the learning rate (re-)warms up from: 0, or where --init-weights started

    def rate(s):
        return min(1.0, (s - warm_from[0] + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    from lab.files import load_state, restore

    ckpt = out / "checkpoint.pt"
    step = restore(ckpt, vae=vae, opt=opt, sched=sched)
    if step:
        print(f"[vae] resumed at step {step}")
    elif args.init_weights is not None:
        state = load_state(args.init_weights)
        vae.load_state_dict(state["vae"])
        step = warm_from[0] = int(state["step"])
        for group in opt.param_groups:
            group["lr"] = args.lr * rate(step)
        sched.last_epoch = step
        print(f"[vae] continuing from {args.init_weights} at step {step} (fresh optimizer state)")
        with open(out / "log.txt", "a") as f:
            f.write(f"continued from {args.init_weights} at step {step}, fresh AdamW\n")
    t0, first = time.time(), step
    log = open(out / "log.txt", "a")
    stop = min(args.stop_after or args.steps, args.steps)
    while step < stop:
        x = batch(step).float() / 127.5 - 1  # [-1, 1]
        z = vae.taesd_encoder(x * 0.5 + 0.5)
        recon = vae.taesd_decoder(z).sub(0.5).mul(2)
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + args.latent_penalty * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 20 == 0 or step == args.steps:
            line = (f"step {step}/{args.steps} mse {mse.item():.5f} psnr {10 * np.log10(4 / max(mse.item(), 1e-12)):.2f} dB "
                    f"z std {z.std().item():.3f} {(time.time() - t0) / max(1, step - first):.2f} s/step (this run)")
            print(f"[vae] {line}", flush=True)
            log.write(line + "\n")
            log.flush()
        if step % args.checkpoint_every == 0 or step == stop:
            state = {"vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}
            atomic_write(ckpt, lambda tmp: torch.save(state, tmp))
    atomic_write(out / "vae_final.pt", lambda tmp: torch.save({"vae": vae.state_dict(), "step": step}, tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
