"""The attack engine (lord_ops.attacks) on small stand-in networks: units, directions, determinism."""
import pytest
import torch

from lord_ops import attacks
from lord_ops.attacks import AttackConfig


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
    assert attacks.PRESETS["pgd_2"].steps == 2 and attacks.PRESETS["ace_fixed"].epsilon == pytest.approx(4.0)
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


def test_default_target_is_representable_on_the_latent_grid():
    """At 32 px (the lab model) the squares and the stripe are at least one latent cell (8 px) wide:
    averaged over 8x8 cells (what one latent cell of an SD VAE sees) the pattern keeps its contrast;
    the old pattern (8 squares of 4 px) averaged to a nearly flat grey."""
    import torch.nn.functional as F

    def pooled(t):
        return F.avg_pool2d(t[:, :1], 8)

    assert float(pooled(attacks.high_contrast_target(32, 32)).std()) > 0.35  # measured 0.39
    assert float(pooled(attacks.high_contrast_target(32, 32, min_cell=1)).std()) < 0.2  # the old pattern: 0.17
    assert attacks.latent_contrast(pooled(attacks.high_contrast_target(32, 32))) > 0.35
    assert attacks.latent_contrast(torch.ones(1, 4, 4, 4)) == 0.0
    assert torch.equal(attacks.high_contrast_target(64, 64), attacks.high_contrast_target(64, 64, min_cell=1))


def test_image_seeds_are_distinct_and_stable():
    seeds = {attacks.image_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= x < 2 ** 62 for x in seeds)  # no seed s+1/image 0 = seed s/image 1
    assert attacks.image_seed(3, 5) == attacks.image_seed(3, 5)


# ---------------------------------------------------------------------------------------------
# Presets against their sources (the README's "Attack presets" table; file:line of each number)

# psyker-team/mist-v2 attacks/mist.py (argparse defaults)
MIST_V2 = {"epsilon_published": 8.0 / 255.0,  # L81 --pgd_eps
           "step_published": 0.005,  # L80 --pgd_alpha
           "rounds": 5,  # L70 --max_train_steps (epochs)
           "pgd_steps": 30,  # L72 --max_adv_train_steps
           "train_steps": 10,  # L71 --max_f_train_steps
           "lr": 1e-4, "rank": 4,  # L85 --learning_rate, L84 --lora_rank
           "weight_decay": 0.01, "betas": (0.9, 0.999), "adam_eps": 1e-8,  # L91-94
           "max_grad_norm": 1.0,  # L464/L518 clip_grad_norm_(..., 1.0)
           "method": "ace"}  # L89 --mode lunet: loss = -mse(model_pred, target latent) (L612), ascended (L631)
# VinAIResearch/Anti-DreamBooth scripts/attack_with_aspl.sh (the published ASPL run of attacks/aspl.py)
ASPL = {"epsilon_published": 5e-2, "step_published": 5e-3,  # L36 --pgd_eps, L35 --pgd_alpha
        "rounds": 50, "clean_steps": 3, "pgd_steps": 6, "train_steps": 3}  # L30-32
# scripts/attack_with_fsmg.sh: reference DreamBooth 1000 steps on clean images (L28), then fsmg.py
FSMG = {"epsilon_published": 5e-2, "step_published": 5e-3, "clean_steps": 1000, "pgd_steps": 100}  # L56, L55, L28, L52


