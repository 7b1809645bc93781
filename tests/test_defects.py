"""Smaller defects from review (issue 8, section 4): the trainers' seed widget, save-name checks."""
import json
from pathlib import Path

import pytest

from lord_ops.comfy import files
from comfyui_lord.nodes import train as train_nodes
from tools import workflow_api

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"LoRDTrainStage1": train_nodes.LoRDTrainStage1, "LoRDTrainStage2": train_nodes.LoRDTrainStage2}


@pytest.mark.parametrize("node_id", sorted(TRAINERS))
def test_trainer_seed_has_no_control_after_generate(node_id):
    """The frontend adds a control widget (default "randomize") to an INT named ``seed`` unless the
    spec says ``control_after_generate: false``; a randomized seed makes a re-queued run (after
    Cancel) a different run instead of a resume."""
    info = TRAINERS[node_id].GET_NODE_INFO_V1()
    spec = info["input"]["required"]["seed"]
    assert spec[1].get("control_after_generate") is False
    assert workflow_api.control_values_after("seed", spec) == 0


@pytest.mark.parametrize("workflow", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_shipped_trainer_widget_values_match_the_nodes(workflow):
    """Every trainer node in a shipped workflow has exactly one saved value per widget (no control
    value after ``seed``), and the values land on the right widgets."""
    nodes = [n for n in json.loads(workflow.read_text())["nodes"] if n["type"] in TRAINERS]
    for node in nodes:
        info = TRAINERS[node["type"]].GET_NODE_INFO_V1()
        widgets = workflow_api.widget_inputs(info)
        assert len(node["widgets_values"]) == sum(1 + extra for _, _, extra in widgets)
        values = workflow_api.widget_values(node, info)
        assert isinstance(values["seed"], int) and isinstance(values["checkpoint_every"], int)
        assert values["run_name"].startswith("lord_stage")
        assert "fixed" not in node["widgets_values"]


@pytest.mark.parametrize("prefix", ["C:foo", "C:\\x\\lord", "c:/x", "D:", "sub/C:evil", "x:stream", "..", "a/../b",
                                    "..\\b", "", "  "])
def test_free_name_refuses_names_outside_the_folder(tmp_path, prefix):
    with pytest.raises(ValueError, match="not a usable file name"):
        files.free_name(str(tmp_path), prefix, False)


def test_free_name_keeps_plain_names_and_numbers_existing_ones(tmp_path):
    assert files.free_name(str(tmp_path), "lord_stage1", False) == str(tmp_path / "lord_stage1.safetensors")
    assert files.free_name(str(tmp_path), "\\mine\\x.safetensors", False) == str(tmp_path / "mine" / "x.safetensors")
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert files.free_name(str(tmp_path), "a", False) == str(tmp_path / "a_00001.safetensors")
    assert files.free_name(str(tmp_path), "a", True) == str(tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------------------
# v-prediction models (SD 2.x 768-v): the eps loss through sigma space vs the native v loss

def tiny_v_model(seed=0):
    """A tiny SD2.x-family model loaded as v-prediction, the way ComfyUI loads a 768-v checkpoint."""
    import torch

    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from tools import tiny

    cfg = dict(tiny.family_unet_config("sd2"), dtype=torch.float32)
    model_config = comfy.supported_models.SD20(cfg)
    model_config.unet_config.update({k: v for k, v in cfg.items() if k in ("num_heads", "num_head_channels")})
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                           device=torch.device("cpu"))
        tiny.init_module_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_v_prediction_loss_identity_on_a_tiny_v_model():
    """||v_hat - v||^2 = ||eps_hat - eps||^2 / a_t: the eps error the sigma-space conversion gives,
    weighted by denoising_loss(prediction="v"), is exactly the model's native v loss (computed from
    the raw UNet output); unweighted it is not (the old behaviour)."""
    import torch

    import comfy.model_management as mm

    from lord_ops.comfy import grad, patch
    from lord_ops.diffusion import add_noise, denoising_loss, loss_weight

    mp = tiny_v_model()
    assert patch.prediction_type(mp) == "v"
    mm.load_models_gpu([mp])
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 64, generator=g)
    z = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([5, 300, 700, 999])
    acp = grad.alphas_cumprod(mp)
    predict = grad.noise_predictor(mp, [[ctx, {}]], (64, 64))
    with torch.no_grad():
        eps_loss = denoising_loss(predict, z, t, noise, acp)
        v_loss = denoising_loss(predict, z, t, noise, acp, prediction="v")
        # the native objective, straight from the UNet: its raw output is v_hat at z_t
        z_t = add_noise(z, noise, t, acp)
        v_hat = mp.model.diffusion_model(z_t, timesteps=t.float(), context=ctx.expand(4, -1, -1)).float()
        a = acp[t].reshape(-1, 1, 1, 1)
        v = a.sqrt() * noise - (1 - a).sqrt() * z
        native = (v_hat - v).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(v_loss, native, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(eps_loss, native * acp[t], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(eps_loss, native, rtol=1e-2)  # the unweighted eps loss is a different objective
    w = loss_weight("v", t, acp)
    snr = acp[t] / (1 - acp[t])
    torch.testing.assert_close(w, (snr + 1) / snr)  # 1/a = (SNR + 1) / SNR, not SNR + 1
    assert float(loss_weight("v", torch.tensor([999]), acp)) > 100  # noisiest step: ~200x in SD2's schedule
    mm.unload_all_models()


def test_prediction_type_follows_model_sampling(tiny_model):
    import pytest as _pytest

    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from lord_ops.comfy import patch

    assert patch.prediction_type(tiny_model) == "eps"
    for sampling, expected in (("v_prediction", "v"), ("x0", "x0"), ("eps", "eps")):
        (patched,) = ModelSamplingDiscrete().patch(tiny_model, sampling, False)
        assert patch.prediction_type(patched) == expected
    (flow,) = ModelSamplingDiscrete().patch(tiny_model, "img_to_img", False)
    with _pytest.raises(ValueError, match="not a discrete eps/v/x0 schedule"):
        patch.prediction_type(flow)


@pytest.mark.parametrize("v_model", [True, False], ids=["v", "eps"])
def test_stage2_trains_with_the_models_native_loss(v_model, tiny_model, monkeypatch):
    """The Stage-2 glue passes the MODEL's prediction type to the loss (v-loss for a v model)."""
    import torch

    from lord_ops import diffusion
    from lord_ops.comfy import data as data_mod, stages as CT
    from lord_ops.train_config import TrainConfig

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("prediction", args[5] if len(args) > 5 else "eps"))
        return diffusion.denoising_loss(*args, **kwargs)

    monkeypatch.setattr(CT, "denoising_loss", spy)
    model = tiny_v_model() if v_model else tiny_model
    g = torch.Generator().manual_seed(1)
    data = data_mod.TrainingData([], [[[torch.randn(1, 77, 64, generator=g), {}]]], [], latents=[torch.randn(4, 8, 8, generator=g)])
    config = TrainConfig(stage="stage2", mode="plain", steps=2, learning_rate=1e-4, checkpoint_every=100)
    with torch.inference_mode():
        out = CT.train_stage2(model, None, data, config)
    assert seen and set(seen) == {"v" if v_model else "eps"}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in out.result.history)


