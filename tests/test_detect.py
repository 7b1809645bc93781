"""LoRD Detect and the gate-map helpers, in-process on the SD15-geometry checkpoint."""
import json

import pytest
import torch

import comfy.sd

from lord_ops import detect
from lord_ops.comfy import patch
from comfyui_lord.nodes.detect import LoRDDetect


def test_grid_matching_and_aggregation():
    records = [
        ("a", torch.full((2, 64, 1), 0.25)),          # 8x8 level
        ("b", torch.full((2, 16, 1), 0.75)),          # 4x4 level
        ("c", torch.full((2, 77, 1), 1.0)),           # text tokens: no grid, skipped
        ("d", torch.full((2, 1, 8, 8), 0.5)),         # a conv gate map
        ("e", torch.full((1, 64, 1), 0.0)), ("e", torch.full((1, 64, 1), 1.0)),  # a split batch
    ]
    maps = detect.gate_maps(records, (8, 8))
    assert set(maps) == {"a", "b", "d", "e"} and maps["b"].shape == (2, 1, 4, 4)
    assert torch.equal(maps["e"][:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    scores = detect.adversarial_scores(maps)
    torch.testing.assert_close(scores, torch.tensor([(0.25 + 0.75 + 0.5 + 0.0) / 4, (0.25 + 0.75 + 0.5 + 1.0) / 4]))
    heat = detect.gate_heatmap(maps, (64, 48))
    assert heat.shape == (2, 64, 48)
    rgb = detect.colorize(heat)
    assert rgb.shape == (2, 64, 48, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert detect.colorize(torch.zeros(1, 1, 1)).sum() < detect.colorize(torch.ones(1, 1, 1)).sum()
    assert set(detect.gate_maps(records, (8, 8), spatial_names={"a"})) == {"a"}
    with pytest.raises(ValueError, match="no image-fed"):
        detect.adversarial_scores({})


@pytest.fixture(scope="module")
def loaded(sd15_checkpoint):
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    return model, vae, cond


def test_detect_node_scores_and_heatmap(loaded):
    model, vae, cond = loaded
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=3)
    for w in lord.targets.values():
        w.gate_w2.mul_(40)  # a sharper untrained gate, so images differ visibly
    lorded = patch.apply_lord(model, lord)
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 70).reshape(1, 70, 1, 1).expand(1, 70, 58, 3).contiguous()
    noisy = (smooth + 0.3 * torch.randn(1, 70, 58, 3, generator=g)).clamp(0, 1)
    images = torch.cat([smooth, noisy])  # odd sizes: cropped to the VAE block for encoding
    out = LoRDDetect.execute(lorded, vae, images, cond, 200, 0)
    heatmap, mask, score, report = out.args
    assert heatmap.shape == (2, 70, 58, 3) and mask.shape == (2, 70, 58)
    rep = json.loads(report)
    assert len(rep["scores"]) == 2 and all(0 <= s <= 1 for s in rep["scores"])
    assert rep["scores"][0] != rep["scores"][1]
    assert abs(score - sum(rep["scores"]) / 2) < 1e-5
    assert not any(name.endswith(("attn2_to_k", "attn2_to_v")) for name in rep["layers"])
    # 3 transformer blocks x (attn1 q/k/v/out + attn2 q/out): the image-fed projections
    assert len(rep["layers"]) == 3 * 6
    # same seed -> same result; the MODEL given to Detect is not modified
    assert LoRDDetect.execute(lorded, vae, images, cond, 200, 0).args[3] == report
    assert all(inj.recorder is None for _, inj in patch.lord_injections(lorded))


def test_detect_needs_a_lord(loaded):
    model, vae, cond = loaded
    with pytest.raises(ValueError, match="no LoRD applied"):
        LoRDDetect.execute(model, vae, torch.zeros(1, 64, 64, 3), cond, 200, 0)


@pytest.mark.parametrize("implementation", ["fused", "plain"])
def test_detect_builds_no_autograd_graph(loaded, implementation):
    """Detect called with gradients enabled (the runner's detect stage, a script) records its gates
    without an autograd graph: no returned tensor requires grad, no recorded gate has a grad_fn, and
    reading a score as a Python float raises no requires_grad-to-scalar warning, and autograd saves
    no tensor for backward (the VAE encode and the UNet pass included)."""
    import warnings

    from lord_ops.comfy import detection

    model, vae, cond = loaded
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=3)
    lorded = patch.apply_lord(model, lord, implementation=implementation)
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    recorded = []
    real = detection.record_gates

    def spy(*args, **kwargs):
        records, spatial = real(*args, **kwargs)
        recorded.extend(records)
        return records, spatial

    saved = []  # autograd saves tensors for backward only while it builds a graph

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad=True to a scalar")
        with pytest.MonkeyPatch.context() as mp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mp.setattr(detection, "record_gates", spy)
            found = detection.detect(lorded, vae, images, cond, 200, 0)
        float(found.scores[0])
    assert not saved, f"detect built an autograd graph ({len(saved)} tensors saved for backward)"
    assert recorded and all(lam.grad_fn is None and not lam.requires_grad for _, lam in recorded)
    assert not found.scores.requires_grad and not found.heat.requires_grad
    assert not any(m.requires_grad for m in found.maps.values())
    assert torch.is_grad_enabled()  # the caller's grad mode is restored
