"""LoRD layer math (lord_ops.layer, lord_ops.fused) against straightforward per-feature computations."""
import pytest
import torch
import torch.nn.functional as F

from lord_ops.fused import FusedLoRD, Workspace, add_fused_defense, gate_rows_to_layout, lord_defense_fused
from lord_ops.layer import ConvGeometry, LoRDWeights, init_lord_weights, lord_delta_plain


def random_weights(d_in=12, d_out=10, rank=3, hidden=5, kernel=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = init_lord_weights(d_in, d_out, rank, alpha=2.0, gate_hidden=hidden, kernel_size=kernel, generator=g,
                          random_up=0.3)
    w.gate_b2 = torch.randn(1, generator=g)
    return w


def reference_token(x_vec, w: LoRDWeights):
    """One token, written out: v = sBAx, lam = sigmoid(W2 silu(W1 v + b1) + b2), delta = v + lam sB'Ax."""
    s = w.alpha / w.down.shape[0]
    u = w.down @ x_vec
    v = s * (w.up @ u)
    hidden = w.gate_w1 @ v + w.gate_b1
    hidden = hidden * torch.sigmoid(hidden)
    lam = torch.sigmoid(w.gate_w2 @ hidden + w.gate_b2)
    return v + lam * s * (w.up_defense @ u), lam


def test_plain_matches_per_token_reference():
    w = random_weights()
    x = torch.randn(2, 7, 12)
    delta, lam = lord_delta_plain(x, w)
    assert delta.shape == (2, 7, 10) and lam.shape == (2, 7, 1)
    for b in range(2):
        for t in range(7):
            ref_delta, ref_lam = reference_token(x[b, t], w)
            torch.testing.assert_close(delta[b, t], ref_delta, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lam[b, t], ref_lam, rtol=1e-5, atol=1e-6)


def test_gate_is_per_token():
    w = random_weights()
    x = torch.randn(1, 6, 12)
    _, lam = lord_delta_plain(x, w)
    assert lam.unique().numel() == 6  # one different value per token


@pytest.mark.parametrize("gate_mode", ["learned", "clean", "defense"])
def test_fused_equals_plain_with_merged_clean_branch(gate_mode):
    w = random_weights()
    x = torch.randn(3, 5, 12)
    plain, lam_plain = lord_delta_plain(x, w, gate_mode=gate_mode)
    extra, lam_fused = lord_defense_fused(x, FusedLoRD.from_weights(w), gate_mode=gate_mode)
    merged = F.linear(x, w.clean_delta_weight())
    torch.testing.assert_close(merged + extra, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lam_fused, lam_plain, rtol=1e-5, atol=1e-6)


def test_forced_gate_modes():
    w = random_weights()
    x = torch.randn(2, 4, 12)
    s = w.scale
    clean, lam0 = lord_delta_plain(x, w, gate_mode="clean")
    defense, lam1 = lord_delta_plain(x, w, gate_mode="defense")
    assert torch.all(lam0 == 0) and torch.all(lam1 == 1)
    torch.testing.assert_close(clean, s * x @ (w.up @ w.down).T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(defense, s * x @ ((w.up + w.up_defense) @ w.down).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gate_mode"):
        lord_delta_plain(x, w, gate_mode="sometimes")


def test_conv_target_per_pixel_gate():
    w = random_weights(d_in=6, d_out=8, kernel=(3, 3))
    geo = ConvGeometry(stride=(1, 1), padding=(1, 1))
    x = torch.randn(2, 6, 5, 4)
    delta, lam = lord_delta_plain(x, w, geometry=geo)
    assert delta.shape == (2, 8, 5, 4) and lam.shape == (2, 1, 5, 4)
    # straightforward: per output pixel, u = A * patch, then the per-token formula
    patches = F.unfold(x, 3, padding=1)  # [B, 6*9, H*W]
    a_mat = w.down.reshape(w.down.shape[0], -1)
    w2d = LoRDWeights(a_mat, w.up[:, :, 0, 0], w.up_defense[:, :, 0, 0], w.gate_w1, w.gate_b1, w.gate_w2,
                      w.gate_b2, w.alpha)
    for b in range(2):
        for p in range(20):
            ref, ref_lam = reference_token(patches[b, :, p], w2d)
            torch.testing.assert_close(delta[b, :, p // 4, p % 4], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lam[b, 0, p // 4, p % 4], ref_lam[0], rtol=1e-5, atol=1e-6)
    fused_extra, _ = lord_defense_fused(x, FusedLoRD.from_weights(w), geometry=geo)
    merged = F.conv2d(x, w.clean_delta_weight(), padding=1)
    torch.testing.assert_close(merged + fused_extra, delta, rtol=1e-5, atol=1e-5)


def test_low_precision_input_computes_in_float32():
    w = random_weights()
    x = torch.randn(2, 3, 12)
    ref, _ = lord_delta_plain(x.bfloat16().float(), w)
    out, lam = lord_delta_plain(x.bfloat16(), w)
    assert out.dtype == torch.float32 and lam.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_default_init():
    w = init_lord_weights(64, 32, rank=4)
    assert w.alpha == 4.0 and w.scale == 1.0
    assert torch.all(w.up == 0) and torch.all(w.up_defense == 0) and torch.all(w.gate_b2 == 0)
    assert 0.15 < w.down.std().item() < 0.35  # N(0, (1/r)^2) with r = 4
    delta, lam = lord_delta_plain(torch.randn(2, 3, 64), w)
    assert torch.all(delta == 0) and torch.allclose(lam, torch.full_like(lam, 0.5))


def test_gradients_reach_every_parameter():
    w = random_weights()
    params = {k: v.clone().requires_grad_(True) for k, v in w.tensors().items()}
    wp = LoRDWeights(**params, alpha=w.alpha)
    delta, lam = lord_delta_plain(torch.randn(2, 4, 12), wp)
    (delta.square().mean() + lam.mean()).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _allocated_bytes(fn) -> int:
    """CPU bytes allocated by the aten ops ``fn`` runs (torch profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("kernel", [None, (3, 3)])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_in_place_fused_defense_equals_out_of_place_and_plain(kernel, strength):
    """add_fused_defense (in place, workspace; and with gradients on, out of place) == merged weight +
    lord_defense_fused == strength * plain; strength is folded into B' once."""
    w = random_weights(d_in=6, d_out=8, kernel=kernel) if kernel else random_weights()
    geo = ConvGeometry(padding=(1, 1)) if kernel else None
    x = torch.randn(2, 6, 5, 4) if kernel else torch.randn(2, 7, 12)
    f = FusedLoRD.from_weights(w, strength)
    merged = (F.conv2d(x, w.clean_delta_weight(), padding=1) if kernel else F.linear(x, w.clean_delta_weight()))
    plain, lam_plain = lord_delta_plain(x, w, geometry=geo)
    extra, lam_ref = lord_defense_fused(x, f, geometry=geo)
    torch.testing.assert_close(strength * merged + extra, strength * plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lam_ref, lam_plain, rtol=1e-5, atol=1e-6)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the workspace
        out = merged.clone()
        with torch.inference_mode():
            got, lam = add_fused_defense(out, x, f, geometry=geo, workspace=ws)
        assert got is out  # written in place
        torch.testing.assert_close(got, merged + extra, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gate_rows_to_layout(lam, got, f.is_conv), lam_plain, rtol=1e-5, atol=1e-6)
    base = merged.clone().requires_grad_(True)
    got, _ = add_fused_defense(base, x, f, geometry=geo, workspace=ws)  # gradients on: out of place
    assert got is not base
    torch.testing.assert_close(got, merged + extra, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    torch.testing.assert_close(base.grad, 2 * got.detach())


def test_in_place_fused_defense_allocates_nothing_once_warm():
    w = random_weights(d_in=64, d_out=80, rank=4, hidden=32)
    f, ws = FusedLoRD.from_weights(w, 0.7), Workspace()
    x, out = torch.randn(2, 100, 64), torch.randn(2, 100, 80)
    with torch.inference_mode():
        add_fused_defense(out, x, f, workspace=ws)
        assert _allocated_bytes(lambda: add_fused_defense(out, x, f, workspace=ws)) == 0
        assert _allocated_bytes(lambda: lord_defense_fused(x, f)) > 0  # the gauge does see allocations


@pytest.mark.parametrize("kernel", [None, (3, 3)])
@pytest.mark.parametrize("gate_mode", ["learned", "clean", "defense"])
def test_lowrank_training_form_equals_plain_in_value_and_gradients(kernel, gate_mode):
    """lord_add_lowrank (Stage 1: gate on (s W1 B) u, one addmm of [u, lambda u]) == output + plain
    delta, with the same gradients for every LoRD parameter, the input and the layer output."""
    from lord_ops.layer import lord_add_lowrank

    w = random_weights(d_in=6, d_out=8, kernel=kernel) if kernel else random_weights()
    geo = ConvGeometry(padding=(1, 1)) if kernel else None
    x0 = torch.randn(2, 6, 5, 4) if kernel else torch.randn(2, 7, 12)
    out0 = torch.randn(2, 8, 5, 4) if kernel else torch.randn(2, 7, 10)
    results = []
    for form in ("plain", "lowrank"):
        params = {k: v.clone().requires_grad_(True) for k, v in w.tensors().items()}
        wp = LoRDWeights(**params, alpha=w.alpha)
        x, out = x0.clone().requires_grad_(True), out0.clone().requires_grad_(True)
        if form == "plain":
            delta, _, logit = lord_delta_plain(x, wp, gate_mode=gate_mode, geometry=geo, return_logit=True)
            new = out + delta
        else:
            new, logit = lord_add_lowrank(out, x, wp, gate_mode=gate_mode, geometry=geo)
        loss = new.square().mean() + (0 if logit is None else torch.sigmoid(logit).sum())
        loss.backward()
        results.append((new.detach(), logit, {k: p.grad for k, p in params.items()}, x.grad, out.grad))
    (n1, l1, g1, x1, o1), (n2, l2, g2, x2, o2) = results
    torch.testing.assert_close(n2, n1, rtol=1e-5, atol=1e-5)
    assert (l1 is None) == (l2 is None)
    if l1 is not None:
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    zero = lambda g, k: torch.zeros_like(w.tensors()[k]) if g is None else g  # noqa: E731  (no path = zero gradient)
    for k in g1:
        torch.testing.assert_close(zero(g2[k], k), zero(g1[k], k), rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(o2, o1)


def test_lora_add_equals_lora_delta():
    from lord_ops.layer import init_lora, lora_add, lora_delta

    for kernel, x, geo in ((None, torch.randn(2, 5, 12), None), ((3, 3), torch.randn(2, 12, 6, 6), ConvGeometry(padding=(1, 1)))):
        down, _ = init_lora(12, 9, 3, kernel)
        up = torch.randn((9, 3, 1, 1) if kernel else (9, 3))
        out = torch.randn(2, 9, 6, 6) if kernel else torch.randn(2, 5, 9)
        torch.testing.assert_close(lora_add(out, x, down, up, 0.7, geo), out + lora_delta(x, down, up, 0.7, geo),
                                   rtol=1e-5, atol=1e-5)