def test_loss_weighting_is_explicit_and_shared_by_stage1_losses():
    """denoising_loss / paired_losses: prediction="v" multiplies each sample by 1/a_t, "eps" is
    unchanged, and an unknown target is refused."""
    import torch

    from lord_ops import trainer as T
    from lord_ops.diffusion import denoising_loss

    g = torch.Generator().manual_seed(3)
    acp = torch.linspace(0.999, 0.005, 1000)
    z, noise, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g), torch.tensor([0, 500, 999])
    predict = lambda zt, tt: 0.5 * zt  # noqa: E731  any predictor
    eps = denoising_loss(predict, z, t, noise, acp)
    torch.testing.assert_close(denoising_loss(predict, z, t, noise, acp, prediction="v"), eps / acp[t])
    torch.testing.assert_close(denoising_loss(predict, z, t, noise, acp, prediction="x0"), eps * (1 - acp[t]) / acp[t])
    with pytest.raises(ValueError, match="prediction must be one of"):
        denoising_loss(predict, z, t, noise, acp, prediction="flow")
    pair = T.PairedBatch(z, z * 0.9, t, noise)
    total_v, parts_v = T.paired_losses(predict, None, pair, T.PairedLoss(acp, 1.0, 0.0, prediction="v"))
    total_e, parts_e = T.paired_losses(predict, None, pair, T.PairedLoss(acp, 1.0, 0.0))
    torch.testing.assert_close(parts_v["clean"], parts_e["clean"] / acp[t])
    torch.testing.assert_close(total_v, total_e / acp[t])


def test_early_backward_of_the_clean_term_gives_the_same_loss_and_gradients():
    """Issue 13: paired_losses(backward=...) back-propagates the clean term (its denoising loss + half the
    gate BCE) right after the clean pass; the value and the accumulated gradients of every LoRD
    parameter equal one backward of the whole Eq. 7 sum."""
    import torch

    from lord_ops import trainer as T
    from lord_ops.format import LoRDFile
    from lord_ops.layer import init_lord_weights

    g = torch.Generator().manual_seed(5)
    conv_in, conv_out = torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3, padding=1)
    net = torch.nn.Sequential(conv_in, torch.nn.SiLU(), conv_out).requires_grad_(False)
    lord = LoRDFile({"in": init_lord_weights(4, 16, 2, kernel_size=(3, 3), generator=g, random_up=0.2),
                     "out": init_lord_weights(16, 4, 2, kernel_size=(3, 3), generator=g, random_up=0.2)})
    acp = torch.linspace(0.999, 0.005, 1000)
    z, za, noise = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([100, 700])
    results = []
    for early in (False, True):
        adapter = T.TrainableLoRD(lord)
        with T.AdapterHooks({"in": conv_in, "out": conv_out}, adapter) as hooks:
            calls = []
            backward = (lambda part: (calls.append(1), part.mean().backward())) if early else None
            total, parts = T.paired_losses(lambda zt, tt: net(zt), hooks, T.PairedBatch(z, za, t, noise),
                                           T.PairedLoss(acp, 0.7, 0.5, {"in", "out"}), backward=backward)
            total.mean().backward()
        assert len(calls) == (1 if early else 0)
        results.append((total.detach(), parts, {n: p.grad.clone() for n, p in adapter.named_parameters()
                                                if p.grad is not None}))
    (t1, p1, g1), (t2, p2, g2) = results
    torch.testing.assert_close(t2, t1)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k])
    assert g1.keys() == g2.keys() and any("gate" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)
