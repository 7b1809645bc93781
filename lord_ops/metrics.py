"""Evaluation metrics (paper Sec. IV-A3) in plain numpy/torch: detection ROC/AUROC, PSNR/SSIM of a
perturbation, Frechet and kernel distances of feature sets, CLIP-IQA from CLIP features, and two
texture metrics of generated image sets (correlation with an ACE target pattern, high-frequency
spectrum distance to a reference set).

Units and layouts:

* images are ``uint8`` ``[H, W]`` or ``[H, W, C]`` pixel levels 0..255 (one image at a time;
  loop over a batch), as torch tensors or numpy arrays;
* detection scores are any real numbers, *higher = more likely positive* (perturbed); a threshold
  ``t`` classifies ``score >= t`` as positive;
* features are ``[N, D]`` (any float dtype; computed in float64).

The Frechet distance and the kernel distance come from torch-fidelity's public functions (the
statistics, the matrix square root and the unbiased MMD estimator are not re-implemented here).
Which *name* a distance gets (FID vs "FD (<extractor>)") is decided by the feature extractor,
see :mod:`lord_ops.metric_models`.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


# ---------------------------------------------------------------- detection

def _scores(negatives: Iterable[float], positives: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray([float(s) for s in negatives], dtype=np.float64)
    pos = np.asarray([float(s) for s in positives], dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"ROC/AUROC needs at least one negative and one positive score "
                         f"(got {neg.size} negatives, {pos.size} positives)")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("ROC/AUROC: scores must be finite numbers (NaN or Inf found)")
    return neg, pos


def roc_curve(negatives: Iterable[float], positives: Iterable[float]) -> dict:
    """ROC curve of a score (``score >= threshold`` = positive).

    Returns ``{"fpr": [...], "tpr": [...], "thresholds": [...]}``, one point per distinct score in
    decreasing threshold order, starting at (0, 0) and ending at (1, 1). The first threshold is the
    smallest float above the largest score (finite, so the curve is valid JSON).
    """
    neg, pos = _scores(negatives, positives)
    distinct = np.unique(np.concatenate([neg, pos]))[::-1]
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # count of scores >= t = n - (count of scores < t)
    fp = neg.size - np.searchsorted(neg_sorted, distinct, side="left")
    tp = pos.size - np.searchsorted(pos_sorted, distinct, side="left")
    first = math.nextafter(float(distinct[0]), math.inf)
    return {"fpr": [0.0] + (fp / neg.size).tolist(), "tpr": [0.0] + (tp / pos.size).tolist(),
            "thresholds": [first] + distinct.tolist()}


def auroc(negatives: Iterable[float], positives: Iterable[float]) -> float:
    """Area under the ROC curve = P(positive score > negative score) + 1/2 P(tie) (Mann-Whitney U
    divided by n_neg * n_pos). 1.0: every positive scores above every negative; 0.5: chance."""
    neg, pos = _scores(negatives, positives)
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")   # negatives < p
    below_or_tie = np.searchsorted(neg_sorted, pos, side="right")  # negatives <= p
    wins = below.sum() + 0.5 * (below_or_tie - below).sum()
    return float(wins / (neg.size * pos.size))


def threshold_at_fpr(negatives: Iterable[float], positives: Iterable[float], fpr: float = 0.05) -> dict:
    """The lowest ROC threshold whose false-positive rate is at most ``fpr`` (so the highest true-positive
    rate under that constraint). Returns ``{"threshold", "fpr" (actual, <= fpr), "tpr", "target_fpr"}``."""
    if not 0.0 <= float(fpr) <= 1.0:
        raise ValueError(f"threshold_at_fpr: fpr must be in [0, 1], got {fpr}")
    roc = roc_curve(negatives, positives)
    best = 0
    for i, f in enumerate(roc["fpr"]):  # fpr is non-decreasing along the curve
        if f <= fpr + 1e-12:
            best = i
    return {"threshold": roc["thresholds"][best], "fpr": roc["fpr"][best], "tpr": roc["tpr"][best],
            "target_fpr": float(fpr)}


def detection_summary(negatives: Iterable[float], positives: Iterable[float], fpr: float = 0.05) -> dict:
    """Everything the report shows about a detector: AUROC, the ROC curve and the operating point at
    ``fpr``. Negatives = scores of clean images, positives = scores of protected (perturbed) images."""
    neg, pos = list(map(float, negatives)), list(map(float, positives))
    return {"auroc": auroc(neg, pos), "roc": roc_curve(neg, pos), "at_fpr": threshold_at_fpr(neg, pos, fpr),
            "negatives": len(neg), "positives": len(pos)}


# ---------------------------------------------------------------- perturbation size

def _image_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b)
    if a.shape != b.shape:
        raise ValueError(f"image pair has different shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() not in (2, 3):
        raise ValueError(f"expected one image [H, W] or [H, W, C] (got shape {tuple(a.shape)}); "
                         "loop over a batch one image at a time")
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixel levels 0..255, got {a.dtype} and {b.dtype}")
    if a.dim() == 2:
        a, b = a[..., None], b[..., None]
    return a.double().cpu(), b.double().cpu()


def psnr(a_u8, b_u8) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (data range 255); ``inf`` if identical."""
    a, b = _image_pair(a_u8, b_u8)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a_u8, b_u8) -> float:
    """Structural similarity (Wang et al. 2004) of two uint8 images: Gaussian window 11 px, sigma 1.5,
    K1 = 0.01, K2 = 0.03, data range 255, population (not sample) variances; the SSIM map is averaged
    over the positions where the whole window fits, then over channels. Both sides must be >= 11 px."""
    a, b = _image_pair(a_u8, b_u8)
    h, w = a.shape[0], a.shape[1]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {w}x{h}")
    g = _gaussian_window()
    x, y = a.permute(2, 0, 1)[:, None], b.permute(2, 0, 1)[:, None]  # [C, 1, H, W]

    def blur(t):
        t = torch.nn.functional.conv2d(t, g.view(1, 1, -1, 1))
        return torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())


