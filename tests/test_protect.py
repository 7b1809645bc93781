"""Attacks through real ComfyUI models (SD15-geometry checkpoint), in-process."""
import json

import pytest
import torch

import comfy.sd

from comfyui_lord.lord_ops import attacks
from comfyui_lord.lord_ops.attacks import AttackConfig
from comfyui_lord.lord_ops.comfy import grad, patch, protect
from comfyui_lord.nodes.attack import LoRDProtect


@pytest.fixture(scope="module")
def loaded(sd15_checkpoint):
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    return model, vae, cond


def picture(b=1, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(b, h, w, 3, generator=g) * 255) / 255


def test_gradients_reach_pixels_under_inference_mode(loaded):
    model, vae, cond = loaded
    with torch.inference_mode():  # like the server
        grad.load_for_gradients(model, vae)
        encode = grad.latent_encoder(vae, model)
        predict = grad.noise_predictor(model, cond, (48, 40))
        with torch.inference_mode(False):
            x = picture().movedim(-1, 1).clone().requires_grad_(True)
            z = encode(x)
            eps = predict(z, torch.tensor([300]))
            (g,) = torch.autograd.grad(eps.square().mean(), x)
    assert z.shape == (1, 4, 6, 5) and g.abs().sum() > 0


def test_noise_prediction_matches_sampler_math(loaded):
    """eps from the sigma-space conversion equals the model's own eps for the same input."""
    model, vae, cond = loaded
    grad.load_for_gradients(model, None)
    predict = grad.noise_predictor(model, cond, (64, 64))
    acp = grad.alphas_cumprod(model)
    z = torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    with torch.no_grad():
        eps = predict(z, t)
        sigma = model.get_model_object("model_sampling").sigmas[t]
        x = z / acp[t].sqrt()
        unet_eps = model.model.diffusion_model(z, model.get_model_object("model_sampling").timestep(sigma).float(),
                                               context=cond[0][0])
    torch.testing.assert_close(eps, unet_eps.float(), rtol=1e-3, atol=1e-3)
    assert torch.allclose(x * (1 + sigma ** 2).rsqrt(), z, atol=1e-5)


@pytest.mark.parametrize("method", attacks.METHODS)
def test_protect_node_odd_sizes_batch_budget(loaded, method):
    model, vae, cond = loaded
    images = picture(b=2, h=45, w=37)  # odd sizes, batch of 2
    out = LoRDProtect.execute(model, vae, cond, images, method, 6.0, 1.0, 3, 5, False, None)
    perturbed, view, report = out.args
    assert perturbed.shape == images.shape and view.shape == images.shape
    diff = (perturbed * 255).round() - (images * 255).round()
    assert diff.abs().max() <= 6 and diff.abs().max() >= 1
    torch.testing.assert_close((perturbed * 255).round(), perturbed * 255, rtol=0, atol=1e-4)  # 8-bit exact
    rep = json.loads(report)
    assert len(rep["loss_traces"]) == 2 and len(rep["loss_traces"][0]) == 3
    again = LoRDProtect.execute(model, vae, cond, images, method, 6.0, 1.0, 3, 5, False, None).args[0]
    assert torch.equal(again, perturbed)


@pytest.mark.parametrize("method", ["pgd", "ace"])
def test_attack_beats_random_noise_on_real_model(loaded, method):
    model, vae, cond = loaded
    images = picture(b=1, h=64, w=64, seed=3)
    cfg = AttackConfig(method, epsilon=8.0, step_size=1.0, steps=12, seed=1)
    perturbed, _ = protect.protect_images(model, vae, cond, images, cfg)
    encode = grad.latent_encoder(vae, model)
    predict = grad.noise_predictor(model, cond, (64, 64))
    acp = grad.alphas_cumprod(model)
    x = images.movedim(-1, 1)
    tgt = grad.encode_target(vae, model, None, x) if method == "ace" else None
    g = torch.Generator().manual_seed(9)
    rand = (x + (torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1) * 8 / 255).clamp(0, 1)
    score = lambda im: attacks.evaluate_objective(im, cfg, encode, predict, acp, tgt, samples=6)
    s_adv, s_orig, s_rand = score(perturbed.movedim(-1, 1)), score(x), score(rand)
    if method == "pgd":
        assert s_adv > s_orig and s_adv > s_rand
    else:
        assert s_adv < s_orig and s_adv < s_rand


def test_attack_through_a_lord_model_leaves_base_untouched(loaded):
    import comfy.model_management as mm

    model, vae, cond = loaded
    mm.unload_all_models()
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    lorded = patch.apply_lord(model, patch.init_lord_for_model(model, random_up=0.05))
    out = LoRDProtect.execute(lorded, vae, cond, picture(), "pgd", 4.0, 1.0, 2, 0, True, None).args[0]
    assert out.shape == (1, 48, 40, 3)
    mm.unload_all_models()
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())
