"""Device and dtype discipline: every ComfyUI-managed module (UNet, VAE, CLIP) is loaded by ComfyUI
before the pack runs it, and the training dtype is explicit and recorded.

On the CPU ComfyUI's load and offload devices are the same, so running a module that ComfyUI never
loaded works here and crashes on every GPU (its weights still sit on the offload device). The
:class:`LoadSpy` makes that visible on the CPU: a forward pre-hook on each managed module records a
violation whenever the module runs while no patcher of it is in
``comfy.model_management.current_loaded_models`` -- the state a GPU run needs. Every scenario starts
from ``unload_all_models()``, i.e. a fresh session, like a user's first queue.
"""
from __future__ import annotations

import dataclasses
import json
import traceback
from pathlib import Path

import pytest
import torch

import comfy.model_management as mm
import comfy.sd

from lord_ops import trainer as T
from lord_ops.train_config import TrainConfig
from lord_ops.attacks import AttackConfig
from lord_ops.comfy import data as data_mod, stages as CT, trainable
from lord_ops.comfy.patch import apply_lord, init_lord_for_model
from lord_ops.comfy.protect import protect_images

SIZE = 32


class LoadSpy:
    """Forward pre-hooks that record every run of a managed module whose patcher is not loaded."""

    def __init__(self):
        self.violations: list[str] = []
        self.runs: dict[str, int] = {}
        self._handles = []

    def watch(self, name: str, root: torch.nn.Module, modules) -> None:
        def hook(module, args):
            self.runs[name] = self.runs.get(name, 0) + 1
            loaded = [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is root]
            if not loaded:
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-6:]
                stack = "".join(traceback.format_list(frames))
                self.violations.append(f"{name} ran while ComfyUI had not loaded it (on a GPU its weights would "
                                       f"still be on the offload device):\n{stack}")

        for m in modules:
            self._handles.append(m.register_forward_pre_hook(hook))

    def watch_all(self, model=None, clip=None, vae=None) -> None:
        if model is not None:
            self.watch("UNet", model.model, [model.model.diffusion_model])
        if vae is not None:
            self.watch("VAE", vae.first_stage_model, list(vae.first_stage_model.children()))
        if clip is not None:
            self.watch("CLIP", clip.cond_stage_model, list(clip.cond_stage_model.children()))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check(self, *expected: str) -> None:
        assert not self.violations, f"{len(self.violations)} unloaded use(s); the first:\n{self.violations[0]}"
        for name in expected:
            assert self.runs.get(name), f"{name} never ran: the spy did not see the path it is meant to check"


@pytest.fixture(scope="module")
def loaded(sd15_checkpoint):
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    return model, clip, vae


@pytest.fixture()
def spy(loaded):
    s = LoadSpy()
    model, clip, vae = loaded
    s.watch_all(model, clip, vae)
    yield s
    s.close()


def pictures(n, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.round(torch.rand(3, size, size, generator=g) * 255) / 255 for _ in range(n)]


def make_data(clip, n=2):
    caps = [f"a photo of sks person, view {i}" for i in range(n)]
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in caps]
    return data_mod.TrainingData(pictures(n), conds, caps)


def fresh_session() -> None:
    """What a new ComfyUI session (or another workflow having run) looks like: nothing loaded."""
    mm.unload_all_models()
    assert not mm.current_loaded_models


STEPS = dict(steps=1, checkpoint_every=100, attack_epsilon=16.0, attack_step_size=8.0)


def test_spy_sees_an_unloaded_module(loaded):
    """The check itself can fail: a module run without ``load_models_gpu`` is reported."""
    model, clip, vae = loaded
    spy = LoadSpy()
    spy.watch_all(vae=vae)
    try:
        fresh_session()
        with torch.no_grad():
            vae.first_stage_model.encode(torch.zeros(1, 3, SIZE, SIZE))
        assert spy.violations and "VAE ran while ComfyUI had not loaded it" in spy.violations[0]
        spy.violations.clear()
        vae.encode(torch.zeros(1, SIZE, SIZE, 3))  # ComfyUI's own call loads first
        spy.check("VAE")
    finally:
        spy.close()