def perturbation_stats(clean_u8, perturbed_u8) -> dict:
    """Size of one perturbation (one image pair, uint8 levels): ``{"psnr_db", "ssim", "linf_levels",
    "l2_levels"}``; L-inf and L2 of the difference in pixel levels (L2 over all pixels and channels)."""
    a, b = _image_pair(clean_u8, perturbed_u8)
    d = b - a
    return {"psnr_db": psnr(clean_u8, perturbed_u8), "ssim": ssim(clean_u8, perturbed_u8),
            "linf_levels": float(d.abs().max()), "l2_levels": float(d.pow(2).sum().sqrt())}


# ---------------------------------------------------------------- feature-set distances

def _features(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{what}: expected features [N, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: features contain NaN or Inf")
    return t


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (``||mu_a - mu_b||^2 +
    tr(S_a + S_b - 2 (S_a S_b)^(1/2))``), via torch-fidelity's ``fid_features_to_statistics`` and
    ``fid_statistics_to_metric``. With Inception-v3 pool features this is FID. Needs N >= 2 per set."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    a, b = _features(features_a, "frechet_distance a"), _features(features_b, "frechet_distance b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set (got {a.shape[0]} and {b.shape[0]})")
    stats_a, stats_b = fid_features_to_statistics(a), fid_features_to_statistics(b)
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def principal_axes(reference, dims: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mean [D], axes [D, dims], explained share)``: the first ``dims`` principal axes of the
    reference features ``[N, D]`` (float64 SVD of the centred features) and the share of their variance
    those axes hold."""
    ref = _features(reference, "principal_axes reference")
    if not 1 <= dims <= min(ref.shape[1], ref.shape[0] - 1):
        raise ValueError(f"principal_axes: dims must be 1..{min(ref.shape[1], ref.shape[0] - 1)} for "
                         f"{ref.shape[0]} reference features of size {ref.shape[1]}, got {dims}")
    mean = ref.mean(dim=0)
    _, singular, vh = torch.linalg.svd(ref - mean, full_matrices=False)
    variance = singular.square()
    return mean, vh[:dims].T.contiguous(), float(variance[:dims].sum() / variance.sum().clamp_min(1e-300))


def projected_frechet_distance(features, reference, dims: int) -> dict:
    """Frechet distance after projecting both sets onto the reference's first ``dims`` principal axes
    (:func:`principal_axes`): ``{"value", "dims", "explained"}``.

    Why: FD's estimate from N samples in D dimensions is biased upwards by roughly tr(S)/N-type terms and
    its covariance is rank-deficient when N <= D (40 samples of 128-d features); in a few dimensions that
    the reference actually varies along, the same N estimates the covariance well and the bias is small,
    so differences between methods are less buried in estimation noise. The axes come from the reference
    only, so every method is measured in the same coordinates."""
    mean, axes, explained = principal_axes(reference, dims)
    a = (_features(features, "projected_frechet_distance a") - mean) @ axes
    b = (_features(reference, "projected_frechet_distance b") - mean) @ axes
    return {"value": frechet_distance(a, b), "dims": int(dims), "explained": explained}


# ---------------------------------------------------------------- texture metrics (image sets)

def _grey_set(images, what: str) -> torch.Tensor:
    """``[N, H, W, C]`` (ComfyUI IMAGE layout) or ``[N, H, W]`` in [0, 1] -> grey ``[N, H, W]`` float64."""
    t = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().to("cpu", torch.float64)
    if t.dim() == 4:
        t = t.mean(dim=-1)
    if t.dim() != 3 or t.shape[0] < 1:
        raise ValueError(f"{what}: expected images [N, H, W, C] or [N, H, W] in [0, 1], got shape {tuple(t.shape)}")
    return t


def pattern_correlation(images, pattern) -> torch.Tensor:
    """Per-image Pearson correlation ``[N]`` of the grey images with a grey target pattern: how much the
    ACE target (``lord_ops.attacks.high_contrast_target`` or a user target, resized to the images)
    shows in them. ``images`` ``[N, H, W, C]`` in [0, 1]; ``pattern`` ``[1, 3, H, W]``, ``[H, W, C]`` or
    ``[H, W]`` in [0, 1], same H, W. Signed: +1 is the pattern itself, -1 its negative, ~0 unrelated
    content (a flat image counts as 0)."""
    x = _grey_set(images, "pattern_correlation images")
    p = torch.as_tensor(pattern).detach().to("cpu", torch.float64)
    p = p[0].mean(dim=0) if p.dim() == 4 else (p.mean(dim=-1) if p.dim() == 3 else p)
    if p.shape != x.shape[1:]:
        raise ValueError(f"pattern_correlation: the pattern is {tuple(p.shape)} pixels, the images "
                         f"{tuple(x.shape[1:])}; resize the target to the images first")
    xc = (x - x.mean(dim=(1, 2), keepdim=True)).flatten(1)
    pc = (p - p.mean()).flatten()
    return (xc @ pc) / (xc.norm(dim=1) * pc.norm()).clamp_min(1e-12)


def radial_log_spectrum(images) -> torch.Tensor:
    """Mean radially averaged log10 power spectrum ``[R]`` of a set of grey images (``[N, H, W(, C)]``
    in [0, 1], each image's mean removed, a Hann window against edge leakage). Bin ``k`` holds spatial
    frequencies with radius in ``[k, k+1)`` cycles per image (of the shorter side), up to Nyquist
    (``R = min(H, W) // 2``)."""
    x = _grey_set(images, "radial_log_spectrum images")
    n, h, w = x.shape
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64),
                         torch.hann_window(w, periodic=False, dtype=torch.float64))
    x = (x - x.mean(dim=(1, 2), keepdim=True)) * window
    power = torch.fft.fft2(x).abs().square().mean(dim=0) / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).reshape(-1, 1) * min(h, w)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).reshape(1, -1) * min(h, w)
    radius = torch.sqrt(fy.square() + fx.square()).floor().long()
    bins = min(h, w) // 2
    keep = radius < bins
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, radius[keep], power[keep])
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, radius[keep], torch.ones_like(power[keep]))
    return torch.log10(total / count.clamp_min(1) + 1e-12)


