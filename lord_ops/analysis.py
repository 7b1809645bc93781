"""Replicate analysis: paired differences between methods over independent replicates, with an
interval, a permutation p-value, an effect size and a multiplicity correction. Plain numpy + scipy.

A *replicate* is one independent repetition of the whole protocol (its own seeds and its own subject
images); a method's value in a replicate is one number (e.g. the held-out denoising loss of its
LoRA). Two methods are compared **paired**: per replicate ``d_r = x_r - y_r``, then

* ``mean`` of ``d`` and its two-sided ``level`` interval from Student's t with ``n - 1`` degrees of
  freedom (``mean +- t * sd / sqrt(n)``);
* ``d_z = mean / sd`` (Cohen's d for paired data; ``sd`` with ``ddof = 1``);
* ``p``: the two-sided sign-flip permutation p-value of ``mean(d) = 0`` (under the null each ``d_r`` is
  symmetric around 0): the share of the ``2^n`` sign patterns whose ``|mean|`` is at least the
  observed one, counted exactly for ``n <= EXACT_MAX`` and estimated from ``permutations`` random
  patterns (seeded, observed pattern included) above that;
* ``p_holm``: Holm's step-down adjustment over a family of questions declared together.

:func:`crossed_interval` widens the interval of a mean over replicates x items (e.g. held-out images scored
in every replicate) so that the items count as a sample too (two-way random effects, Satterthwaite df).

Units follow the metric (loss, accuracy share, FD); nothing here knows which direction is "better".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

EXACT_MAX = 20  # sign flips are enumerated exactly up to this many replicates (2^20 patterns)


@dataclasses.dataclass
class Paired:
    """Summary of paired differences ``d`` (see the module docstring). ``p_holm`` is set by :func:`holm`."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    level: float
    d_z: float
    p: float
    p_method: str
    values: list
    p_holm: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_array(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("expected one value per replicate")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"non-finite replicate value in {x.tolist()}")
    return x


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, sd, low, high)``: the mean of ``values`` and its two-sided Student-t interval
    (``sd`` with ddof 1; the interval is ``(nan, nan)`` for fewer than two values)."""
    from scipy import stats

    x = _as_array(values)
    n = len(x)
    if n == 0:
        raise ValueError("no replicate values")
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def sign_flip_p(d: Sequence[float], permutations: int = 200_000, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip permutation p-value of ``mean(d) = 0`` and how it was computed
    (``"exact (2^n sign patterns)"`` or ``"Monte Carlo (k patterns)"``). All-zero ``d`` gives 1."""
    x = _as_array(d)
    n = len(x)
    if n == 0:
        raise ValueError("no replicate values")
    observed = abs(x.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(x).max()))
    if n <= EXACT_MAX:
        patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1) * 2 - 1  # [2^n, n] of +-1
        means = np.abs(patterns @ x) / n
        return float(np.mean(means >= observed - tolerance)), f"exact ({2 ** n} sign patterns)"
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(permutations, n))
    means = np.abs(signs @ x) / n
    hits = int(np.sum(means >= observed - tolerance))
    return (hits + 1) / (permutations + 1), f"Monte Carlo ({permutations} patterns)"


def paired(x: Sequence[float], y: Sequence[float], level: float = 0.95, seed: int = 0) -> Paired:
    """Paired comparison of ``x`` and ``y`` (same replicates, same order): summary of ``x - y``."""
    a, b = _as_array(x), _as_array(y)
    if len(a) != len(b):
        raise ValueError(f"paired values need the same replicates: {len(a)} vs {len(b)}")
    return describe(a - b, level, seed)


def describe(d: Sequence[float], level: float = 0.95, seed: int = 0) -> Paired:
    """Summary of per-replicate differences ``d`` (already paired)."""
    x = _as_array(d)
    mean, sd, low, high = mean_interval(x, level)
    d_z = mean / sd if sd and sd > 0 and math.isfinite(sd) else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    p, how = sign_flip_p(x, seed=seed)
    return Paired(n=len(x), mean=mean, sd=sd, ci_low=low, ci_high=high, level=level, d_z=d_z, p=p, p_method=how,
                  values=[float(v) for v in x])


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values of a family of questions (``{name: p}``): with the p-values
    sorted ascending ``p_(1) <= ... <= p_(m)``, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``."""
    items = sorted(p_values.items(), key=lambda kv: (kv[1], kv[0]))
    m = len(items)
    out, running = {}, 0.0
    for i, (name, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * float(p)))
        out[name] = running
    return out


def apply_holm(family: Mapping[str, Paired]) -> None:
    """Set ``p_holm`` on every summary of a declared family (in place)."""
    adjusted = holm({k: v.p for k, v in family.items()})
    for k, v in family.items():
        v.p_holm = adjusted[k]


def ratio_of_means(num: Sequence[float], den: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> dict:
    """``mean(num) / mean(den)`` over paired replicates with a percentile bootstrap interval (replicates
    resampled with replacement, the pairs kept together); ``None`` bounds where a resample's
    denominator is 0. E.g. the share of the attack's effect a defense removes."""
    a, b = _as_array(num), _as_array(den)
    if len(a) != len(b):
        raise ValueError(f"paired values need the same replicates: {len(a)} vs {len(b)}")
    point = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    dens = b[idx].mean(axis=1)
    ok = dens != 0
    ratios = a[idx].mean(axis=1)[ok] / dens[ok]
    low, high = (np.quantile(ratios, [0.5 - level / 2, 0.5 + level / 2]).tolist() if len(ratios) else
                 [float("nan"), float("nan")])
    return {"value": point, "ci_low": float(low), "ci_high": float(high), "level": level, "resamples": resamples,
            "method": "percentile bootstrap over replicates"}


