"""Stage ``reference``: the features of the reference images ([metrics] reference, default the clean
instance images) that FID / KID / FD compare the generated images with."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from lord_ops.atomic import atomic_write
from training.experiment.context import ExperimentContext
from training.experiment.images import hwc, load_set
from training.pipeline import Stage


def stages(ctx: ExperimentContext) -> list[Stage]:
    m = ctx.exp.metrics
    if m.reference is not None:
        ref = {"folder": ctx.image_key(load_set(m.reference, ctx.exp.resolution))}
    elif ctx.clean:
        ref = {"clean_instance_images": ctx.image_key(ctx.clean)}
    else:
        ref = None
    ctx.reference = ref
    return [Stage("reference", {"reference": ref, "metrics": ctx.metrics_key()}, lambda folder: run(ctx, folder),
                  describe="features of the reference images")]


def reference_images(ctx: ExperimentContext):
    """The reference images, uint8 ``[N, H, W, 3]`` in file-name order."""
    m = ctx.exp.metrics
    images = load_set(m.reference, ctx.exp.resolution) if m.reference is not None else ctx.clean
    return hwc([images[n] for n in sorted(images)])


def run(ctx: ExperimentContext, folder: Path) -> dict:
    out = {}
    if ctx.reference is None:
        return {"images": 0, "note": "no clean reference images (artist mode without originals and no "
                                     "[metrics] reference): FID/KID/FD are not computed"}
    images = reference_images(ctx)
    tensors = {}
    for kind, metric in (("inception", "fid"), ("extractor", "fd")):
        if metric in ctx.metrics and ctx.metrics[metric]["available"]:
            tensors[kind] = ctx.rt.metric_model(kind).features(images, ctx.exp.metrics.batch_size).contiguous()
            out[kind] = list(tensors[kind].shape)
    if tensors:
        atomic_write(folder / "features.safetensors", lambda tmp: save_file(tensors, tmp))
    return {"images": int(images.shape[0]), "features": out}
