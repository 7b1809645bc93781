"""Train a lab classifier (``lord_ops.lab_classifier``): lab model 1's on Fashion-MNIST, all 10 classes
(it is an evaluator, so it must know the held-out class), or lab model 2's on 64 px RGB texture crops
of all categories including the held-out subject's classifier-only sources (``lab/textures.py``):

    python -m lab.train_classifier --out .cache/lab/lab_classifier.safetensors --epochs 4   # the shipped classifier
    python -m lab.train_classifier --data textures --out .cache/lab2/lab2_classifier.safetensors --steps 3000
    python -m lab.train_classifier --data textures ... --vae lab/weights/lab_textures_vae.safetensors --jitter 0.2

Prints test-set accuracy (lab model 2: crops of the categories' test sources and of the subject's
reference sources, never trained on). Lab model 2's classifier judges *generated* images, which carry
the VAE's blur, so ``--vae`` trains on a mix of crops and their VAE reconstructions (``--reconstructed``
share per batch) and also reports accuracy on the test crops' reconstructions; ``--jitter`` varies each
crop's brightness, contrast and saturation (a category's sources differ in colour more than in kind).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".cache/lab/lab_classifier.safetensors")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion", choices=("fashion", "textures"))
    ap.add_argument("--steps", type=int, default=3000, help="textures: optimizer steps (fresh seeded crops each)")
    ap.add_argument("--vae", type=Path, help="textures: a lab-2 VAE file; train on crops and their reconstructions")
    ap.add_argument("--reconstructed", type=float, default=0.5,
                    help="textures with --vae: share of each batch replaced by its VAE reconstruction (0..1)")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="textures: photometric jitter strength (0: none; 0.2: brightness, contrast and saturation "
                         "each scaled by a factor in [0.8, 1.2] per crop)")
    args = ap.parse_args(argv)
    if args.data == "textures":
        return train_textures(args)
    import torch
    from safetensors.torch import save_file

    from lab import data
    from lord_ops.atomic import atomic_write
    from lord_ops.lab_classifier import LabClassifier

    torch.manual_seed(args.seed)
    x, y = data.load("train")
    xt, yt = data.load("test")
    x, y, xt, yt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), torch.from_numpy(yt)
    model = LabClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        model.train()
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            batch = model.prepare(x[idx])
            if torch.rand(1, generator=g) < 0.5:
                batch = batch.flip(-1)  # garments are left-right symmetric enough
            _, logits = model(batch)
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        model.eval()
        with torch.inference_mode():
            pred = torch.cat([model(model.prepare(xt[j:j + 1000]))[1].argmax(1) for j in range(0, len(xt), 1000)])
        acc = (pred == yt).float().mean().item()
        per_class = [(pred[yt == c] == c).float().mean().item() for c in range(10)]
        print(f"[classifier] epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} test accuracy {acc:.4f} "
              f"(bag {per_class[data.HELDOUT_CLASS]:.3f}) {time.time() - t0:.0f} s", flush=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out, lambda tmp: save_file(state, tmp, metadata={"test_accuracy": f"{acc:.4f}"}))
    print(f"[classifier] wrote {args.out}")
    return 0


def train_textures(args) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from lab import textures
    from lord_ops.atomic import atomic_write
    from lord_ops.lab_classifier import GEOMETRY_KEY, Geometry, LabClassifier

    torch.manual_seed(args.seed)
    names = tuple(textures.CATEGORIES)
    model = LabClassifier(Geometry(3, textures.SIZE, names))
    train = textures.Pool("train", names)
    test_x, test_y = [], []
    for c in names:  # 64 crops per category, of sources never trained on
        pool = textures.Pool("reference" if c == textures.SUBJECT else "test", (c,))
        x, y = pool.sample(64, 10_000 + names.index(c))
        test_x.append(x)
        test_y.append(y)
    xt, yt = torch.from_numpy(np.concatenate(test_x)), torch.from_numpy(np.concatenate(test_y))
    vae = None
    if args.vae is not None:
        from lab.eval_vae import reconstruct
        from lab.train_vae import load_vae
        from lord_ops.comfy.bootstrap import ensure_comfyui_importable

        ensure_comfyui_importable(cpu=True)  # the lab-2 VAE is ComfyUI's TAESD
        vae, vae_step = load_vae(args.vae)
        xt_rec = reconstruct(vae, xt)
        print(f"[classifier] training on crops and their reconstructions by {args.vae} (step {vae_step}), "
              f"share {args.reconstructed:g}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    resume = Path(str(args.out) + ".checkpoint.pt")  # every 250 steps: a stopped run resumes
    def evaluate(images=xt) -> tuple[float, dict]:
        """Test accuracy overall and per category."""
        model.eval()
        with torch.inference_mode():
            pred = model(model.prepare(images))[1].argmax(1)
        per = {c: round((pred[yt == i] == i).float().mean().item(), 3) for i, c in enumerate(names)}
        return (pred == yt).float().mean().item(), per

    from lab.files import restore

    first = restore(resume, model=model, opt=opt, sched=sched) + 1
    if first > 1:
        print(f"[classifier] resumed at step {first - 1}", flush=True)
    t0 = time.time()
    for step in range(first, args.steps + 1):
        x, y = train.sample(args.batch_size, args.seed * 1_000_003 + step)
        x = augment(torch.from_numpy(x), vae, args, step)
        batch = model.prepare(x)
        k = step % 8  # the eight symmetries of the square: textures have no up or left
        batch = torch.rot90(batch, k % 4, dims=(2, 3))
        if k >= 4:
            batch = batch.flip(-1)
        model.train()
        _, logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            acc, per = evaluate()
            rec = f" (reconstructions {evaluate(xt_rec)[0]:.4f})" if vae is not None else ""
            print(f"[classifier] step {step}/{args.steps} loss {loss.item():.4f} test accuracy {acc:.4f}{rec} "
                  f"{per} {time.time() - t0:.0f} s", flush=True)
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}
            atomic_write(resume, lambda tmp: torch.save(state, tmp))
    acc, _ = evaluate()  # also when a resumed run had no step left
    meta = {"test_accuracy": f"{acc:.4f}", GEOMETRY_KEY: model.geometry.to_json(), "jitter": f"{args.jitter:g}"}
    if vae is not None:
        meta.update({"test_accuracy_reconstructed": f"{evaluate(xt_rec)[0]:.4f}", "vae": Path(args.vae).name,
                     "reconstructed_share": f"{args.reconstructed:g}"})
        print(f"[classifier] test accuracy on the VAE's reconstructions {meta['test_accuracy_reconstructed']}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out, lambda tmp: save_file(state, tmp, metadata=meta))
    print(f"[classifier] wrote {args.out}")
    return 0


def augment(x, vae, args, step: int):
    """The textures' training augmentation of uint8 ``[B, 64, 64, 3]`` crops (0..255): with ``vae``, the
    first ``round(reconstructed * B)`` crops replaced by their VAE reconstructions; with ``jitter`` j > 0,
    each crop's brightness, contrast (about its mean) and saturation (about its grey) scaled by factors
    drawn uniformly in [1 - j, 1 + j], seeded by ``step``. Returns uint8, same layout."""
    import torch

    if vae is not None and args.reconstructed > 0:
        from lab.eval_vae import reconstruct

        k = int(round(args.reconstructed * len(x)))
        if k:
            x = torch.cat([reconstruct(vae, x[:k]), x[k:]])
    if args.jitter > 0:
        g = torch.Generator().manual_seed(args.seed * 7_919 + step)
        f = 1 + args.jitter * (2 * torch.rand(3, len(x), 1, 1, 1, generator=g) - 1)  # brightness, contrast, sat.
        y = x.float() * f[0]
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = mean + (y - mean) * f[1]
        grey = y.mean(dim=3, keepdim=True)
        y = grey + (y - grey) * f[2]
        x = y.round().clamp(0, 255).to(torch.uint8)
    return x


if __name__ == "__main__":
    raise SystemExit(main())