def test_stage2_from_images_in_a_fresh_session(loaded, spy, tmp_path):
    model, clip, vae = loaded
    data = make_data(clip)
    data.class_images, data.class_conds = pictures(1, seed=3), [data.conds[0]]
    fresh_session()
    with torch.inference_mode():  # like the server
        CT.train_stage2(model, vae, data, TrainConfig(stage="stage2", mode="plain", **STEPS))
    spy.check("VAE", "UNet")


def test_stage2_lord_mode_and_pgd2_defense(loaded, spy, tmp_path):
    model, clip, vae = loaded
    data = make_data(clip)
    lord = init_lord_for_model(model, "attn", 2, None, 8, "silu", 0)
    with torch.inference_mode():
        defended = apply_lord(model, lord)
        fresh_session()
        CT.train_stage2(defended, vae, data, TrainConfig(stage="stage2", mode="lord", **STEPS))
        fresh_session()
        CT.train_stage2(model, vae, data, TrainConfig(stage="stage2", mode="pgd2_defense", **STEPS),
                        cache_dir=tmp_path / "cache")
    spy.check("VAE", "UNet")


@pytest.mark.parametrize("online", [False, True], ids=["cached", "online"])
def test_stage1_in_a_fresh_session(loaded, spy, tmp_path, online):
    model, clip, vae = loaded
    data = make_data(clip)
    fresh_session()
    with torch.inference_mode():
        CT.train_stage1(model, vae, data, TrainConfig(online_perturbations=online, **STEPS), tmp_path / "cache")
    spy.check("VAE", "UNet")


@pytest.mark.parametrize("method", ["pgd", "ace", "photoguard"])
def test_protect_in_a_fresh_session(loaded, spy, method):
    model, clip, vae = loaded
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    image = torch.stack(pictures(1)).movedim(1, -1)
    fresh_session()
    with torch.inference_mode():
        protect_images(model, vae, cond, image, AttackConfig(method=method, epsilon=8.0, step_size=2.0, steps=1))
    spy.check("VAE", *(["UNet"] if method != "photoguard" else []))


def test_text_to_image_in_a_fresh_session(loaded, spy):
    """Generation (the experiment runner's sampling) through ComfyUI's own CLIP encode, sampler and VAE
    decode, which load for themselves."""
    from lord_ops.comfy.generate import SamplingConfig, text_to_image

    model, clip, vae = loaded
    fresh_session()
    text_to_image(model, clip, vae, "a photo of a person", [0, 1], SamplingConfig(steps=1, width=SIZE, height=SIZE))
    spy.check("CLIP", "UNet", "VAE")


@pytest.mark.parametrize("entry", ["diffpure", "node"])
def test_diffpure_in_a_fresh_session(loaded, spy, entry):
    from lord_ops.comfy.generate import SamplingConfig, diffpure
    from comfyui_lord.nodes.purify import LoRDPurify

    model, clip, vae = loaded
    images = (torch.stack(pictures(1, size=SIZE - 3)).movedim(1, -1) * 255).round().to(torch.uint8)
    if entry == "diffpure":
        fresh_session()
        diffpure(model, clip, vae, images, "a photo of a person", 0.5, 0, SamplingConfig(steps=1))
        spy.check("CLIP", "UNet", "VAE")
    else:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
        fresh_session()
        with torch.inference_mode():  # like the server
            LoRDPurify.execute(images.float() / 255, "diffpure", 75, 0.5, 1, 7.5, 0, model=model, vae=vae, positive=cond)
        spy.check("UNet", "VAE")


