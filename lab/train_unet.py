"""Stage B of the lab model: encode the pre-training images with the trained lab VAE, then train the
SD15-geometry UNet (ComfyUI's class; model_channels 320 is what ComfyUI's SD15 detection requires)
and the lab text embeddings jointly on ``a photo of a {class}`` (10% empty prompts for
classifier-free guidance), eps-prediction with SD15's schedule (the diffusion loss of
``lord_ops.diffusion``), EMA weights.

    python -m lab.train_unet --vae .cache/lab/vae/vae_final.pt --out .cache/lab/unet --steps 1400 --lr 3e-4
    python -m lab.train_unet --data textures --vae .cache/lab2/vae/vae_final.pt --out .cache/lab2/unet ...

Lab model 2 (``--data textures``): ``--crops`` seeded 64 px crops of the pre-training categories'
train sources (``lab.textures.Pool``) are drawn once and encoded (8x8x4 latents), prompts
``a photo of {category}``; "wood" (the subject) only enters the vocabulary through
``a photo of sks wood``. Resumable.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path


def sd15_alphas_cumprod():
    """SD15's noise schedule as ComfyUI samples the assembled checkpoint (its SD15 model config)."""
    import comfy.model_sampling
    import comfy.supported_models

    from lord_ops.comfy.grad import schedule_alphas_cumprod

    return schedule_alphas_cumprod(comfy.model_sampling.ModelSamplingDiscrete(comfy.supported_models.SD15({})))


