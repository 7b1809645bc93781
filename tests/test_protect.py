"""Attacks through real ComfyUI models (SD15-geometry checkpoint), in-process."""
import dataclasses
import json

import pytest
import torch

import comfy.sd

from lord_ops import attacks
from lord_ops.attacks import AttackConfig
from lord_ops.comfy import grad, patch, protect
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


def _mean_gate(lorded, vae, cond, image_bhwc) -> float:
    """The LoRD's mean learned gate over its live layers on one denoising pass of ``image_bhwc`` (t = 200)."""
    with patch.recording_gates(lorded) as (clone, records), torch.no_grad():
        grad.load_for_gradients(clone, vae)
        x = image_bhwc.movedim(-1, 1).float()
        z = grad.latent_encoder(vae, clone)(x)
        grad.noise_predictor(clone, cond, tuple(x.shape[-2:]))(z, torch.tensor([200]))
        live = [g for name, g in records if float(g.abs().max()) > 0]
        return float(torch.stack([g.float().mean() for g in live]).mean())


@pytest.mark.parametrize("surrogate", [False, True])
def test_gate_evasion_pushes_the_lord_gate_down_on_the_protected_image(loaded, surrogate):
    """The gate-evasion attacker (lord_ops.comfy.evasion): the same attack and seed, with the penalty
    term the protected copy's mean LoRD gate is lower than without it (fixed-model PGD and the mist-v2
    loop, whose surrogate training steps record nothing); the MODEL is left untouched."""
    from lord_ops.comfy.evasion import GatePenalty, evading_gates

    model, vae, cond = loaded
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=3)
    for w in lord.targets.values():  # a gate that reads its input (a fresh gate sits at 0.5 everywhere)
        w.gate_w1.mul_(20.0)
        w.gate_w2.mul_(20.0)
    lorded = patch.apply_lord(model, lord)
    snap = _snapshot(lorded)
    image = picture(h=32, w=32, seed=5)
    attack = AttackConfig("pgd", 16.0, 4.0, 3, seed=1)
    loop = attacks.AlternatingConfig(rounds=2, clean_steps=0, train_steps=1, learning_rate=1e-3, rank=2,
                                     targets="attn") if surrogate else None
    plain, _ = protect.protect(lorded, vae, cond, image, protect.Protection(attack, loop))
    with evading_gates(lorded, 100.0) as (clone, penalty):
        evaded, report = protect.protect(clone, vae, cond, image, protect.Protection(attack, loop, gate_penalty=penalty))
    assert len(penalty.history) == attack.steps * (loop.rounds if loop else 1)  # one read per PGD step only
    assert ((evaded - image).abs().max() * 255).item() <= 16 + 1e-3
    before, after, unaware = (_mean_gate(lorded, vae, cond, x) for x in (image, evaded, plain))
    assert after < before - 1e-3 and after < unaware - 1e-3, (before, after, unaware)
    _assert_untouched(lorded, snap)
    with pytest.raises(ValueError, match="> 0"):
        GatePenalty(0.0)
    with pytest.raises(RuntimeError, match="no live LoRD gate"):
        GatePenalty(1.0)()


