"""Generation and purification through ComfyUI's own sampler (SD15-geometry test checkpoint, in-process),
and JPEG re-compression."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import comfy.sd

from lord_ops.comfy import generate as G, patch
from lord_ops.purify import jpeg_recompress
from comfyui_lord.nodes.purify import LoRDPurify

FAST = G.SamplingConfig(steps=2, cfg=4.0, width=32, height=32, batch_size=2)
PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def loaded(sd15_checkpoint):
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    return model, clip, vae


def noisy(n=2, h=40, w=48, seed=0, channels=3) -> torch.Tensor:
    """Smooth colour gradients plus strong per-pixel noise (what JPEG removes), uint8 [N, H, W, 3];
    ``channels=1``: the same noise in R, G and B (luminance texture, which JPEG's 4:2:0 keeps)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([ys, xs, (ys + xs) / 2], -1) * 200 + 20
    return torch.stack([(base + torch.randn(h, w, channels, generator=g) * 25).round().clamp(0, 255)
                        for _ in range(n)]).to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# ----------------------------------------------------------------------------------------------- JPEG


def test_jpeg_recompress_is_deterministic_and_keeps_layout():
    images = noisy()
    a, b = jpeg_recompress(images, 75), jpeg_recompress(images.clone(), 75)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b)
    assert mad(a, images) > 1.0  # the per-pixel noise is (mostly) gone


def test_jpeg_quality_orders_the_distortion():
    images = noisy(1, 64, 64, seed=3, channels=1)  # measured: 40.6 dB at 95, 20.2 dB at 10
    q95, q10 = psnr(jpeg_recompress(images, 95), images), psnr(jpeg_recompress(images, 10), images)
    assert q95 > q10 + 10.0, (q95, q10)


@pytest.mark.parametrize("quality", [0, 96, 75.0, True, "75"])
def test_jpeg_quality_is_validated(quality):
    with pytest.raises(ValueError, match="quality"):
        jpeg_recompress(noisy(1), quality)


def test_jpeg_refuses_float_images():
    with pytest.raises(ValueError, match="uint8"):
        jpeg_recompress(noisy(1).float() / 255)


def test_gaussian_noise_purification_has_the_stated_sigma_and_is_reproducible():
    from lord_ops.purify import gaussian_noise

    images = torch.full((2, 64, 64, 3), 128, dtype=torch.uint8)
    a, b = gaussian_noise(images, 0.05, seed=1), gaussian_noise(images.clone(), 0.05, seed=1)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    sd = (a.float() - 128).std().item()
    assert abs(sd - 0.05 * 255) < 0.5, sd  # 12.75 levels (rounding adds ~0.3 % of variance)
    assert not torch.equal(gaussian_noise(images, 0.05, seed=2), a)
    assert torch.equal(gaussian_noise(images[1:], 0.05, seed=1)[0], a[1]) is False  # image i draws from (seed, i)
    assert torch.equal(gaussian_noise(images, 0.05, seed=1)[1], a[1])
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(images, 5.0)


# ----------------------------------------------------------------------------------------------- text to image