def encode_all(vae, images_u8, batch: int = 500):
    """Encoder outputs ``[N, 4, H/8, W/8]`` (float32) of uint8 ``[N, H, W, 3]`` images."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(images_u8), batch):
            x = torch.from_numpy(images_u8[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            out.append(vae.taesd_encoder(x))
    return torch.cat(out)


def vocabulary(data_name: str) -> tuple[list[str], str]:
    """The prompts a lab UNet learns: one per label (in label order) and the subject's prompt, which
    enters the vocabulary untrained (a user's LoRA learns it). ``data_name``: fashion | textures."""
    if data_name == "fashion":
        from lab import data

        return [data.prompt(i) for i in range(len(data.CLASSES))], "a photo of sks bag"
    from lab import textures

    return [textures.prompt(c) for c in textures.CATEGORIES], textures.SUBJECT_PROMPT


def vocabulary_ids(data_name: str):
    """Token ids ``[P, 77]`` of the vocabulary's class prompts, then the subject prompt, then ``""``."""
    from lab import text

    class_prompts, subject_prompt = vocabulary(data_name)
    return text.token_ids(class_prompts + [subject_prompt, ""])


def new_model(ids, seed: int = 0):
    """The untrained lab UNet (SD15 geometry reduced to one level, torch's default init) and text rows
    for the token ids ``ids`` ``[P, 77]`` of the prompts it will learn: ``(unet, LabText)``."""
    import torch

    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    from lab import text
    from tools.tiny import sd15_unet_config

    torch.manual_seed(seed)
    unet = openaimodel.UNetModel(**sd15_unet_config(320, (1,), 1, 768, middle_block=False),
                                 operations=comfy.ops.disable_weight_init)
    for m in unet.modules():  # ComfyUI's layers skip init: torch's defaults
        if isinstance(m, torch.nn.Conv2d):  # the base class's init (ComfyUI's override does nothing)
            torch.nn.Conv2d.reset_parameters(m)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return unet, text.LabText(ids.flatten().tolist(), seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", required=True)
    ap.add_argument("--out", default=".cache/lab/unet")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--uncond", type=float, default=0.1, help="share of empty prompts (classifier-free guidance)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (a quick check of the code)")
    ap.add_argument("--data", default="fashion", choices=("fashion", "textures"))
    ap.add_argument("--crops", type=int, default=20000, help="textures: how many crops to draw and encode once")
    ap.add_argument("--init-weights", type=Path, default=None,
                    help="when --out holds no checkpoint.pt: continue from a lab model parts file (python -m lab.ship "
                         "pack; e.g. the one kept in lab/weights): its UNet (the EMA, dequantized) starts both the "
                         "trained and the EMA weights, its text rows the text; fresh AdamW, re-warmed over 100 steps. "
                         "It must have been trained on --vae's latents of the same crops (checked by the latent scale)")
    args = ap.parse_args(argv)

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    import torch

    import hashlib

    import numpy as np

    import comfy.latent_formats
    from lab import data
    from lord_ops.weights import file_sha256
    from lab.train_vae import load_vae
    from lord_ops.atomic import atomic_write
    from lord_ops.diffusion import denoising_loss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "fashion":
        images, labels = data.pretraining_split("train")
    else:
        from lab import textures

        images, labels = textures.Pool("train").sample(args.crops, args.seed)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    latents_file = out / (f"latents_first{args.limit}.pt" if args.limit else "latents.pt")
    # the cache is valid only for the same VAE weights and the same images (a retrained VAE re-encodes)
    source = {"vae": file_sha256(args.vae), "images": hashlib.sha256(np.ascontiguousarray(images)).hexdigest()}
    cached = torch.load(latents_file, weights_only=True) if latents_file.is_file() else {}
    if cached.get("source") == source:
        enc = cached["enc"]
    else:
        if cached:
            print(f"[unet] {latents_file} holds latents of another VAE or image set: encoding again", flush=True)
        t0 = time.time()
        enc = encode_all(load_vae(args.vae)[0], images)
        atomic_write(latents_file, lambda tmp: torch.save({"enc": enc, "source": source}, tmp))
        print(f"[unet] encoded {len(enc)} images in {time.time() - t0:.0f} s", flush=True)
    # the VAE's scale/shift so that the UNet's input (raw latent x 0.18215) has zero mean and unit std
    sd15_latent_scale = comfy.latent_formats.SD15().scale_factor  # what ComfyUI multiplies VAE latents by
    vae_scale = float(sd15_latent_scale * enc.std())
    vae_shift = float(-enc.mean() / vae_scale)
    z_all = (enc / vae_scale + vae_shift) * sd15_latent_scale
    labels_t = torch.from_numpy(labels)
    ids = vocabulary_ids(args.data)
    empty = ids[-1]
    class_ids = ids[:-2]  # the class prompts (then the subject prompt and "")

    unet, lab_text = new_model(ids, args.seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters()) + list(lab_text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    acp = sd15_alphas_cumprod()
    ckpt = out / "checkpoint.pt"
    step = warm_from = 0  # warm_from: where the learning rate (re-)warms up from (0, or --init-weights' step)
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        lab_text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"[unet] resumed at step {step}")
    elif args.init_weights is not None:
        from lab.ship import training_state

        state = training_state(args.init_weights)
        if abs(state["vae_scale"] - vae_scale) > 1e-5 * abs(vae_scale) or abs(state["vae_shift"] - vae_shift) > 1e-5:
            raise SystemExit(f"--init-weights {args.init_weights}: its latent scale/shift ({state['vae_scale']:.6g}, "
                             f"{state['vae_shift']:.6g}) are not those of --vae {args.vae} on these crops "
                             f"({vae_scale:.6g}, {vae_shift:.6g}): it was trained on other latents; start without it")
        unet.load_state_dict(state["ema"])
        ema.load_state_dict(state["ema"])
        lab_text.load_state_dict(state["text"])
        step = warm_from = int(state["step"])
        print(f"[unet] continuing from {args.init_weights} at step {step} (EMA weights, fresh optimizer state)")
        with open(out / "log.txt", "a") as f:
            f.write(f"continued from {args.init_weights} at step {step} (EMA weights), fresh AdamW\n")
    t0, first = time.time(), step
    log = open(out / "log.txt", "a")
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(z_all), (args.batch_size,), generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        noise = torch.randn(z_all[idx].shape, generator=g)
        drop = torch.rand(args.batch_size, generator=g) < args.uncond
        tokens = torch.where(drop[:, None], empty[None], class_ids[labels_t[idx]])
        context = lab_text(tokens)
        loss = denoising_loss(lambda zt, tt: unet(zt, tt.float(), context=context), z_all[idx], t, noise, acp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 500, (step - warm_from + 1) / 100 if warm_from else 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - args.ema)
        step += 1
        if step % 20 == 0 or step == args.steps:
            line = f"step {step}/{args.steps} loss {loss.item():.5f} {(time.time() - t0) / max(1, step - first):.2f} s/step"
            print(f"[unet] {line}", flush=True)
            log.write(line + "\n")
            log.flush()
        if step % args.checkpoint_every == 0 or step == args.steps:
            state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "text": lab_text.state_dict(),
                     "opt": opt.state_dict(), "step": step, "vae_scale": vae_scale, "vae_shift": vae_shift}
            atomic_write(ckpt, lambda tmp: torch.save(state, tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