def test_protect_node_gate_evasion_reports_the_gate_and_refuses_what_it_cannot_read(loaded):
    """The Protect node's ``gate_evasion`` widget: through a LoRD-carrying MODEL the report traces the
    LoRD's mean gate, which the attack pushes down, and the MODEL is left as it was; a MODEL without a
    LoRD and photoguard (no UNet pass, so no gate) are refused with a message saying what to do."""
    model, vae, cond = loaded
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=3)
    for w in lord.targets.values():  # a gate that reads its input
        w.gate_w1.mul_(20.0)
        w.gate_w2.mul_(20.0)
    lorded = patch.apply_lord(model, lord)
    snap = _snapshot(lorded)
    image = picture(h=32, w=32, seed=5)
    evaded, _, text = LoRDProtect.execute(lorded, vae, cond, image, "pgd", 16.0, 4.0, 3, 1, False, None,
                                          gate_evasion=100.0).args
    report = json.loads(text)["gate_evasion"]
    assert report["weight"] == 100.0 and report["passes"] == 3 and 0 < report["mean_gate_last_pass"] < 1, report
    assert _mean_gate(lorded, vae, cond, evaded) < _mean_gate(lorded, vae, cond, image) - 1e-3
    assert "gate_evasion" not in json.loads(LoRDProtect.execute(lorded, vae, cond, image, "pgd", 16.0, 4.0, 1, 1,
                                                                False, None).args[2])
    _assert_untouched(lorded, snap)
    with pytest.raises(ValueError, match="no LoRD applied"):
        LoRDProtect.execute(model, vae, cond, image, "pgd", 16.0, 4.0, 1, 1, False, None, gate_evasion=1.0)
    with pytest.raises(ValueError, match="photoguard"):
        LoRDProtect.execute(lorded, vae, cond, image, "photoguard", 16.0, 4.0, 1, 1, False, None, gate_evasion=1.0)


# ---------------------------------------------------------------------------------------------
# The published surrogate loops (mist-v2, ASPL, FSMG) on a real ComfyUI model


def _snapshot(model):
    return ({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}, dict(model.patches),
            dict(model.injections) if hasattr(model, "injections") else None)


def _assert_untouched(model, snap):
    import comfy.model_management as mm

    mm.unload_all_models()
    weights, patches, injections = snap
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert dict(model.patches) == patches
    assert injections is None or dict(model.injections) == injections
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())


def test_surrogate_loop_alternates_and_pgd_sees_the_surrogate(loaded):
    """Round 0 runs against the untrained surrogate (B = 0: the base model) whether or not it is
    trained afterwards; round 1 runs against the surrogate fine-tuned on round 0's images, so its
    PGD losses differ from a run whose surrogate is never trained (same seeds otherwise)."""
    model, vae, cond = loaded
    snap = _snapshot(model)
    images = picture(b=2, h=40, w=36, seed=4)
    attack = AttackConfig("ace", epsilon=4.0, step_size=1.0, steps=2, seed=11)
    trained = attacks.AlternatingConfig(rounds=2, train_steps=3, learning_rate=1e-3)
    out, rep = protect.protect(model, vae, cond, images, protect.Protection(attack, trained))
    untrained, rep0 = protect.protect(model, vae, cond, images,
                                      protect.Protection(attack, attacks.AlternatingConfig(rounds=2, train_steps=0)))
    r_t, r_0 = rep["rounds"], rep0["rounds"]
    assert len(r_t[0]["train_losses"]) == 3 and r_t[1]["train_losses"] == [] and r_0[0]["train_losses"] == []
    assert r_t[0]["pgd_losses"] == r_0[0]["pgd_losses"]  # same start, same (untrained) surrogate
    assert r_t[1]["pgd_losses"] != r_0[1]["pgd_losses"]  # the trained LoRA is live in round 1
    assert not torch.equal(out, untrained)
    assert rep["surrogate_layers"] == 27  # attn q/k/v/out of attn1/attn2 + ff.net.0.proj, 3 transformer blocks
    diff = (out * 255).round() - (images * 255).round()
    assert 1 <= diff.abs().max() <= 4
    torch.testing.assert_close((out * 255).round(), out * 255, rtol=0, atol=1e-4)  # 8-bit exact
    assert len(rep["loss_traces"]) == 2 and len(rep["loss_traces"][0]) == 4  # 2 rounds x 2 steps
    again, _ = protect.protect(model, vae, cond, images, protect.Protection(attack, trained))
    assert torch.equal(again, out)  # same seed, same result
    other, _ = protect.protect(model, vae, cond, images, protect.Protection(dataclasses.replace(attack, seed=12), trained))
    assert not torch.equal(other, out)
    white = torch.ones(1, 24, 24, 3)  # a user-supplied target (e.g. mist-v2's MIST.png) replaces the pattern
    targeted, _ = protect.protect(model, vae, cond, images, protect.Protection(attack, trained, white))
    assert not torch.equal(targeted, out)
    _assert_untouched(model, snap)