def test_config_validation_names_the_field():
    for field, value in (("sampler", "nope"), ("scheduler", "nope"), ("steps", 0), ("width", 36), ("cfg", float("nan")),
                         ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
            dataclasses.replace(FAST, **{field: value}).validate()


def test_text_to_image_per_seed_and_batch_independent(loaded):
    model, clip, vae = loaded
    seen = []
    batch = G.text_to_image(model, clip, vae, PROMPT, [11, 22, 33], FAST, on_image=lambda i, im: seen.append((i, im)))
    assert batch.dtype == torch.uint8 and batch.shape == (3, 32, 32, 3)
    assert [i for i, _ in seen] == [0, 1, 2] and all(torch.equal(im, batch[i]) for i, im in seen)
    alone = G.text_to_image(model, clip, vae, PROMPT, [22], FAST)
    assert torch.equal(alone[0], batch[1])  # same seed, same image, whatever was generated with it
    other_group = G.text_to_image(model, clip, vae, PROMPT, [33, 11], dataclasses.replace(FAST, batch_size=1))
    assert torch.equal(other_group[0], batch[2]) and torch.equal(other_group[1], batch[0])
    assert mad(batch[0], batch[1]) > 5.0 and mad(batch[1], batch[2]) > 5.0  # seeds differ
    assert batch.float().std() > 10  # a real image, not a constant


def test_text_to_image_uses_the_prompt_and_the_sampler(loaded):
    model, clip, vae = loaded
    a = G.text_to_image(model, clip, vae, PROMPT, [5], FAST)
    b = G.text_to_image(model, clip, vae, "an oil painting of a mountain lake", [5], FAST)
    assert mad(a, b) > 0.5
    # an ancestral sampler draws noise during sampling: from the image's own seed, so still per seed
    three = dataclasses.replace(FAST, steps=3)  # with 2 steps the last is noise-free: samplers barely differ
    ancestral = dataclasses.replace(three, sampler="euler_ancestral")
    c = G.text_to_image(model, clip, vae, PROMPT, [6, 5], ancestral)
    assert mad(G.text_to_image(model, clip, vae, PROMPT, [5], three)[0], c[1]) > 0.5  # measured 1.6
    assert torch.equal(G.text_to_image(model, clip, vae, PROMPT, [5], ancestral)[0], c[1])


def test_lord_patched_model_samples_differently(loaded):
    model, clip, vae = loaded
    lord = patch.init_lord_for_model(model, preset="attn", random_up=0.5, seed=1)
    defended = patch.apply_lord(model, lord, 1.0, "learned", "fused")
    base = G.text_to_image(model, clip, vae, PROMPT, [7], FAST)
    with_lord = G.text_to_image(defended, clip, vae, PROMPT, [7], FAST)
    assert mad(base, with_lord) > 0.5
    assert torch.equal(G.text_to_image(model, clip, vae, PROMPT, [7], FAST), base)  # base MODEL untouched


def test_check_cancels_between_images(loaded):
    model, clip, vae = loaded
    done = []

    def check():
        if len(done) >= 1:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        G.text_to_image(model, clip, vae, PROMPT, [1, 2, 3], FAST, on_image=lambda i, im: done.append(i), check=check)
    assert done == [0]


# ----------------------------------------------------------------------------------------------- DiffPure


def test_diffpure_keeps_size_is_deterministic_and_follows_strength(loaded):
    model, clip, vae = loaded
    images = noisy(2, 37, 45, seed=1)  # not a multiple of 8
    weak = G.diffpure(model, clip, vae, images, PROMPT, 0.1, 3, FAST)
    assert weak.dtype == torch.uint8 and weak.shape == images.shape
    assert torch.equal(weak, G.diffpure(model, clip, vae, images.clone(), PROMPT, 0.1, 3, FAST))
    full = G.diffpure(model, clip, vae, images, PROMPT, 1.0, 3, FAST)
    # the random test VAE does not reconstruct images, so "close to the input" means close to its VAE
    # round trip (strength 0: the encoded latent decoded unchanged)
    padded = torch.nn.functional.pad(images.float().movedim(-1, 1) / 255, (0, 3, 0, 3), mode="replicate")
    round_trip = G.decode_u8(vae, vae.encode(padded.movedim(1, -1)))[:, :37, :45]
    assert mad(weak, round_trip) < mad(full, round_trip) / 2, (mad(weak, round_trip), mad(full, round_trip))
    # image i uses seed + i: the second image alone with seed 4 is the same
    second = G.diffpure(model, clip, vae, images[1:], PROMPT, 0.1, 4, FAST)
    assert torch.equal(second[0], weak[1])
    # a list of differently sized images comes back as a list of the same sizes
    listed = G.diffpure(model, clip, vae, [images[0], noisy(1, 24, 17)[0]], PROMPT, 0.1, 3, FAST)
    assert [tuple(x.shape) for x in listed] == [(37, 45, 3), (24, 17, 3)] and torch.equal(listed[0], weak[0])


def test_diffpure_uses_the_model(loaded):
    model, clip, vae = loaded
    images = noisy(1, 32, 32)
    lord = patch.init_lord_for_model(model, preset="attn", random_up=0.5, seed=1)
    a = G.diffpure(model, clip, vae, images, PROMPT, 0.6, 0, FAST)
    b = G.diffpure(patch.apply_lord(model, lord, 1.0, "learned", "fused"), clip, vae, images, PROMPT, 0.6, 0, FAST)
    assert mad(a, b) > 0.2


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_diffpure_strength_is_validated(loaded, strength):
    model, clip, vae = loaded
    with pytest.raises(ValueError, match="strength"):
        G.diffpure(model, clip, vae, noisy(1), PROMPT, strength, 0, FAST)


# ----------------------------------------------------------------------------------------------- node


def test_purify_node(loaded):
    model, clip, vae = loaded
    images = noisy(2, 37, 45, seed=2)
    image = images.float() / 255
    out = LoRDPurify.execute(image, "jpeg", 50, 0.2, 2, 4.0, 0).args[0]
    assert out.shape == image.shape and torch.equal((out * 255).round().byte(), jpeg_recompress(images, 50))
    with pytest.raises(ValueError, match="needs the model, vae, positive"):
        LoRDPurify.execute(image, "diffpure", 75, 0.2, 2, 4.0, 0)
    positive = G.encode_prompt(clip, PROMPT)
    negative = G.encode_prompt(clip, "")
    out = LoRDPurify.execute(image, "diffpure", 75, 0.3, 2, 4.0, 9, model=model, vae=vae, positive=positive,
                             negative=negative, sampler_name="euler", scheduler="normal").args[0]
    expected = G.diffpure(model, clip, vae, images, PROMPT, 0.3, 9, FAST)
    assert out.shape == image.shape and torch.equal((out * 255).round().byte(), expected)


def test_purify_node_schema():
    """The widget order a saved workflow relies on."""
    inputs = LoRDPurify.INPUT_TYPES()
    assert list(inputs["required"]) == ["image", "method", "jpeg_quality", "strength", "steps", "cfg", "seed"]
    assert list(inputs["optional"]) == ["model", "vae", "positive", "negative", "sampler_name", "scheduler"]


def test_the_runner_encodes_a_prompt_once_for_training_and_sampling(loaded, monkeypatch):
    """The experiment runner's ``Runtime.encode`` runs CLIP once per prompt and process (Stage 1 asks once per
    image, and captions repeat); what it returns equals a fresh encoding and is an ordinary tensor without
    gradient, usable both in training (autograd) and under inference mode."""
    from training.experiment.context import Runtime

    model, clip, vae = loaded
    runtime = Runtime(exp=None, log=lambda message: None)
    runtime._models = (model, clip, vae)
    calls = []
    encode = clip.encode_from_tokens_scheduled
    monkeypatch.setattr(clip, "encode_from_tokens_scheduled", lambda tokens, **kw: calls.append(1) or encode(tokens, **kw))
    first, again, other = runtime.encode(PROMPT), runtime.encode(PROMPT), runtime.encode("a photo of a dog")
    assert first is again and len(calls) == 2 and other is not first
    tensor = first[0][0]
    assert not tensor.requires_grad and not tensor.is_inference()
    monkeypatch.undo()
    assert torch.equal(tensor, G.encode_prompt(clip, PROMPT)[0][0])
    weight = torch.ones(1, requires_grad=True)
    (tensor * weight).sum().backward()  # training may build on it
    assert weight.grad is not None