def _write_folder(folder: Path, n=2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pictures(n)):
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks person, view {i}")
    return folder


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_cli_in_process(sd15_checkpoint, tmp_path, monkeypatch, stage):
    """``python -m training.train`` run in this process, its models watched from the moment they load."""
    import training.train as cli

    spy = LoadSpy()
    original = cli.load_checkpoint_models

    def watched(*args, **kwargs):
        model, clip, vae = original(*args, **kwargs)
        spy.watch_all(model, clip, vae)
        fresh_session()
        return model, clip, vae

    monkeypatch.setattr(cli, "load_checkpoint_models", watched)
    data = _write_folder(tmp_path / "data")
    extra = ["--mode", "plain"] if stage == "stage2" else []
    try:
        rc = cli.main([stage, "--checkpoint", str(sd15_checkpoint), "--data", str(data), "--output", str(tmp_path / "out"),
                       "--quiet", "--steps", "1", "--set", "attack_epsilon=16", "--set", "attack_step_size=8", *extra])
        log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
        assert rc == 0, log[-1]
        spy.check("VAE", "UNet", "CLIP")
    finally:
        spy.close()


# ----------------------------------------------------------------------------------------------
# dtype: the config's compute dtype whatever dtype ComfyUI stored the weights in


@pytest.fixture(scope="module")
def fp16_weights(sd15_checkpoint):
    """The same checkpoint as CheckpointLoaderSimple gives it on a GPU: UNet weights stored in fp16 and
    computed in fp16 (on the CPU ComfyUI would add a manual cast to fp32, hiding the difference)."""
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), model_options={"dtype": torch.float16})
    assert model.model_dtype() == torch.float16
    gpu_like = model.clone()
    gpu_like.set_model_compute_dtype(torch.float16)
    return gpu_like, clip, vae


def test_fp32_config_trains_in_fp32_on_fp16_weights(sd15_checkpoint, fp16_weights, tmp_path):
    """fp16 weights (the nodes on a GPU) and fp32 weights (what the CLI used to load) train alike for
    the same config: an fp16 checkpoint upcasts exactly, so computing in fp32 gives the same LoRA."""
    model32, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), model_options={"dtype": torch.float32})
    model16 = fp16_weights[0]
    assert model32.model_dtype() == torch.float32
    data = make_data(clip)
    config = TrainConfig(stage="stage2", mode="plain", steps=2, learning_rate=3e-3, checkpoint_every=1)
    with torch.inference_mode():
        a = CT.train_stage2(model32, vae, data, config)
        b = CT.train_stage2(model16, vae, data, config, checkpoint_path=tmp_path / "run.pt")
    for name, (down, up, _) in a.lora.items():
        torch.testing.assert_close(b.lora[name][0], down, rtol=1e-4, atol=1e-6)  # fp16 compute: ~1e-2 off
        torch.testing.assert_close(b.lora[name][1], up, rtol=1e-4, atol=1e-6)
    assert [h["loss"] for h in a.result.history] == pytest.approx([h["loss"] for h in b.result.history], rel=1e-4)
    assert a.report["provenance"]["effective_dtype"] == {"compute": "fp32", "weights": "fp32", "grad_scaler": False}
    assert b.report["provenance"]["effective_dtype"] == {"compute": "fp32", "weights": "fp16", "grad_scaler": False}
    # the effective dtype is part of what a checkpoint was trained on
    assert T.load_checkpoint(tmp_path / "run.pt")["identity"]["dtype"] == "compute fp32, weights fp16"
    with torch.inference_mode(), pytest.raises(ValueError, match="different .*dtype"):
        CT.train_stage2(model32, vae, data, dataclasses.replace(config, steps=3), checkpoint_path=tmp_path / "run.pt")


def test_fp16_compute_scales_the_loss(fp16_weights, tmp_path):
    model16, clip, vae = fp16_weights
    data = make_data(clip)
    config = TrainConfig(stage="stage2", mode="plain", steps=2, learning_rate=3e-3, checkpoint_every=1, dtype="fp16")
    with torch.inference_mode():
        out = CT.train_stage2(model16, vae, data, config, checkpoint_path=tmp_path / "run.pt")
    assert out.report["provenance"]["effective_dtype"] == {"compute": "fp16", "weights": "fp16", "grad_scaler": True}
    state = T.load_checkpoint(tmp_path / "run.pt")
    assert state["grad_scaler"] and state["grad_scaler"]["scale"] > 1
    assert state["identity"]["dtype"] == "compute fp16, weights fp16, grad scaler"
    assert any(up.abs().sum() > 0 for _, up, _ in out.lora.values())