def crossed_interval(d, level: float = 0.95) -> dict:
    """Mean of a ``[replicates, items]`` array ``d`` and its two-sided interval when the items are a sample
    too, not only the replicates: e.g. per replicate and per held-out image, a paired difference of the
    held-out loss, where every replicate is scored on the same images. The usual interval (Student t over the
    replicates' means, :func:`mean_interval`) holds those images fixed; this one also asks "and on another set of
    held-out images from the same subject?".

    Two-way random-effects model without replication, ``d[r, i] = mu + a_r + b_i + e_ri``: mean squares of
    replicates ``ms_r``, items ``ms_i`` and residual ``ms_e``; ``var(mean) = (ms_r + max(ms_i - ms_e, 0)) / (R I)``,
    whose first term is exactly the replicates-only ``sd^2 / R``; Satterthwaite's degrees of freedom.
    Returns ``mean``, ``replicates``, ``items``, ``se_replicates`` (the items held fixed), ``se_crossed``,
    ``df``, ``ci_low``, ``ci_high``, ``p`` (two-sided t test of ``mean = 0`` on ``df``) and ``item_share`` (the
    share of ``var(mean)`` from the items' sampling: ``se_crossed = se_replicates / sqrt(1 - item_share)``).
    With few replicates (2-3) Satterthwaite's df can exceed ``R - 1`` by enough that this interval is narrower
    than the replicates-only one: use it from about 4 replicates. Where ``ms_i`` barely exceeds ``ms_e`` the df
    drops below ``R - 1`` (the conservative side of the truncation)."""
    from scipy import stats

    x = np.asarray(d, dtype=float)
    if x.ndim != 2 or min(x.shape) < 2 or not np.isfinite(x).all():
        raise ValueError(f"need a finite [replicates, items] array with at least 2 of each, got shape {x.shape}")
    reps, items = x.shape
    grand = float(x.mean())
    row, col = x.mean(axis=1), x.mean(axis=0)
    ms_r = items * float(((row - grand) ** 2).sum()) / (reps - 1)
    ms_i = reps * float(((col - grand) ** 2).sum()) / (items - 1)
    ms_e = float(((x - row[:, None] - col[None, :] + grand) ** 2).sum()) / ((reps - 1) * (items - 1))
    item_part = max(ms_i - ms_e, 0.0)
    var = (ms_r + item_part) / (reps * items)
    if item_part > 0:
        df = (ms_r + ms_i - ms_e) ** 2 / (ms_r ** 2 / (reps - 1) + ms_i ** 2 / (items - 1)
                                          + ms_e ** 2 / ((reps - 1) * (items - 1)))
    else:
        df = float(reps - 1)
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * stats.t.sf(abs(grand) / se, df)) if se > 0 else (1.0 if grand == 0 else 0.0)
    return {"mean": grand, "replicates": reps, "items": items, "se_replicates": math.sqrt(ms_r / (reps * items)),
            "se_crossed": se, "df": float(df), "ci_low": grand - half, "ci_high": grand + half, "p": p,
            "level": level, "item_share": item_part / (ms_r + item_part) if ms_r + item_part > 0 else 0.0}


def required_replicates(d_z: float, power: float = 0.8, alpha: float = 0.05) -> Optional[int]:
    """Replicates a paired two-sided t test needs to detect an effect of size ``d_z`` with ``power`` at
    ``alpha`` (the noncentral-t calculation, smallest n >= 2); None for ``d_z == 0``."""
    from scipy import stats

    if d_z == 0 or not math.isfinite(d_z):
        return None
    for n in range(2, 100_000):
        df = n - 1
        crit = stats.t.ppf(1 - alpha / 2, df)
        nc = abs(d_z) * math.sqrt(n)
        achieved = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        if achieved >= power:
            return n
    return None


def per_replicate(values: Iterable[tuple[int, float]]) -> dict[int, float]:
    """``{replicate: value}`` from ``(replicate, value)`` pairs, refusing a replicate given twice."""
    out: dict[int, float] = {}
    for r, v in values:
        if r in out:
            raise ValueError(f"replicate {r} given twice")
        out[int(r)] = float(v)
    return out


def aligned(*series: Mapping[int, float]) -> tuple[list[int], list[list[float]]]:
    """The replicates every series has, sorted, and each series' values on them (pairing by replicate)."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return common, [[s[r] for r in common] for s in series]