def test_surrogate_presets_match_their_sources():
    mist = attacks.SURROGATE_PRESETS["mist_v2"]
    assert mist.attack.method == MIST_V2["method"]
    assert mist.attack.epsilon == pytest.approx(attacks.published_to_levels(MIST_V2["epsilon_published"]))
    assert mist.attack.epsilon == pytest.approx(4.0) and mist.attack.step_size == pytest.approx(0.6375)
    assert mist.attack.step_size == pytest.approx(attacks.published_to_levels(MIST_V2["step_published"]))
    assert (mist.attack.steps, mist.attack.t_min, mist.attack.t_max) == (MIST_V2["pgd_steps"], 0, 999)
    s = mist.surrogate
    assert (s.rounds, s.clean_steps, s.train_steps) == (MIST_V2["rounds"], 0, MIST_V2["train_steps"])
    assert (s.learning_rate, s.rank, s.alpha) == (MIST_V2["lr"], MIST_V2["rank"], None)  # alpha = rank: scale 1
    assert (s.weight_decay, tuple(s.betas), s.adam_eps, s.max_grad_norm) == (
        MIST_V2["weight_decay"], MIST_V2["betas"], MIST_V2["adam_eps"], MIST_V2["max_grad_norm"])
    assert s.targets == "attn+ff"  # lora_diffusion: every Linear under CrossAttention/Attention/GEGLU
    assert mist.attack.random_start is False
    aspl = attacks.SURROGATE_PRESETS["anti_dreambooth_aspl"]
    assert aspl.attack.method == "pgd" and not attacks._MINIMISE["pgd"]
    assert aspl.attack.epsilon == pytest.approx(attacks.published_to_levels(ASPL["epsilon_published"]))
    assert aspl.attack.step_size == pytest.approx(attacks.published_to_levels(ASPL["step_published"]))
    assert (aspl.surrogate.rounds, aspl.surrogate.clean_steps, aspl.attack.steps, aspl.surrogate.train_steps) == (
        ASPL["rounds"], ASPL["clean_steps"], ASPL["pgd_steps"], ASPL["train_steps"])
    fsmg = attacks.SURROGATE_PRESETS["anti_dreambooth_fsmg"]
    assert fsmg.attack.epsilon == pytest.approx(attacks.published_to_levels(FSMG["epsilon_published"]))
    assert fsmg.attack.step_size == pytest.approx(attacks.published_to_levels(FSMG["step_published"]))
    assert (fsmg.surrogate.rounds, fsmg.surrogate.clean_steps, fsmg.surrogate.train_steps, fsmg.attack.steps) == (
        1, FSMG["clean_steps"], 0, FSMG["pgd_steps"])
    # fixed-model variants keep their own names; Stage-1 relies on pgd_2
    assert attacks.PRESETS["ace_fixed"].method == "ace" and attacks.PRESETS["ace_fixed"].steps == 150
    assert attacks.PRESETS["ace_plus_fixed"].method == "ace_plus"
    assert attacks.PRESETS["pgd_2"].steps == 2 and attacks.PRESETS["pgd_2"].epsilon == pytest.approx(6.375)
    assert not set(attacks.PRESETS) & set(attacks.SURROGATE_PRESETS)
    assert {"mist_v2_ace", "mist_v2_ace_plus", "anti_dreambooth"}.isdisjoint(attacks.ALL_PRESETS)
    for name in attacks.ALL_PRESETS:
        p = attacks.preset(name)
        p.attack.validate()
        assert p.surrogate is None or p.surrogate.validate()
    with pytest.raises(ValueError, match="unknown attack preset"):
        attacks.preset("mist_v2_ace")


def test_sub_level_budget_refused():
    for eps in (0.0, 0.5, 0.99):
        with pytest.raises(ValueError, match="below one pixel level"):
            attacks.check_8bit_budget(eps)
    attacks.check_8bit_budget(1.0)
    # internal (float) uses may still go below a level
    AttackConfig(epsilon=0.5).validate()


def test_start_point_is_projected_into_the_budget(nets):
    x = images(batch=1)
    far = (x + 0.5).clamp(0, 1)
    res = attacks.run_attack(x, AttackConfig("photoguard", epsilon=4.0, step_size=1.0, steps=1), nets.encode,
                             start=far)
    assert float((res.images - x).abs().max()) <= 4.0 / 255 + 1e-6


def test_alternating_loop_order():
    """mist-v2: PGD, then train on the perturbed images; ASPL: train a copy on the clean images, PGD
    against it, put the weights back, train on the perturbed images. The last round's training is skipped."""
    events = []

    def pgd_round(cur, r):
        events.append(("pgd", r))
        return cur + 1, [[0.0]]

    def train(images, steps, r, phase):
        events.append((phase, r, steps, float(images.flatten()[0])))
        return [0.0] * steps

    x = torch.zeros(1, 3, 8, 8)
    mist = attacks.AlternatingConfig(rounds=3, clean_steps=0, train_steps=10)
    res = attacks.run_alternating_attack(x, mist, pgd_round, train, lambda: events.append("snap"),
                                         lambda s: events.append("restore"))
    assert events == [("pgd", 0), ("perturbed", 0, 10, 1.0), ("pgd", 1), ("perturbed", 1, 10, 2.0), ("pgd", 2)]
    assert float(res.images.flatten()[0]) == 3.0 and len(res.rounds) == 3
    events.clear()
    aspl = attacks.AlternatingConfig(rounds=2, clean_steps=3, train_steps=3)
    attacks.run_alternating_attack(x, aspl, pgd_round, train, lambda: events.append("snap") or "state",
                                   lambda s: events.append(("restore", s)))
    assert events == ["snap", ("clean", 0, 3, 0.0), ("pgd", 0), ("restore", "state"), ("perturbed", 0, 3, 1.0),
                      "snap", ("clean", 1, 3, 0.0), ("pgd", 1), ("restore", "state")]