# ----------------------------------------------------------------------------------------------
# what the gradient paths take from the MODEL and from ComfyUI


def test_protect_computes_gradients_in_fp32_on_an_fp16_model(fp16_weights):
    """A GPU MODEL computes in fp16; the fixed-model attacks back-propagate through a float32-compute
    clone (no loss scaling exists for them), and the MODEL passed in keeps its fp16 compute."""
    model16, clip, vae = fp16_weights
    seen = []
    handle = model16.model.diffusion_model.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
        img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
        protect_images(model16, vae, cond, img, AttackConfig("pgd", 4.0, 1.0, 1, seed=0))
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.float32}, seen
    assert trainable.effective_dtype(model16)["compute"] == "fp16"


def test_detect_in_a_fresh_session(loaded, spy):
    """Detect runs through ComfyUI's own VAE.encode and sampler, which load for themselves."""
    from comfyui_lord.nodes.detect import LoRDDetect

    model, clip, vae = loaded
    lord = init_lord_for_model(model, "attn", 2, None, 8, "silu", 0)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    with torch.inference_mode():
        defended = apply_lord(model, lord)
        fresh_session()
        out = LoRDDetect.execute(defended, vae, torch.stack(pictures(1)).movedim(1, -1), cond, 200, 0)
    assert 0.0 <= out.args[2] <= 1.0
    spy.check("VAE", "UNet")


def test_model_patches_reach_the_gradient_paths(loaded):
    """An attention patch on the MODEL (transformer_options) is applied by training and the attacks,
    with the sampler's keys; a model_function_wrapper, which only the sampler can apply, is refused."""
    model, clip, vae = loaded
    seen = []

    def attn1_patch(q, k, v, extra_options):
        seen.append((extra_options.get("sigmas") is not None, torch.is_grad_enabled()))
        return q, k, v

    patched = model.clone()
    patched.set_model_attn1_patch(attn1_patch)
    data = make_data(clip)
    with torch.inference_mode():
        CT.train_stage2(patched, vae, data, TrainConfig(stage="stage2", mode="plain", **STEPS))
        assert seen and all(has_sigmas for has_sigmas, _ in seen) and any(grad for _, grad in seen)
        seen.clear()
        protect_images(patched, vae, data.conds[0], torch.stack(pictures(1)).movedim(1, -1),
                       AttackConfig(method="pgd", epsilon=8.0, step_size=2.0, steps=1))
        assert seen
        wrapped = model.clone()
        wrapped.set_model_unet_function_wrapper(lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"]))
        with pytest.raises(ValueError, match="model_function_wrapper"):
            CT.train_stage2(wrapped, vae, data, TrainConfig(stage="stage2", mode="plain", **STEPS))


def test_in_training_is_set_during_gradient_work_where_comfyui_has_it(loaded, monkeypatch):
    """ComfyUI 0.3.75 has no ``in_training``; newer versions read it to pick autograd-safe kernels.
    Where it exists it is True while the UNet runs for training and restored afterwards."""
    model, clip, vae = loaded
    assert not hasattr(mm, "in_training") or mm.in_training is False
    monkeypatch.setattr(mm, "in_training", False, raising=False)
    states = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: states.append(mm.in_training))
    try:
        with torch.inference_mode():
            CT.train_stage2(model, vae, make_data(clip), TrainConfig(stage="stage2", mode="plain", **STEPS))
    finally:
        handle.remove()
    assert states and all(states) and mm.in_training is False


def test_checkpointing_keeps_a_replaced_forward(loaded):
    """Bypass LoRA (newer ComfyUI) replaces ``module.forward`` on the instance; gradient checkpointing
    wraps it and puts it back afterwards instead of deleting it."""
    model = loaded[0]
    layer = model.model.diffusion_model.input_blocks[1][0]
    calls = []
    original = layer.forward

    def replaced(*a, **k):
        calls.append(1)
        return original(*a, **k)

    layer.forward = replaced
    try:
        with trainable.checkpointed_blocks(model.model.diffusion_model, True):
            assert layer.forward is not replaced
        assert layer.forward is replaced
    finally:
        layer.__dict__.pop("forward", None)
