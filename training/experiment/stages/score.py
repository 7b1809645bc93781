"""Stages ``score/<variant>``: the metrics of a method's samples (CLIP-IQA per image; FID + KID, or
FD / KD of another extractor, against the reference features; subject accuracy; the texture metrics:
correlation with the ACE target and the high-frequency spectrum distance to the reference images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lord_ops.metrics import (frechet_distance, high_frequency_distance, kernel_distance, pattern_correlation,
                              projected_frechet_distance)
from training.experiment.context import ExperimentContext
from training.experiment.images import hwc, read_png
from training.experiment.methods import Variant
from training.pipeline import Stage


def stage(ctx: ExperimentContext, v: Variant) -> Stage:
    return Stage(f"score/{v.id}", {"metrics": ctx.metrics_key()}, lambda folder: run(ctx, folder, v),
                 needs=(f"sample/{v.id}", "reference"), describe="metrics of the samples")


def run(ctx: ExperimentContext, folder: Path, v: Variant) -> dict:
    exp, m = ctx.exp, ctx.exp.metrics
    sample_dir = ctx.plan.folder(f"sample/{v.id}")
    files = ctx.plan.result(f"sample/{v.id}")["images"]
    images = hwc([read_png(sample_dir / f) for f in files])
    out = {}
    if ctx.metrics["clip_iqa"]["available"]:
        s = ctx.rt.metric_model("clip_iqa").score(images, exp.class_name, m.batch_size)
        out["clip_iqa"] = {"mean": float(s.mean()), "std": float(s.std(unbiased=False)),
                           "per_image": [round(float(x), 6) for x in s]}
    ref_file = ctx.plan.folder("reference") / "features.safetensors"
    ref = load_file(str(ref_file)) if ref_file.is_file() else {}
    for kind, fd, kd in (("inception", "fid", "kid"), ("extractor", "fd", "kd")):
        if kind not in ref:
            continue
        feats = ctx.rt.metric_model(kind).features(images, m.batch_size)
        out[fd] = {"value": float(frechet_distance(feats, ref[kind])), "images": int(feats.shape[0]),
                   "reference_images": int(ref[kind].shape[0])}
        if m.fd_bootstrap:  # FID at ~100 images is noisy: its spread over resampled generated sets
            rng = np.random.RandomState(exp.seed)
            boot = [frechet_distance(feats[torch.from_numpy(rng.randint(0, len(feats), len(feats)))], ref[kind])
                    for _ in range(m.fd_bootstrap)]
            out[fd].update(std=float(np.std(boot)), std_kind=f"bootstrap over the generated images "
                                                             f"({m.fd_bootstrap} resamples)")
        kid = kernel_distance(feats, ref[kind], m.kid_subsets, m.kid_subset_size, exp.seed)
        out[kd] = {k: (float(val) if isinstance(val, float) else val) for k, val in kid.items()}
        if kind == "extractor" and "fd_pca" in ctx.metrics:
            dims = min(m.fd_pca_dims, ref[kind].shape[1], ref[kind].shape[0] - 1)  # a small reference set caps it
            out["fd_pca"] = {**projected_frechet_distance(feats, ref[kind], dims),
                             "images": int(feats.shape[0]), "reference_images": int(ref[kind].shape[0])}
    out.update(texture_metrics(ctx, images))
    if "subject_acc" in ctx.metrics:
        model = ctx.rt.metric_model("extractor")
        predicted = model.predict(images, m.batch_size)
        hits = (predicted == model.classes.index(m.subject_class)).double()
        out["subject_acc"] = {"mean": float(hits.mean()), "std": float(hits.std(unbiased=False)),
                              "per_image": [int(h) for h in hits],
                              "predicted": {c: int((predicted == i).sum()) for i, c in enumerate(model.classes)
                                            if int((predicted == i).sum())}}
    return out


def texture_metrics(ctx: ExperimentContext, images_u8: torch.Tensor) -> dict:
    """``target_corr`` and ``hf_spectrum`` of samples ``[N, H, W, 3]`` uint8 (the plan's definitions)."""
    from lord_ops.attacks import target_image
    from training.experiment.images import unit_hwc
    from training.experiment.stages.reference import reference_images

    exp, out = ctx.exp, {}
    x = images_u8.float() / 255.0
    h, w = x.shape[1:3]
    if "target_corr" in ctx.metrics:
        given = unit_hwc(read_png(exp.attack_target))[None].movedim(-1, 1) if exp.attack_target else None
        corr = pattern_correlation(x, target_image(given, h, w, min_cell=latent_cell(ctx)))
        out["target_corr"] = {"mean": float(corr.mean()), "std": float(corr.std(unbiased=False)),
                              "per_image": [round(float(c), 6) for c in corr]}
    if "hf_spectrum" in ctx.metrics and ctx.reference is not None:
        ref = reference_images(ctx)
        if tuple(ref.shape[1:3]) == (h, w):
            out["hf_spectrum"] = high_frequency_distance(x, ref.float() / 255.0, exp.metrics.hf_low_cut)
        else:
            out["hf_spectrum"] = {"missing": f"the reference images are {ref.shape[2]}x{ref.shape[1]} px, the "
                                             f"samples {w}x{h}"}
    return out


def latent_cell(ctx: ExperimentContext) -> int:
    """Pixels per latent cell of the model (the default ACE target's smallest cell): as the protect stage
    recorded it, so that re-scoring samples loads no model; runs without it (older protect stages, given
    protected images) read it from the VAE."""
    from lord_ops.comfy.grad import vae_downscale
    from training.pipeline import StageFailed

    if "protect" in ctx.plan.stages:
        try:
            cell = ctx.plan.result("protect")["attack"].get("vae_downscale")
        except StageFailed:
            cell = None
        if cell:
            return int(cell)
    return vae_downscale(ctx.rt.models()[2])
