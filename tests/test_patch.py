"""LoRD applied to a real ComfyUI MODEL (tiny SD1.x UNet from ComfyUI's own classes), in-process."""
import copy

import pytest
import torch

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import comfy.sample
import comfy.utils

from lord_ops.comfy import patch
from tools import tiny
from lord_ops.safetensors_file import LoRDFileError
from tools.safetensors_edit import rewrite_header

CTX = 64  # tiny UNet context_dim


def inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, CTX, generator=g)
    return x, ctx


def forward(mp, x, ctx, t=500.0):
    """One denoiser evaluation through ComfyUI's loading path (patches + injections applied)."""
    mm.load_models_gpu([mp])
    with torch.no_grad():
        sigma = mp.model.model_sampling.sigma(torch.full((x.shape[0],), t))
        return mp.model.apply_model(x.to(mp.model.get_dtype()), sigma, c_crossattn=ctx.to(mp.model.get_dtype())).float()


def make_lord(mp, seed=1, random_up=0.05, preset="attn"):
    lord = patch.init_lord_for_model(mp, preset=preset, random_up=random_up, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for w in lord.targets.values():
        w.gate_b2 = torch.randn(1, generator=g)  # a gate that is not 0.5 everywhere
    return lord


def explicit_delta(x, w, gate=None):
    """Straightforward LoRD (DESIGN.md eq.): v = sBAx, lam = sigmoid(W2 silu(W1 v + b1) + b2)."""
    x = x.float()
    s = w.alpha / w.down.shape[0]
    if w.down.dim() == 4:
        raise NotImplementedError
    u = x @ w.down.T
    v = s * u @ w.up.T
    h = v @ w.gate_w1.T + w.gate_b1
    lam = torch.sigmoid((h * torch.sigmoid(h)) @ w.gate_w2.T + w.gate_b2) if gate is None else torch.full_like(v[..., :1], gate)
    return v + lam * s * (u @ w.up_defense.T)


def reference_model(mp, lords, lora_sd=None, lora_strength=1.0):
    """A deep copy of the base model with explicit hooks (and a stock LoRA merged by hand)."""
    mm.unload_all_models()  # a loaded clone holds patched weights in the shared model
    ref = copy.deepcopy(mp.model)
    names = patch.unet_names(mp)
    if lora_sd:
        for key in [k for k in lora_sd if k.endswith(".lora_down.weight")]:
            name = key[: -len(".lora_down.weight")]
            mod = comfy.utils.get_attr(ref.diffusion_model, names[name])
            down, up = lora_sd[key].float(), lora_sd[f"{name}.lora_up.weight"].float()
            scale = float(lora_sd[f"{name}.alpha"]) / down.shape[0]
            with torch.no_grad():
                mod.weight += (lora_strength * scale * up @ down).to(mod.weight.dtype)
    for lord, strength, gate in lords:
        for name, w in lord.targets.items():
            mod = comfy.utils.get_attr(ref.diffusion_model, names[name])
            mod.register_forward_hook(lambda m, a, out, w=w, s=strength, g=gate: out + (s * explicit_delta(a[0], w, g)).to(out.dtype))
    return ref


def ref_forward(ref, x, ctx, t=500.0):
    with torch.no_grad():
        sigma = ref.model_sampling.sigma(torch.full((x.shape[0],), t))
        return ref.apply_model(x, sigma, c_crossattn=ctx).float()


def random_lora_sd(lord, seed=7, rank=4):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, w in list(lord.targets.items())[::2]:
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, w.in_features, generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(w.out_features, rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return sd


@pytest.mark.parametrize("implementation", ["plain", "fused"])
def test_exact_math_against_explicit_computation(tiny_model, implementation):
    lord = make_lord(tiny_model)
    x, ctx = inputs()
    out = forward(patch.apply_lord(tiny_model, lord, 0.8, "learned", implementation), x, ctx)
    ref = ref_forward(reference_model(tiny_model, [(lord, 0.8, None)]), x, ctx)
    base = forward(tiny_model, x, ctx)
    assert (out - base).abs().max() > 1e-2  # the LoRD really changes the output
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["plain", "fused"])
def test_composes_exactly_with_stock_lora(tiny_model, implementation):
    """Eq. 10: base + LoRD (gated, live) + a stock LoRA weight patch, in either order."""
    lord = make_lord(tiny_model)
    lora_sd = random_lora_sd(lord)
    x, ctx = inputs()
    lord_then_lora = comfy.sd.load_lora_for_models(patch.apply_lord(tiny_model, lord, 1.0, "learned", implementation),
                                                   None, lora_sd, 0.7, 0)[0]
    lora_then_lord = patch.apply_lord(comfy.sd.load_lora_for_models(tiny_model, None, lora_sd, 0.7, 0)[0], lord, 1.0,
                                      "learned", implementation)
    ref = ref_forward(reference_model(tiny_model, [(lord, 1.0, None)], lora_sd, 0.7), x, ctx)
    torch.testing.assert_close(forward(lord_then_lora, x, ctx), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(forward(lora_then_lord, x, ctx), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_mode", ["learned", "clean", "defense"])
def test_fused_equals_plain_and_forced_gates(tiny_model, gate_mode):
    lord = make_lord(tiny_model)
    x, ctx = inputs()
    plain = forward(patch.apply_lord(tiny_model, lord, 1.0, gate_mode, "plain"), x, ctx)
    fused_model = patch.apply_lord(tiny_model, lord, 1.0, gate_mode, "fused")
    fused = forward(fused_model, x, ctx)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    if gate_mode != "learned":  # forced gates: a pure weight patch, no hook at run time
        gate = {"clean": 0.0, "defense": 1.0}[gate_mode]
        ref = ref_forward(reference_model(tiny_model, [(lord, 1.0, gate)]), x, ctx)
        torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
        assert all(not m._forward_hooks for m in tiny_model.model.diffusion_model.modules())


@pytest.mark.parametrize("implementation", ["plain", "fused"])
def test_defense_strength_scales_the_defense_branch_alone(tiny_model, implementation):
    """defense_strength k: v + lambda(v) * k * s B' A x (the gate reads the unscaled clean branch);
    k = 0 leaves the LoRA branch alone, like gate 0."""
    lord = make_lord(tiny_model)
    x, ctx = inputs()
    scaled = lord.with_defense_strength(2.5)
    assert all(torch.equal(a.up, b.up) and torch.equal(a.up_defense * 2.5, b.up_defense)
               for a, b in zip(lord.targets.values(), scaled.targets.values()))
    out = forward(patch.apply_lord(tiny_model, lord, 1.0, "learned", implementation, defense_strength=2.5), x, ctx)
    ref = ref_forward(reference_model(tiny_model, [(scaled, 1.0, None)]), x, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    off = forward(patch.apply_lord(tiny_model, lord, 1.0, "learned", implementation, defense_strength=0.0), x, ctx)
    gate0 = forward(patch.apply_lord(tiny_model, lord, 1.0, "clean", implementation), x, ctx)
    torch.testing.assert_close(off, gate0, rtol=1e-4, atol=1e-4)
    assert (out - off).abs().max() > 1e-3


def test_two_lord_files_stack(tiny_model):
    a, b = make_lord(tiny_model, seed=1), make_lord(tiny_model, seed=2)
    x, ctx = inputs()
    stacked = patch.apply_lord(patch.apply_lord(tiny_model, a, 1.0, "learned", "fused"), b, 0.5, "learned", "plain")
    ref = ref_forward(reference_model(tiny_model, [(a, 1.0, None), (b, 0.5, None)]), x, ctx)
    torch.testing.assert_close(forward(stacked, x, ctx), ref, rtol=1e-4, atol=1e-4)
    assert len(patch.lord_injections(stacked)) == 2


def test_input_model_untouched_bit_for_bit(tiny_model):
    x, ctx = inputs()
    before = forward(tiny_model, x, ctx)
    patches_before = dict(tiny_model.patches)
    lorded = patch.apply_lord(tiny_model, make_lord(tiny_model), 1.0, "learned", "fused")
    latent = torch.zeros(1, 4, 8, 8)
    cond = [[torch.randn(1, 77, CTX), {}]]
    comfy.sample.sample(lorded, comfy.sample.prepare_noise(latent, 0), 3, 5.0, "euler", "normal", cond, cond, latent,
                        disable_pbar=True)
    after = forward(tiny_model, x, ctx)
    assert torch.equal(before, after)
    assert tiny_model.patches == patches_before and tiny_model.injections == {}
    assert all(not m._forward_hooks for m in tiny_model.model.diffusion_model.modules())


def test_hooks_fire_once_per_forward_and_are_removed_on_eject(tiny_model):
    lord = make_lord(tiny_model)
    lorded = patch.apply_lord(tiny_model, lord, 1.0, "learned", "fused")
    names = patch.unet_names(tiny_model)
    x, ctx = inputs()
    with patch.recording_gates(lorded) as (clone, records):
        forward(clone, x, ctx)
        counts = {}
        for name, lam in records:
            counts[name] = counts.get(name, 0) + 1
        assert counts == {n: 1 for n in lord.targets}
        for n in lord.targets:
            assert len(comfy.utils.get_attr(clone.model.diffusion_model, names[n])._forward_hooks) == 1
    mm.unload_all_models()
    assert all(not m._forward_hooks for m in tiny_model.model.diffusion_model.modules())
    # inject/eject are idempotent
    inj = patch.lord_injections(lorded)[0][1]
    inj.inject(lorded)
    inj.inject(lorded)
    assert sum(len(m._forward_hooks) for m in tiny_model.model.diffusion_model.modules()) == len(lord.targets)
    inj.eject(lorded)
    inj.eject(lorded)
    assert all(not m._forward_hooks for m in tiny_model.model.diffusion_model.modules())


@pytest.mark.parametrize("unload", ["unload_all_models", "detach", "free_memory"])
def test_device_copies_are_released_when_the_model_unloads(tiny_model, unload):
    """The hooks' per-device adapter copies live outside ComfyUI's memory accounting: none may
    survive an unload (ComfyUI ejects injections on unpatch/detach/partial unload)."""
    lorded = patch.apply_lord(tiny_model, make_lord(tiny_model), 1.0, "learned", "fused")
    inj = patch.lord_injections(lorded)[0][1]
    x, ctx = inputs()
    first = forward(lorded, x, ctx)
    assert inj._on_device, "the hooks made no device copies; the test checks nothing"
    if unload == "unload_all_models":
        mm.unload_all_models()
    elif unload == "detach":
        lorded.detach()
    else:  # ComfyUI freeing memory for another model
        mm.free_memory(1e30, mm.get_torch_device())
    assert inj._on_device == {}
    assert torch.equal(forward(lorded, x, ctx), first)  # rebuilt on demand, same result
    mm.unload_all_models()
    assert inj._on_device == {}


def test_gate_records_are_per_token(tiny_model):
    lord = make_lord(tiny_model)
    x, ctx = inputs(batch=2, size=16)
    with patch.recording_gates(patch.apply_lord(tiny_model, lord, 1.0, "clean", "fused")) as (clone, records):
        forward(clone, x, ctx)
    by_name = dict(records)
    q = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert q.shape == (2, 256, 1) and q.unique().numel() > 100  # learned gate recorded, one per token
    k2 = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert k2.shape == (2, 77, 1)  # cross-attention k/v see text tokens


@pytest.mark.parametrize("route", ["partially_load", "patch_model"])
def test_lowvram_partial_load_gives_same_output(tiny_model, route):
    """ComfyUI's partial loading (weights cast and patched per layer at run time) changes nothing."""
    lord = make_lord(tiny_model)
    lora_sd = random_lora_sd(lord)
    model = comfy.sd.load_lora_for_models(patch.apply_lord(tiny_model, lord, 1.0, "learned", "fused"), None, lora_sd, 1.0, 0)[0]
    x, ctx = inputs()
    full = forward(model, x, ctx)
    mm.unload_all_models()
    if route == "partially_load":  # what LoadedModel.model_load does when VRAM is short
        model.partially_load(torch.device("cpu"), extra_memory=1)
    else:
        model.patch_model(torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert model.model.model_lowvram and model.model.lowvram_patch_counter > 0
        with torch.no_grad():
            sigma = model.model.model_sampling.sigma(torch.full((x.shape[0],), 500.0))
            low = model.model.apply_model(x, sigma, c_crossattn=ctx).float()
    finally:
        model.unpatch_model(torch.device("cpu"))
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-5)
    assert all(not m._forward_hooks for m in tiny_model.model.diffusion_model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_model(dtype):
    m32 = tiny.build_tiny_model_patcher(seed=3)
    mlow = tiny.build_tiny_model_patcher(seed=3, dtype=dtype)
    lord = make_lord(m32, random_up=0.1)
    x, ctx = inputs()
    lorded = patch.apply_lord(mlow, lord, 1.0, "learned", "fused")
    out_low, base_low = forward(lorded, x, ctx), forward(mlow, x, ctx)
    out32, base32 = forward(patch.apply_lord(m32, lord, 1.0, "learned", "fused"), x, ctx), forward(m32, x, ctx)
    assert mlow.model.get_dtype() == dtype and torch.isfinite(out_low).all()
    inj = patch.lord_injections(lorded)[0][1]
    rt = inj.runtime_on(next(iter(lord.targets)), torch.device("cpu"), dtype)  # what the hooks use on this model
    assert rt.down.dtype == rt.defense_up.dtype == dtype  # projections in the activations' dtype (no full-size copy)
    assert all(t.dtype == torch.float32 for t in (rt.gate_w1, rt.gate_b1, rt.gate_w2, rt.gate_b2))  # gate in float32
    assert inj.runtime_on(next(iter(lord.targets)), torch.device("cpu"), dtype) is rt  # copied once
    delta_low, delta32 = out_low - base_low, out32 - base32
    rel = (delta_low - delta32).norm() / delta32.norm()
    assert rel < 0.1, rel


def test_wrong_family_and_shapes_are_refused(tiny_model, tmp_path):
    lord = make_lord(tiny_model)
    lord.base_family = "sdxl"
    with pytest.raises(LoRDFileError, match="'sdxl' model, but the MODEL is 'sd1'"):
        patch.apply_lord(tiny_model, lord)
    other = tiny.build_tiny_model_patcher(seed=0, model_channels=64)
    with pytest.raises(LoRDFileError, match="base weight of shape"):
        patch.apply_lord(other, make_lord(tiny_model))
    assert tiny_model.injections == {}


def test_conv_targets(tiny_model):
    lord = make_lord(tiny_model, preset="attn+proj")
    assert any(n.endswith("proj_in") for n in lord.targets)
    assert lord.targets["lora_unet_down_blocks_0_attentions_0_proj_in"].is_conv
    x, ctx = inputs()
    plain = forward(patch.apply_lord(tiny_model, lord, 1.0, "learned", "plain"), x, ctx)
    fused = forward(patch.apply_lord(tiny_model, lord, 1.0, "learned", "fused"), x, ctx)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_families(family):
    """SD1.x (conv proj), SD2.x (linear proj) and SDXL (linear proj, ADM input) UNets."""
    mp = tiny.build_model_patcher(tiny.family_unet_config(family), seed=4, family=family)
    assert patch.model_family(mp) == family
    lord = make_lord(mp, preset="attn+proj")
    proj_in = lord.targets["lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert proj_in.is_conv == (family == "sd1")
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in lord.targets
    assert ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in lord.targets) == (family != "sdxl")
    x, ctx = inputs()
    extra = {"y": torch.randn(2, 2816)} if family == "sdxl" else {}

    def run(m):
        mm.load_models_gpu([m])
        with torch.no_grad():
            return m.model.apply_model(x, m.model.model_sampling.sigma(torch.full((2,), 400.0)), c_crossattn=ctx, **extra)

    base = run(mp)
    plain = run(patch.apply_lord(mp, lord, 1.0, "learned", "plain"))
    fused = run(patch.apply_lord(mp, lord, 1.0, "learned", "fused"))
    assert (plain - base).abs().max() > 1e-2
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    other = "sdxl" if family != "sdxl" else "sd1"
    with pytest.raises(LoRDFileError, match=f"made for a '{family}' model"):
        patch.apply_lord(tiny.build_model_patcher(tiny.family_unet_config(other), family=other), lord)


def _write_with_header(path, sd, mutate):
    """Save ``sd``, then rewrite its safetensors header with ``mutate(header)`` (damage a container)."""
    import safetensors.torch

    safetensors.torch.save_file(sd, str(path))
    rewrite_header(path, mutate)


def test_load_lord_checks_its_lora_like_a_lord_file(tiny_model, tmp_path):
    """Load LoRD's lora_name input: damaged LoRA files fail naming the file and the key (they used
    to run to success with NaN output or a silently skipped layer, or to fail with a bare
    KeyError/SafetensorError), and a stock-valid LoRA with text-encoder layers still loads and
    matches ComfyUI's own LoRA loader exactly."""
    import folder_paths
    import safetensors.torch

    from lord_ops import format as fmt
    from comfyui_lord.nodes.loaders import LoRDLoader

    lord = make_lord(tiny_model)
    (tmp_path / "lord").mkdir()
    (tmp_path / "loras").mkdir()
    fmt.save_lord_file(tmp_path / "lord" / "l.safetensors", lord)
    folder_paths.add_model_folder_path("lord", str(tmp_path / "lord"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"), is_default=True)
    good = random_lora_sd(lord)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    good.update({f"{te}.lora_down.weight": torch.randn(4, 768) * 0.1, f"{te}.lora_up.weight": torch.randn(768, 4) * 0.1,
                 f"{te}.alpha": torch.tensor(4.0)})
    layer = sorted(k for k in good if k.startswith("lora_unet") and k.endswith(".lora_down.weight"))[0][: -len(".lora_down.weight")]
    loras = tmp_path / "loras"
    safetensors.torch.save_file(good, str(loras / "good.safetensors"))

    def variant(name, change):
        sd = {k: v.clone() for k, v in good.items()}
        change(sd)
        safetensors.torch.save_file(sd, str(loras / name))

    variant("nan.safetensors", lambda sd: sd[f"{layer}.lora_up.weight"].__setitem__((0, 0), float("nan")))
    variant("shape.safetensors", lambda sd: sd.__setitem__(f"{layer}.lora_down.weight", sd[f"{layer}.lora_down.weight"][:, :-8].contiguous()))
    variant("half.safetensors", lambda sd: sd.pop(f"{layer}.lora_up.weight"))
    _write_with_header(loras / "overlap.safetensors", good, lambda h: h[f"{te}.lora_up.weight"].__setitem__(
        "data_offsets", h[f"{te}.lora_down.weight"]["data_offsets"]))
    data = (loras / "good.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (loras / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"<html>garbage</html>" * 4)
    expected = {
        "nan.safetensors": ("NaN or Inf", f"{layer}.lora_up.weight"),
        "shape.safetensors": ("the MODEL's layer has", f"{layer}.lora_up.weight"),
        "half.safetensors": ("no partner", f"{layer}.lora_down.weight"),
        "overlap.safetensors": ("overlaps", f"{te}.lora_"),
        "truncated.safetensors": ("truncated",),
        "garbage.safetensors": ("not a valid safetensors",),
    }

    def load(lora_name):
        return LoRDLoader.execute(tiny_model, "l.safetensors", 1.0, "learned", "fused", lora_name, 1.0).result[0]

    for name, fragments in expected.items():
        with pytest.raises(LoRDFileError) as info:
            load(name)
        msg = str(info.value)
        assert msg.startswith(f"LoRA file '{loras / name}'"), msg
        assert all(f in msg for f in fragments), msg

    x, ctx = inputs()
    out = forward(load("good.safetensors"), x, ctx)
    stock, _ = comfy.sd.load_lora_for_models(patch.apply_lord(tiny_model, lord), None, good, 1.0, 0)
    assert torch.equal(out, forward(stock, x, ctx))
    assert not torch.allclose(out, forward(load("None"), x, ctx))


def test_fused_sampling_hooks_allocate_nothing(tiny_model):
    """Issue 13: once warm, a fused learned-gate LoRD step allocates exactly what the base step does
    (the defense branch is added into each layer's output in place, intermediates live in a workspace)."""
    from torch.profiler import ProfilerActivity, profile

    lord = make_lord(tiny_model)
    lorded = patch.apply_lord(tiny_model, lord, 0.8, "learned", "fused")
    x, ctx = inputs()

    def allocated(mp) -> int:
        mm.load_models_gpu([mp])
        sigma = mp.model.model_sampling.sigma(torch.full((x.shape[0],), 500.0))
        with torch.inference_mode():
            mp.model.apply_model(x, sigma, c_crossattn=ctx)  # warm: workspace and device copies
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                mp.model.apply_model(x, sigma, c_crossattn=ctx)
        return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)

    base, fused = allocated(tiny_model), allocated(lorded)
    assert base > 0 and fused == base, (base, fused)


def test_text_context_cache_follows_the_context(tiny_model):
    """Cross-attention k/v defense outputs are cached per context (issue 13): within one load (one
    sampling call), a new context, a context seen before, a copy of it and one edited in place all
    give the plain form's output, and the cache stays bounded."""
    lord = make_lord(tiny_model)
    fused = patch.apply_lord(tiny_model, lord, 0.9, "learned", "fused")
    plain = patch.apply_lord(tiny_model, lord, 0.9, "learned", "plain")
    x, ctx_a = inputs(seed=0)
    ctxs = [ctx_a, inputs(seed=1)[1], ctx_a.clone(), ctx_a, ctx_a * 0.5] + [inputs(seed=s)[1] for s in (2, 3, 4)]
    expected = [forward(plain, x, c) for c in ctxs]
    mm.load_models_gpu([fused])
    inj = patch.lord_injections(fused)[0][1]
    sigma = fused.model.model_sampling.sigma(torch.full((x.shape[0],), 500.0))
    with torch.inference_mode():
        for i, (c, want) in enumerate(zip(ctxs, expected)):
            if i == 4:
                c, want = ctx_a.mul_(0.5), expected[4]  # the same object, edited in place
            torch.testing.assert_close(fused.model.apply_model(x, sigma, c_crossattn=c).float(), want, rtol=1e-4, atol=1e-4)
            if i == 3:
                assert len(inj._contexts._entries) == 2  # a, b: the copy and the repeat hit a's entry
    assert len(inj._contexts._entries) == inj._contexts.capacity


def test_self_attention_qkv_share_one_gated_projection(tiny_model):
    """attn1 to_q / to_k / to_v read the same x: sampling computes their gated codes together (one
    projection, one block-diagonal gate); the output equals the per-target computation and the plain form."""
    lord = make_lord(tiny_model)
    x, ctx = inputs()
    plain = forward(patch.apply_lord(tiny_model, lord, 0.7, "learned", "plain"), x, ctx)
    grouped_model = patch.apply_lord(tiny_model, lord, 0.7, "learned", "fused")
    inj = patch.lord_injections(grouped_model)[0][1]
    attn1 = [n for n in lord.targets if patch.SAME_INPUT.match(n)]
    assert attn1 and set(inj._groups) == set(attn1)
    grouped = forward(grouped_model, x, ctx)
    assert len(inj._group_state) == len(attn1) // 3  # every group ran
    single_model = patch.apply_lord(tiny_model, lord, 0.7, "learned", "fused")
    patch.lord_injections(single_model)[0][1]._groups.clear()
    single = forward(single_model, x, ctx)
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, plain, rtol=1e-4, atol=1e-4)
