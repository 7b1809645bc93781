"""Sample previews during training: every N optimizer steps, one small image sampled with the adapter
being trained live, shown beside the loss curve in the trainer node's progress preview (as popular
trainer packs show validation samples).

The image is sampled through ComfyUI's own sampler (``generate.sample_latent``: core's
``common_ksampler`` path, ``comfy.sample.sample``) on the **training clone**, whose forward hooks
(``trainer.AdapterHooks``, and a Stage-2 run's live LoRD injection) add the current adapter to every
target layer, so the sample is exactly what the adapter does at this step. It runs on the training
device, at the training resolution (the latents' size), with a fixed seed (the run's), and decodes with
the run's VAE (``VAE.decode``, core's ``VAEDecode``); a Stage-2 run given latents without a VAE gets
ComfyUI's latent-to-RGB approximation (``latent_preview.Latent2RGBPreviewer``, 1/8 size, upscaled).

Settings (:data:`PREVIEW_SAMPLING`): ``euler`` / ``normal``, 12 steps, cfg 4.0 against the
positive's zeroed-out copy (core's *ConditioningZeroOut*: the trainer nodes have no text encoder to
encode a negative prompt). The prompt is the run's first conditioning (Stage 1: the first caption;
Stage 2: the instance prompt).

**Training is not disturbed** (:func:`undisturbed`): sampling runs under ``torch.no_grad()`` (not
``inference_mode``: nothing it creates or caches, e.g. an adapter's device copy, becomes an inference
tensor that a later backward would refuse), inside a fork of the torch CPU RNG and the training
device's RNG (``torch.random.fork_rng``; ComfyUI's ``prepare_noise`` reseeds the global generator) and of
Python's and NumPy's, and every module's ``training`` flag and the model's ``current_patcher`` are put
back afterwards. Gate logits the trainer's hooks record while sampling are dropped, and those hooks
are registered again (``AdapterHooks.reattach``): ComfyUI's sampler loads the model, which ejects
and re-injects a Stage-2 run's LoRD hooks after the trainer's, and a different summation order
changes the last float bits of every later step. A run with previews ends with the same weights,
bit for bit, as one without (``tests/test_train.py``).

Measured cost (``python -m bench.bench_preview``: CPU, the SD15-geometry test checkpoint, 32 and 64 px,
batch 1, fp32, a shared 2-core VM): one preview took 0.9-1.0 s against 0.21 s per Stage-1 step (two
UNet passes with backward; ratio 4.2-5.0, 6.9 in an earlier run) and 0.05-0.10 s per Stage-2 step (ratio
10.7-10.8, 10.1-11.9 earlier): :data:`MEASURED_COST_STEPS`, quoted by the widget tooltips and the
nodes' help pages. On other hardware, models and sizes the ratio differs.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Callable, Optional

import torch

PREVIEW_SAMPLING = dict(steps=12, cfg=4.0, sampler="euler", scheduler="normal")
# time of one preview / time of one training step, measured on the CPU with the SD15-geometry test
# checkpoint (tools.tiny, 32 px images, batch 1, fp32); the widget tooltips and help pages quote it
MEASURED_COST_STEPS = {"stage1": 5, "stage2": 11}


def zeroed_negative(positive: list) -> list:
    """Core's ``ConditioningZeroOut`` of a CONDITIONING: the same entries with zeroed tensors."""
    out = []
    for cond, extra in positive:
        d = dict(extra)
        for key in ("pooled_output", "conditioning_lyrics"):
            if isinstance(d.get(key), torch.Tensor):
                d[key] = torch.zeros_like(d[key])
        out.append([torch.zeros_like(cond), d])
    return out