def test_aspl_restores_the_clean_surrogate_and_uses_class_images(loaded):
    """ASPL: a copy is fine-tuned on the clean images for the PGD round only; class images add the
    prior-preservation term to every surrogate step."""
    model, vae, cond = loaded
    snap = _snapshot(model)
    images = picture(b=1, h=32, w=32, seed=6)
    attack = AttackConfig("pgd", epsilon=6.375, step_size=0.6375, steps=1, seed=2)
    cfg = attacks.AlternatingConfig(rounds=2, clean_steps=2, train_steps=2, learning_rate=1e-3, targets="attn")
    with torch.inference_mode():  # like the server
        out, rep = protect.protect(model, vae, cond, images, protect.Protection(attack, cfg))
    assert [len(r["clean_losses"]) for r in rep["rounds"]] == [2, 2]
    assert [len(r["train_losses"]) for r in rep["rounds"]] == [2, 0]
    assert rep["surrogate_layers"] == 24
    with_class, rep_c = protect.protect(model, vae, cond, images,
                                        protect.Protection(attack, cfg, class_images=picture(b=2, h=24, w=40, seed=8)))
    assert rep_c["class_images"] == 2 and rep_c["rounds"][0]["clean_losses"] != rep["rounds"][0]["clean_losses"]
    assert 1 <= ((with_class - images) * 255).round().abs().max() <= 6
    _assert_untouched(model, snap)


def test_protect_node_mist_v2_preset_runs_the_published_schedule(loaded):
    """The node's mist_v2 preset: 5 rounds x 30 PGD steps, 10 surrogate steps between rounds, eps 4;
    one progress bar over the whole loop. (An 8x8 image keeps the full schedule quick.)"""
    import comfy.utils

    model, vae, cond = loaded
    snap = _snapshot(model)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        out = LoRDProtect.execute(model, vae, cond, picture(b=1, h=8, w=8, seed=1), "pgd", 12.0, 3.0, 1, 3, False,
                                  None, "mist_v2")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    perturbed, _, report = out.args
    rep = json.loads(report)
    assert rep["preset"] == "mist_v2" and rep["method"] == "ace" and rep["strength_levels"] == pytest.approx(4.0)
    assert rep["steps"] == 30 and rep["surrogate"]["rounds"] == 5 and rep["surrogate"]["train_steps"] == 10
    assert len(rep["loss_traces"][0]) == 150
    assert [len(r["perturbed"]) for r in rep["surrogate_losses"]] == [10, 10, 10, 10, 0]
    assert seen[-1] == (190, 190) and [v for v, _ in seen] == list(range(1, 191))
    assert 1 <= ((perturbed - picture(b=1, h=8, w=8, seed=1)) * 255).round().abs().max() <= 4
    _assert_untouched(model, snap)


def test_cancel_inside_surrogate_steps(loaded):
    import comfy.model_management as mm
    import comfy.utils

    model, vae, cond = loaded
    snap = _snapshot(model)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 2:  # ASPL starts with 3 surrogate steps on the clean images: cancel during them
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            LoRDProtect.execute(model, vae, cond, picture(b=1, h=16, w=16), "pgd", 6.0, 1.0, 1, 0, False, None,
                                "anti_dreambooth_aspl")
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen == [1, 2]
    _assert_untouched(model, snap)


def test_sub_level_budgets_are_refused(loaded):
    model, vae, cond = loaded
    with pytest.raises(ValueError, match="below one pixel level"):
        LoRDProtect.execute(model, vae, cond, picture(), "pgd", 0.5, 0.1, 1, 0, False, None)
    with pytest.raises(ValueError, match="below one pixel level"):
        protect.protect(model, vae, cond, picture(), protect.Protection(AttackConfig("pgd", epsilon=0.9, step_size=0.1, steps=1)))
