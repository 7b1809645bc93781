"""Metrics against independent computations (numpy closed forms, brute-force counts, scikit-image's
SSIM, a hand-computed CLIP-IQA softmax), the metric-network loaders with random weight files built
here (never committed, never downloaded), and the two metric nodes in-process."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from lord_ops import metric_models as MM
from lord_ops import metrics as M
from lord_ops import trainer as T
from lord_ops.weights import MetricWeightsError, file_sha256

TINY_CLIP = "lord-test-tiny-clip"
TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A random Inception-v3 in pytorch-fid's file layout (torchvision's module names, 1008 classes)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory):
    """A tiny random open_clip model registered under a custom config name, saved as a state dict."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_CLIP)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))  # a sharper softmax than the init's 1/0.07
    torch.save(model.state_dict(), d / "tiny_clip.pt")
    return d / "tiny_clip.pt"


def _images(n, h=40, w=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_identical_sets_is_zero():
    f = torch.randn(300, 24, dtype=torch.float64) * torch.linspace(0.1, 5, 24) + 3
    scale = float(np.trace(np.cov(f.numpy(), rowvar=False)))
    assert abs(M.frechet_distance(f, f)) <= 1e-6 * scale
    assert abs(M.frechet_distance(f.float(), f[torch.randperm(300)])) <= 1e-5 * scale  # order and dtype do not matter


def _with_exact_moments(z: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Samples whose sample mean and sample covariance (ddof 1) are exactly ``mean`` and ``diag(var)``."""
    z = z - z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    white = np.linalg.solve(chol, z.T).T  # sample covariance = identity
    return white * np.sqrt(var) + mean


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0, -1.0]), np.array([1.0, 1.0, 0.0, 3.5, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0, 9.0]), np.array([2.0, 1.0, 1.0, 2.0, 0.5])
    # closed form for diagonal covariances: tr((S1 S2)^(1/2)) = sum sqrt(v1 v2)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2)))
    # (1) sets with exactly these moments: the distance is the closed form to rounding
    a = _with_exact_moments(rng.standard_normal((400, 5)), mu1, v1)
    b = _with_exact_moments(rng.standard_normal((300, 5)), mu2, v2)
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(closed, rel=1e-9)
    # (2) plain samples of the two Gaussians: within sampling error of the closed form
    a = rng.standard_normal((40000, 5)) * np.sqrt(v1) + mu1
    b = rng.standard_normal((40000, 5)) * np.sqrt(v2) + mu2
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(closed, rel=0.02)
    with pytest.raises(ValueError, match="feature sizes differ"):
        M.frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------- kernel distance

def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, by explicit loops over pairs."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) * 1.5 + 0.3
    out = M.kernel_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=12)
    assert out["mean"] == pytest.approx(_poly_mmd2_unbiased(x, y), rel=1e-10)
    assert out["std"] == 0.0 and out["subsets"] == 1 and out["subset_size"] == 12
    # subset_size is capped at the smaller set
    assert M.kernel_distance(torch.from_numpy(x[:5]), torch.from_numpy(y[:7]), subsets=3)["subset_size"] == 5


def test_kernel_distance_is_unbiased_for_one_distribution():
    """Two independent samples of one distribution: the estimates average to 0 within a few standard
    errors (the biased V-statistic, with the kernel diagonals, is far above 0 at this size)."""
    rng = np.random.default_rng(2)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.standard_normal((10, 6)), rng.standard_normal((10, 6))
        unbiased.append(M.kernel_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=10)["mean"])
        kxx, kyy, kxy = ((x @ x.T / 6 + 1) ** 3, (y @ y.T / 6 + 1) ** 3, (x @ y.T / 6 + 1) ** 3)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * se
    far = M.kernel_distance(torch.from_numpy(rng.standard_normal((50, 6))), torch.from_numpy(rng.standard_normal((50, 6)) + 1),
                            subsets=20, subset_size=30)
    assert far["mean"] > 10 * se and far["std"] > 0


# ---------------------------------------------------------------- detection

def _brute_rates(neg, pos, t):
    return sum(s >= t for s in neg) / len(neg), sum(s >= t for s in pos) / len(pos)


def test_roc_auroc_and_threshold_against_brute_force():
    rng = np.random.default_rng(3)
    neg = rng.integers(0, 12, 40).astype(float).tolist()  # integer scores: many ties
    pos = (rng.integers(0, 12, 30) + 3).astype(float).tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert M.auroc(neg, pos) == pytest.approx(wins / (len(neg) * len(pos)), abs=1e-12)
    assert not hasattr(T, "auroc")  # one owner: lord_ops.metrics (no re-export)
    roc = M.roc_curve(neg, pos)
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0) and (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    for f, t, thr in zip(roc["fpr"], roc["tpr"], roc["thresholds"]):
        assert (f, t) == pytest.approx(_brute_rates(neg, pos, thr))
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    # trapezoid area under the curve = AUROC (ties are diagonal segments: the 1/2)
    area = sum((roc["fpr"][i + 1] - roc["fpr"][i]) * (roc["tpr"][i + 1] + roc["tpr"][i]) / 2 for i in range(len(roc["fpr"]) - 1))
    assert area == pytest.approx(M.auroc(neg, pos), abs=1e-12)
    for target in (0.0, 0.05, 0.2, 0.5, 1.0):
        at = M.threshold_at_fpr(neg, pos, target)
        candidates = sorted(set(neg + pos)) + [max(neg + pos) + 1]
        feasible = [_brute_rates(neg, pos, t) for t in candidates if _brute_rates(neg, pos, t)[0] <= target]
        assert at["fpr"] <= target and at["tpr"] == pytest.approx(max(r[1] for r in feasible))
        assert (at["fpr"], at["tpr"]) == pytest.approx(_brute_rates(neg, pos, at["threshold"]))
    summary = M.detection_summary(neg, pos)
    assert summary["negatives"] == 40 and summary["positives"] == 30 and summary["at_fpr"]["target_fpr"] == 0.05
    json.dumps(summary, allow_nan=False)  # valid JSON (the first threshold is finite)
    assert M.auroc([0.1, 0.2], [0.3, 0.4]) == 1.0 and M.auroc([0.5], [0.5]) == 0.5 and M.auroc([1, 2], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="at least one negative"):
        M.auroc([], [1.0])


# ---------------------------------------------------------------- PSNR / SSIM

def test_psnr_ssim_and_perturbation_stats():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    clean = rng.integers(0, 256, (43, 37, 3)).astype(np.uint8)
    delta = rng.integers(-4, 5, clean.shape)
    pert = np.clip(clean.astype(int) + delta, 0, 255).astype(np.uint8)
    mse = np.mean((clean.astype(float) - pert.astype(float)) ** 2)
    assert M.psnr(torch.from_numpy(clean), torch.from_numpy(pert)) == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12)
    assert M.psnr(clean, clean) == math.inf
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (43, 37, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    for a, b in ((clean, pert), (smooth, pert), (smooth, np.clip(smooth.astype(int) + delta, 0, 255).astype(np.uint8))):
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255, channel_axis=-1)
        assert M.ssim(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, abs=1e-4)
    grey_ref = structural_similarity(smooth[..., 0], pert[..., 0], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255)
    assert M.ssim(smooth[..., 0], pert[..., 0]) == pytest.approx(grey_ref, abs=1e-4)
    assert M.ssim(clean, clean) == pytest.approx(1.0)
    stats = M.perturbation_stats(torch.from_numpy(clean), torch.from_numpy(pert))
    d = pert.astype(float) - clean.astype(float)
    assert stats["linf_levels"] == np.abs(d).max() == 4
    assert stats["l2_levels"] == pytest.approx(np.sqrt((d ** 2).sum()))
    assert set(stats) == {"psnr_db", "ssim", "linf_levels", "l2_levels"}
    with pytest.raises(ValueError, match="one image"):
        M.psnr(torch.from_numpy(clean)[None], torch.from_numpy(pert)[None])
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(clean[:10], pert[:10])


# ---------------------------------------------------------------- CLIP-IQA

def test_clip_iqa_equals_a_hand_computation(tiny_clip_file):
    import open_clip
    from PIL import Image
    from torchvision import transforms

    iqa = MM.load_clip_iqa(TINY_CLIP, tiny_clip_file)
    assert iqa.backbone == TINY_CLIP and iqa.logit_scale == pytest.approx(30.0, rel=1e-5)
    assert iqa.weights["sha256"] == file_sha256(tiny_clip_file) and len(iqa.weights["sha256"]) == 64
    assert isinstance(iqa.tokenizer, open_clip.tokenizer.SimpleTokenizer)  # ships its vocab: no download
    images = _images(3, 45, 38, seed=5)
    scores = iqa.score(images, "dog", batch_size=2)
    # by hand: an independent copy of the model, CLIP's eval preprocessing, cosine similarities, softmax
    model = open_clip.create_model(TINY_CLIP).eval()
    model.load_state_dict(torch.load(tiny_clip_file, weights_only=True))
    prep = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    pixels = torch.stack([prep(Image.fromarray(im.numpy())) for im in images])
    tokens = open_clip.get_tokenizer(TINY_CLIP)(["A good photo of a dog.", "A bad photo of a dog."])
    with torch.no_grad():
        img = model.encode_image(pixels).double()
        txt = model.encode_text(tokens).double()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    logits = 30.0 * img @ txt.T
    expected = torch.exp(logits[:, 0]) / (torch.exp(logits[:, 0]) + torch.exp(logits[:, 1]))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.shape == (3,) and (scores > 0).all() and (scores < 1).all()
    assert float(scores.max() - scores.min()) > 1e-4  # the images score differently


def test_clip_loader_refuses_bad_files_and_names(tiny_clip_file, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        MM.load_clip_iqa("no-such-model", tiny_clip_file)
    with pytest.raises(MetricWeightsError, match="does not exist"):
        MM.load_clip_iqa(TINY_CLIP, tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    sd = torch.load(tiny_clip_file, weights_only=True)
    sd["ln_final.weight"] = sd["ln_final.weight"][:10]
    torch.save(sd, wrong)
    with pytest.raises(MetricWeightsError, match="wrong.pt does not fit open_clip model"):
        MM.load_clip_iqa(TINY_CLIP, wrong)


# ---------------------------------------------------------------- Inception and the registry

class _NotATensor:
    pass


def test_inception_loader_features_labels_and_bad_files(inception_file, tmp_path):
    fx = MM.load_inception(inception_file, features=64)
    assert (fx.name, fx.label, fx.kid_label) == ("inception-v3", "FD (inception-v3 pool 64)", "KD (inception-v3 pool 64)")
    images = _images(3, 50, 42, seed=6)
    f = fx.features(images, batch_size=2)
    assert f.shape == (3, 64) and f.dtype == torch.float64 and torch.isfinite(f).all()
    torch.testing.assert_close(fx.features(images, batch_size=3), f, rtol=1e-5, atol=1e-6)  # deterministic, batch-independent
    assert float((f[0] - f[1]).abs().max()) > 0
    # images of different sizes in one list
    mixed = fx.features([images[0], _images(1, 30, 31, seed=7)[0], images[2]])
    torch.testing.assert_close(mixed[[0, 2]], f[[0, 2]], rtol=1e-5, atol=1e-6)
    assert fx.weights == {"path": str(inception_file), "sha256": file_sha256(inception_file)}
    # the same tensors as .safetensors load to the same network
    import safetensors.torch

    st = tmp_path / "inception.safetensors"
    safetensors.torch.save_file(torch.load(inception_file, weights_only=True), str(st))
    torch.testing.assert_close(MM.load_inception(st, features=64).features(images), f, rtol=1e-5, atol=1e-6)
    # FID naming only for the 2048 pool features
    full = MM.load_feature_extractor("inception-v3", inception_file)
    assert (full.label, full.kid_label) == ("FID", "KID")
    # a pickle that is not a tensor dict is refused before torch-fidelity unpickles it
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": _NotATensor()}))
    with pytest.raises(MetricWeightsError) as e:
        MM.load_inception(evil)
    assert "evil.pth" in str(e.value) and "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(MetricWeightsError, match="other.pth is not an Inception-v3"):
        MM.load_inception(other)
    sd = torch.load(inception_file, weights_only=True)
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")  # a training-checkpoint wrapper is unwrapped
    torch.testing.assert_close(MM.load_inception(tmp_path / "wrapped.pth", 64).features(images), f, rtol=1e-5, atol=1e-6)
    del sd["Mixed_6b.branch1x1.conv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(MetricWeightsError, match="partial.pth does not fit torch-fidelity's Inception-v3"):
        MM.load_inception(tmp_path / "partial.pth", 64)
    with pytest.raises(MetricWeightsError, match="does not exist"):
        MM.load_inception(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="known: inception-v3, clip:<model>"):
        MM.load_feature_extractor("vgg", inception_file)


def test_clip_feature_extractor_is_never_called_fid(tiny_clip_file):
    fx = MM.load_feature_extractor(f"clip:{TINY_CLIP}", tiny_clip_file)
    assert (fx.name, fx.label, fx.kid_label) == (f"clip:{TINY_CLIP}", f"FD (clip:{TINY_CLIP})", f"KD (clip:{TINY_CLIP})")
    f = fx.features(_images(4, seed=8))
    assert f.shape == (4, 16)
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6 * float(f.var(0).sum()))


# ---------------------------------------------------------------- nodes

@pytest.fixture()
def metrics_folder(tmp_path, inception_file, tiny_clip_file):
    import shutil

    import folder_paths

    from lord_ops.comfy.metrics import METRICS_FOLDER
    from comfyui_lord.nodes import register_model_folder

    register_model_folder()
    folder = tmp_path / "lord_metrics"
    folder.mkdir()
    shutil.copy(tiny_clip_file, folder / "tiny_clip.pt")
    (folder / "pt_inception.pth").symlink_to(inception_file)
    folder_paths.add_model_folder_path(METRICS_FOLDER, str(folder), is_default=True)
    yield folder
    folder_paths.folder_names_and_paths[METRICS_FOLDER][0].remove(str(folder))


def test_image_quality_node(metrics_folder, tiny_clip_file):
    from comfyui_lord.nodes.metrics import LoRDImageQuality

    schema = LoRDImageQuality.define_schema()
    weights_input = next(i for i in schema.inputs if i.id == "weights")
    assert "tiny_clip.pt" in weights_input.options and "pt_inception.pth" in weights_input.options
    u8 = _images(2, 36, 40, seed=9)
    out = LoRDImageQuality.execute(u8.float() / 255, TINY_CLIP, "tiny_clip.pt", "cat")
    score, report = out.args
    rep = json.loads(report)
    expected = MM.load_clip_iqa(TINY_CLIP, tiny_clip_file).score(u8, "cat")
    assert rep["per_image"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert score == pytest.approx(float(expected.mean()), abs=1e-6)
    assert rep["prompts"] == ["A good photo of a cat.", "A bad photo of a cat."] and rep["backbone"] == TINY_CLIP
    assert "mean" in out.ui.as_dict()["text"][0]
    with pytest.raises(MetricWeightsError, match="not found in .*lord_metrics"):
        LoRDImageQuality.execute(u8.float() / 255, TINY_CLIP, "missing.pt", "cat")


def test_image_metrics_node(metrics_folder, tmp_path):
    from PIL import Image

    import folder_paths

    from comfyui_lord.nodes.metrics import LoRDImageMetrics

    ref = tmp_path / "input" / "refs"
    ref.mkdir(parents=True)
    for i, im in enumerate(_images(3, 34, 30, seed=10)):
        Image.fromarray(im.numpy()).save(ref / f"{i}.png")
    (ref / "notes.txt").write_text("not an image")
    generated = _images(3, 32, 32, seed=11)
    import comfy.model_management as mm
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    try:
        out = LoRDImageMetrics.execute(generated.float() / 255, "refs", f"clip:{TINY_CLIP}", "tiny_clip.pt", 1000, 5)
    finally:
        folder_paths.set_input_directory(old_input)
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen == [(3, 6), (6, 6)]  # one bar over generated + reference images

    def cancel_at_first_update(value, total, preview, node_id=None):
        seen.append(value)
        mm.interrupt_current_processing(True)

    seen.clear()
    comfy.utils.set_progress_bar_global_hook(cancel_at_first_update)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            LoRDImageMetrics.execute(generated.float() / 255, str(ref), f"clip:{TINY_CLIP}", "tiny_clip.pt", 1000, 5)
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen == [3]  # Cancel stops after the batch in flight, before the reference images
    fd, kid, kid_std, report = out.args
    rep = json.loads(report)
    fx = MM.load_feature_extractor(f"clip:{TINY_CLIP}", metrics_folder / "tiny_clip.pt")
    reference = [torch.from_numpy(np.asarray(Image.open(ref / f"{i}.png"))) for i in range(3)]
    f_gen, f_ref = fx.features(generated), fx.features(reference)
    assert fd == pytest.approx(M.frechet_distance(f_gen, f_ref), rel=1e-6)
    assert kid == pytest.approx(M.kernel_distance(f_gen, f_ref, subsets=5, subset_size=3)["mean"], rel=1e-6, abs=1e-9)
    assert rep["fd"]["label"] == f"FD (clip:{TINY_CLIP})" and "FID" not in report
    assert rep["reference"]["images"] == 3 and rep["generated"] == 3 and rep["kid"]["subset_size"] == 3
    # Inception weights: FID / KID (absolute folder path)
    out = LoRDImageMetrics.execute(generated.float() / 255, str(ref), "inception-v3", "pt_inception.pth", 1000, 2)
    rep = json.loads(out.args[3])
    assert rep["fd"]["label"] == "FID" and rep["kid"]["label"] == "KID" and math.isfinite(out.args[0])
    assert "FID" in out.ui.as_dict()["text"][0]
    with pytest.raises(MetricWeightsError, match="evil.pth"):
        (metrics_folder / "evil.pth").write_bytes(pickle.dumps({"x": _NotATensor()}))
        LoRDImageMetrics.execute(generated.float() / 255, str(ref), "inception-v3", "evil.pth", 1000, 2)
    with pytest.raises(ValueError, match="reference_folder 'nowhere' not found"):
        LoRDImageMetrics.execute(generated.float() / 255, "nowhere", "inception-v3", "pt_inception.pth", 1000, 2)


def test_image_level_conversions():
    from lord_ops.images import image_to_uint8, to_unit

    u8 = _images(2, 5, 4, seed=12)
    floats = to_unit(u8)
    assert floats.dtype == torch.float32 and float(floats.max()) <= 1.0
    assert torch.equal(image_to_uint8(floats), u8)
    rgba = torch.cat([floats, torch.ones(2, 5, 4, 1)], dim=-1)
    assert torch.equal(image_to_uint8(rgba + 0.4 / 255), u8)  # alpha dropped, rounded to the nearest level


def test_projected_frechet_distance_uses_the_references_principal_axes():
    """FD on the reference's first k principal axes equals FD of the hand-projected features, the
    explained share is the top-k variance share, and in few dimensions two samples of one Gaussian
    come out closer than in the full space (the small-sample bias the projection avoids)."""
    import torch

    from lord_ops.metrics import frechet_distance, principal_axes, projected_frechet_distance

    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(3.0, 0.2, 32, dtype=torch.float64)
    reference = torch.randn(120, 32, generator=g, dtype=torch.float64) * scales
    sample = torch.randn(40, 32, generator=g, dtype=torch.float64) * scales
    mean, axes, explained = principal_axes(reference, 4)
    centred = reference - reference.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
    assert explained == pytest.approx(float(eig[:4].sum() / eig.sum()), rel=1e-6)
    assert torch.allclose(axes.T @ axes, torch.eye(4, dtype=torch.float64), atol=1e-10)
    out = projected_frechet_distance(sample, reference, 4)
    by_hand = frechet_distance((sample - mean) @ axes, (reference - mean) @ axes)
    assert out["value"] == pytest.approx(by_hand, rel=1e-9) and out["dims"] == 4
    assert out["value"] < frechet_distance(sample, reference)
    with pytest.raises(ValueError, match="dims must be"):
        principal_axes(reference[:3], 4)


def test_pattern_correlation_against_numpy_pearson():
    """Per image, numpy's Pearson correlation of the grey image with the grey pattern; +1 / -1 for the
    pattern and its negative; layouts [1, 3, H, W] and [H, W] give the same answer."""
    from lord_ops.attacks import high_contrast_target

    rng = np.random.default_rng(0)
    pattern = high_contrast_target(16, 16)
    images = torch.from_numpy(rng.random((3, 16, 16, 3)))
    images[0] = pattern[0].permute(1, 2, 0)
    images[1] = 1 - pattern[0].permute(1, 2, 0)
    got = M.pattern_correlation(images, pattern)
    grey_p = pattern[0].mean(0).numpy().ravel()
    want = [np.corrcoef(images[i].mean(-1).numpy().ravel(), grey_p)[0, 1] for i in range(3)]
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert got[:2].tolist() == pytest.approx([1.0, -1.0])
    assert M.pattern_correlation(images, pattern[0].mean(0)).tolist() == pytest.approx(want, abs=1e-9)
    assert M.pattern_correlation(torch.full((1, 16, 16, 3), 0.5), pattern).tolist() == [0.0]  # flat: 0, not NaN
    with pytest.raises(ValueError, match="resize the target"):
        M.pattern_correlation(images, high_contrast_target(32, 32))


def test_radial_spectrum_and_high_frequency_distance():
    """A pure cosine's power lands in its radius bin; a blurred set has less high-frequency power than
    white noise (negative signed distance), a set has distance 0 to itself."""
    n = 32
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    wave = (0.5 + 0.4 * torch.cos(2 * math.pi * 6 * x / n)).expand(2, n, n)
    spectrum = M.radial_log_spectrum(wave)
    assert spectrum.shape == (n // 2,)
    assert int(spectrum.argmax()) == 6
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, n, n, 3, generator=g, dtype=torch.float64)
    blurred = torch.nn.functional.avg_pool2d(noise.permute(0, 3, 1, 2), 5, 1, 2).permute(0, 2, 3, 1)
    d = M.high_frequency_distance(blurred, noise)
    assert d["bins"] == [4, 16] and d["signed"] < -0.5 and d["value"] == pytest.approx(-d["signed"])
    assert M.high_frequency_distance(noise, noise)["value"] == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        M.high_frequency_distance(noise, noise[:, :16, :16])