@contextlib.contextmanager
def forked_rng(device: torch.device):
    """Every random generator a sampler may touch, restored on exit: torch's CPU generator and the
    ``device``'s (CUDA and other accelerators with a ``torch.<type>`` RNG API), Python's ``random`` and
    NumPy's global state."""
    import numpy as np

    device = torch.device(device)
    py_state, np_state = random.getstate(), np.random.get_state()
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        module = getattr(torch, device.type, None)
        index = device.index if device.index is not None else (module.current_device() if module is not None else 0)
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    try:
        with fork:
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def undisturbed(device: torch.device, modules: list[torch.nn.Module], model=None):
    """No gradients, forked RNG (:func:`forked_rng`), and every submodule's ``training`` flag (and
    ``model.current_patcher``, which ComfyUI's sampler sets and clears) restored on exit."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    patcher = getattr(model, "current_patcher", None)
    try:
        with forked_rng(device), torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        if model is not None and hasattr(model, "current_patcher"):
            model.current_patcher = patcher


def _latent_rgb(model_patcher, samples: torch.Tensor) -> Optional[torch.Tensor]:
    """ComfyUI's latent-to-RGB preview of raw VAE latents ``[1, C, h, w]`` as U8 ``[8h, 8w, 3]``, or None
    when the model's latent format has no RGB factors."""
    import latent_preview
    import numpy as np

    fmt = model_patcher.model.latent_format
    if getattr(fmt, "latent_rgb_factors", None) is None:
        return None
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None),
                                                   getattr(fmt, "latent_rgb_factors_reshape", None))
    image = previewer.decode_latent_to_preview(fmt.process_in(samples.float().cpu()))
    image = image.resize((image.width * 8, image.height * 8), 0)  # nearest
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def sample_preview(model_patcher, vae, positive: list, latent_hw: tuple[int, int], seed: int,
                   check: Optional[Callable[[], None]] = None) -> Optional[torch.Tensor]:
    """One image ``[H, W, 3]`` uint8 for ``positive`` from ``model_patcher`` as it is now (hooks live),
    latent size ``latent_hw``, seed ``seed``, :data:`PREVIEW_SAMPLING`; ``check()`` at every sampler
    step. Call it inside :func:`undisturbed`. None when there is neither a VAE nor an RGB approximation."""
    from .generate import SamplingConfig, decode_u8, sample_latent

    h, w = latent_hw
    channels = getattr(model_patcher.model.latent_format, "latent_channels", 4)
    config = SamplingConfig(width=8 * w, height=8 * h, negative="", batch_size=1, **PREVIEW_SAMPLING)
    callback = (lambda step, x0, x, total: check()) if check is not None else None
    samples = sample_latent(model_patcher, torch.zeros([1, channels, h, w]), seed, positive, zeroed_negative(positive),
                            config, 1.0, callback, console_bar=False)
    if vae is not None:
        return decode_u8(vae, samples)[0]
    return _latent_rgb(model_patcher, samples)


class TrainingPreview:
    """The ``on_step`` of a run with previews: at every ``every``-th step, sample one image with the
    training clone (:func:`sample_preview` inside :func:`undisturbed`), hand it to
    ``on_image(step, u8 [H, W, 3])``, then call the run's own ``on_step``.

    ``modules``: the modules whose ``training`` flags must survive (the clone's UNet and the
    trainable adapters); ``hooks``: the run's ``AdapterHooks``, whose gate records are dropped after
    sampling. ``seconds``: time spent in previews so far, ``count``: previews made."""

    def __init__(self, every: int, clone, vae, positive: list, latent_hw: tuple[int, int], seed: int,
                 modules: list[torch.nn.Module], on_image: Optional[Callable] = None, on_step: Optional[Callable] = None,
                 hooks=None, check: Optional[Callable[[], None]] = None):
        self.every, self.clone, self.vae, self.positive = int(every), clone, vae, positive
        self.latent_hw, self.seed, self.modules = tuple(int(d) for d in latent_hw), int(seed), modules
        self.on_image, self.on_step, self.hooks, self.check = on_image, on_step, hooks, check
        self.seconds, self.count = 0.0, 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, rec) -> None:
        if self.due(rec.step):
            from . import grad

            t0 = time.perf_counter()
            with undisturbed(grad.compute_device(self.clone), self.modules, self.clone.model):
                image = sample_preview(self.clone, self.vae, self.positive, self.latent_hw, self.seed, self.check)
            if self.hooks is not None:  # drop the gates recorded while sampling; hooks last again
                self.hooks.take()
                self.hooks.reattach()
            self.seconds += time.perf_counter() - t0
            self.count += 1
            logging.info("preview at step %d: %.2f s", rec.step, time.perf_counter() - t0)
            if image is not None and self.on_image is not None:
                self.on_image(rec.step, image)
        if self.on_step is not None:
            self.on_step(rec)


def check_every(preview_every) -> int:
    """``preview_every`` as an int >= 0 (0 = no previews); anything else is refused."""
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
        raise ValueError(f"preview_every must be a whole number >= 0 (0 = no previews), got {preview_every!r}")
    return preview_every


def step_callback(preview_every: int, on_step: Optional[Callable], **preview) -> Optional[Callable]:
    """``on_step`` itself without previews, else a :class:`TrainingPreview` wrapping it."""
    if not check_every(preview_every):
        return on_step
    return TrainingPreview(preview_every, on_step=on_step, **preview)