def high_frequency_distance(images, reference, low_cut: float = 0.25) -> dict:
    """How far the fine texture of ``images`` is from ``reference``'s: the mean absolute difference of
    their :func:`radial_log_spectrum` over the radii at or above ``low_cut`` x Nyquist (log10 power;
    0.3 is a factor of 2 in power). ``{"value", "signed", "bins"}``: ``signed`` is images minus
    reference averaged over those bins (> 0: more high-frequency energy than the reference, e.g. an
    attack's pattern; < 0: blurrier)."""
    a, b = radial_log_spectrum(images), radial_log_spectrum(reference)
    if a.shape != b.shape:
        raise ValueError(f"high_frequency_distance: the image sets have different sizes ({a.shape[0]} vs "
                         f"{b.shape[0]} radial bins); resize one set to the other's size first")
    start = max(1, int(math.ceil(low_cut * a.shape[0])))
    d = a[start:] - b[start:]
    return {"value": float(d.abs().mean()), "signed": float(d.mean()), "bins": [start, int(a.shape[0])]}


def kernel_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel (Inception) distance: the unbiased MMD^2 estimate with the cubic polynomial kernel
    ``k(x, y) = (x.y / D + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size`` samples
    from each set (torch-fidelity's ``kid_features_to_metric``; KID with Inception-v3 pool features).
    ``subset_size`` is capped at ``min(N_a, N_b)``. Returns ``{"mean", "std", "subsets", "subset_size"}``."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = _features(features_a, "kernel_distance a"), _features(features_b, "kernel_distance b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    size = min(int(subset_size), a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError(f"kernel_distance needs subsets of at least 2 samples (sets of {a.shape[0]} and "
                         f"{b.shape[0]}, subset_size {subset_size})")
    if int(subsets) < 1:
        raise ValueError(f"kernel_distance: subsets must be >= 1, got {subsets}")
    out = kid_features_to_metric(a, b, kid_subsets=int(subsets), kid_subset_size=size, verbose=False,
                                 rng_seed=int(seed), kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    return {"mean": float(out[KEY_METRIC_KID_MEAN]), "std": float(out[KEY_METRIC_KID_STD]),
            "subsets": int(subsets), "subset_size": size}


# ---------------------------------------------------------------- CLIP-IQA

def clip_iqa_from_features(image_features: torch.Tensor, good_text_feature: torch.Tensor,
                           bad_text_feature: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP-IQA with antonym prompts: P(good) = softmax over ``logit_scale * cos(image, text)`` for the
    (good, bad) prompt pair. ``image_features`` ``[N, D]``, text features ``[D]``, ``logit_scale`` the
    multiplier itself (CLIP's ``logit_scale.exp()``, 100 for OpenAI CLIP). Returns ``[N]`` in (0, 1)."""
    img = torch.nn.functional.normalize(image_features.double(), dim=-1)
    text = torch.nn.functional.normalize(torch.stack([good_text_feature.reshape(-1), bad_text_feature.reshape(-1)]).double(), dim=-1)
    logits = float(logit_scale) * img @ text.to(img.device).T
    return logits.softmax(dim=-1)[:, 0]