class LoRAStandIn(torch.nn.Module):
    """A LoRA-like additive term on the stand-in predictor (B = 0: a no-op until trained)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.down = torch.nn.Parameter(torch.randn(2, 4, generator=g) / 2)
        self.up = torch.nn.Parameter(torch.zeros(4, 2))

    def forward(self, z):
        return torch.einsum("or,rc,bchw->bohw", self.up, self.down, z)


def test_surrogate_weights_change_between_rounds_and_pgd_sees_them(nets):
    lora = LoRAStandIn()
    predict = lambda z, t: nets.predict_noise(z, t) + lora(z)  # noqa: E731
    cfg = attacks.AlternatingConfig(rounds=3, train_steps=4, learning_rate=1e-2)
    attack = AttackConfig("ace", epsilon=8.0, step_size=1.0, steps=2, seed=3)
    x = images(batch=2)
    tgt = target_latent(nets, x)
    seen, losses = [], []

    def pgd_round(cur, r):
        seen.append(lora.up.detach().clone())
        res = attacks.run_attack(x, AttackConfig(**{**attack.__dict__, "seed": 100 + r}), nets.encode, predict,
                                 nets.alphas_cumprod, tgt, start=cur)
        losses.append(res.loss_trace)
        return res.images, [res.loss_trace]

    def train(imgs, steps, r, phase):
        z = nets.encode(imgs).detach()
        return attacks.train_surrogate_steps(list(lora.parameters()), lambda i, t, n: attacks.denoising_loss(
            predict, z[i:i + 1], t, n, nets.alphas_cumprod).mean(), z.shape[0], steps, cfg, r, 0, 999,
            tuple(z.shape[1:]))

    out = attacks.run_alternating_attack(x, cfg, pgd_round, train, lambda: None, lambda s: None).images
    assert float(seen[0].abs().max()) == 0 and not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert float((out - x).abs().max()) <= 8 / 255 + 1e-6
    # the PGD round sees the surrogate: the same round with the weights reset computes another loss
    trained = lora.up.detach().clone()
    with torch.no_grad():
        lora.up.copy_(seen[1])
    again = attacks.run_attack(x, AttackConfig(**{**attack.__dict__, "seed": 102}), nets.encode, predict,
                               nets.alphas_cumprod, tgt, start=out).loss_trace
    with torch.no_grad():
        lora.up.copy_(trained)
    same = attacks.run_attack(x, AttackConfig(**{**attack.__dict__, "seed": 102}), nets.encode, predict,
                              nets.alphas_cumprod, tgt, start=out).loss_trace
    assert again != same


def test_surrogate_steps_deterministic_and_clipped(nets):
    def run(seed, clip):
        lora = LoRAStandIn()
        cfg = attacks.AlternatingConfig(learning_rate=1e-2, max_grad_norm=clip)
        z = nets.encode(images(batch=2)).detach()
        norms = []
        params = list(lora.parameters())

        def loss_of(i, t, n):
            loss = attacks.denoising_loss(lambda zz, tt: nets.predict_noise(zz, tt) + 50 * lora(zz), z[i:i + 1], t, n,
                                          nets.alphas_cumprod).mean()
            return loss

        def on_step(s, loss):
            norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))

        losses = attacks.train_surrogate_steps(params, loss_of, 2, 5, cfg, seed, 0, 999, tuple(z.shape[1:]), on_step)
        return losses, lora.up.detach().clone(), norms

    a, b, c = run(1, 1.0), run(1, 1.0), run(2, 1.0)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[0] != c[0]
    assert float(a[1].abs().max()) > 0  # B moved
    assert max(a[2]) <= 1.0 + 1e-5  # clipped global norm (grads as left by clip_grad_norm_)
    assert max(run(1, 0.0)[2]) > 1.0  # and the unclipped norm is larger: the clip did something


def test_surrogate_steps_with_grad_scaler_match(nets):
    """The fp16 path (loss scaling, unscale before clipping) gives the same update as plain fp32 steps."""
    def run(scaler):
        lora = LoRAStandIn()
        z = nets.encode(images(batch=2)).detach()
        loss_of = lambda i, t, n: attacks.denoising_loss(  # noqa: E731
            lambda zz, tt: nets.predict_noise(zz, tt) + 50 * lora(zz), z[i:i + 1], t, n, nets.alphas_cumprod).mean()
        attacks.train_surrogate_steps(list(lora.parameters()), loss_of, 2, 3, attacks.AlternatingConfig(learning_rate=1e-2),
                                      4, 0, 999, tuple(z.shape[1:]), scaler=scaler)
        return lora.up.detach()

    torch.testing.assert_close(run(torch.amp.GradScaler("cpu", init_scale=1024.0)), run(None), rtol=1e-4, atol=1e-6)


def test_readme_preset_table_matches_the_presets():
    """The README's "Attack presets" table states each preset's numbers; they must be the code's."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\w ()]+?) \| ([\d.]+) \| ([\d.]+) \| ([^|]+?) \| ([^|]+?) \|$", text, re.M)
    table = {name: rest for name, *rest in rows}
    assert set(table) == set(attacks.ALL_PRESETS), sorted(table)
    for name, (method, budget, step, pgd, schedule) in table.items():
        p = attacks.preset(name)
        assert method.split()[0] == p.attack.method, name
        assert float(budget) == pytest.approx(p.attack.epsilon, abs=1e-3), name
        assert float(step) == pytest.approx(p.attack.step_size, abs=1e-4), name
        if p.surrogate is None:
            assert pgd == str(p.attack.steps) and schedule == "none", name
        else:
            s = p.surrogate
            assert pgd == (f"{s.rounds} rounds x {p.attack.steps}" if s.rounds > 1 else str(p.attack.steps)), name
            numbers = [int(v) for v in re.findall(r"\d+", schedule)]
            assert numbers == [v for v in (s.clean_steps, s.train_steps) if v], (name, numbers)
