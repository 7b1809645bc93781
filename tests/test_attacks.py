"""The attack engine (lord_ops.attacks) on small stand-in networks: units, directions, determinism."""
import pytest
import torch

from comfyui_lord.lord_ops import attacks
from comfyui_lord.lord_ops.attacks import AttackConfig


class StandIns(torch.nn.Module):
    """A stride-8 conv encoder and a tiny time-conditioned noise predictor (random, fixed)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, 2, 1),
                                       torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, 2, 1))
        self.net = torch.nn.Sequential(torch.nn.Conv2d(5, 16, 3, 1, 1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, 1, 1))
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        self.requires_grad_(False)

    def encode(self, x):
        return 0.18215 * self.enc(x * 2 - 1)

    def predict_noise(self, z_t, t):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *z_t.shape[-2:])
        return self.net(torch.cat([z_t, tt], dim=1))


@pytest.fixture(scope="module")
def nets():
    return StandIns()


def images(batch=2, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(batch, 3, h, w, generator=g) * 255) / 255


def run(nets, x, cfg, target=None):
    return attacks.run_attack(x, cfg, nets.encode, nets.predict_noise, nets.alphas_cumprod, target)


def target_latent(nets, x):
    return nets.encode(attacks.resize_target(attacks.high_contrast_target(64, 64), *x.shape[-2:])).expand(x.shape[0], -1, -1, -1)


def test_unit_conversions_and_presets():
    assert attacks.published_to_levels(0.05) == pytest.approx(6.375)
    assert attacks.published_to_levels(8 / 255) == pytest.approx(4.0)
    assert attacks.levels_to_unit(255) == 1.0
    assert attacks.PRESETS["pgd_2"].steps == 2 and attacks.PRESETS["mist_v2_ace"].epsilon == pytest.approx(4.0)
    with pytest.raises(ValueError, match="pixel levels"):
        AttackConfig(epsilon=0).validate()
    with pytest.raises(ValueError, match="method"):
        AttackConfig(method="fgsm").validate()


@pytest.mark.parametrize("method", attacks.METHODS)
def test_budget_after_uint8_quantisation(nets, method):
    x = images(h=27, w=33)  # odd size, not a multiple of 8
    cfg = AttackConfig(method, epsilon=6.375, step_size=2.0, steps=5, random_start=True)
    res = run(nets, x, cfg, target_latent(nets, x))
    assert res.images.shape == x.shape and len(res.loss_trace) == 5
    assert float((res.images - x).abs().max()) <= 6.375 / 255 + 1e-6
    q = attacks.quantize_uint8(res.images, x, cfg.epsilon)
    diff = (q.int() - torch.round(x * 255).int()).abs()
    assert q.dtype == torch.uint8 and int(diff.max()) <= 6 and int(diff.max()) > 0


def test_same_seed_same_output(nets):
    x = images()
    cfg = AttackConfig("pgd", steps=3, seed=7, random_start=True)
    a, b = run(nets, x, cfg), run(nets, x, cfg)
    assert torch.equal(a.images, b.images) and a.loss_trace == b.loss_trace
    c = run(nets, x, AttackConfig("pgd", steps=3, seed=8, random_start=True))
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("method", attacks.METHODS)
def test_objective_moves_its_way_and_beats_random_noise(nets, method):
    x = images(batch=2)
    tgt = target_latent(nets, x)
    cfg = AttackConfig(method, epsilon=8.0, step_size=1.0, steps=20, seed=1)
    res = run(nets, x, cfg, tgt)
    before = attacks.evaluate_objective(x, cfg, nets.encode, nets.predict_noise, nets.alphas_cumprod, tgt)
    after = attacks.evaluate_objective(res.images, cfg, nets.encode, nets.predict_noise, nets.alphas_cumprod, tgt)
    g = torch.Generator().manual_seed(3)
    noise = x + (torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1) * 8.0 / 255  # same L-inf size
    rand = attacks.evaluate_objective(noise.clamp(0, 1), cfg, nets.encode, nets.predict_noise, nets.alphas_cumprod, tgt)
    if method == "pgd":  # maximise
        assert after > before and after > rand
    else:  # minimise
        assert after < before and after < rand


def test_gradient_reaches_pixels(nets):
    x = images(batch=1).requires_grad_(True)
    z = nets.encode(x)
    t = torch.tensor([500])
    noise = torch.randn_like(z)
    loss = attacks.objective("pgd", z, nets.predict_noise, nets.alphas_cumprod, t, noise, None).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0 and (grad != 0).float().mean() > 0.5


def test_low_memory_path_matches(nets):
    x = images(batch=2)
    tgt = target_latent(nets, x)
    for method in ("pgd", "ace_plus"):
        cfg = AttackConfig(method, steps=3, seed=2)
        normal = run(nets, x, cfg, tgt)
        low = run(nets, x, AttackConfig(method, steps=3, seed=2, low_memory=True), tgt)
        torch.testing.assert_close(low.images, normal.images)


def test_on_step_can_cancel(nets):
    class Stop(Exception):
        pass

    seen = []

    def on_step(i, loss, cur):
        seen.append(i)
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        attacks.run_attack(images(), AttackConfig("photoguard", steps=10), nets.encode, on_step=on_step)
    assert seen == [0, 1]


def test_timestep_range_checked_against_schedule(nets):
    with pytest.raises(ValueError, match="last timestep 999"):
        run(nets, images(), AttackConfig("pgd", steps=1, t_min=1200, t_max=1300))


def test_ace_needs_target(nets):
    with pytest.raises(ValueError, match="target"):
        run(nets, images(), AttackConfig("ace", steps=1))


def test_default_target_pattern():
    t = attacks.high_contrast_target(48, 64)
    assert t.shape == (1, 3, 48, 64) and set(t.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(t.mean()) < 0.7
