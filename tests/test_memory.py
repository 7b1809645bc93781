"""The memory check before training (issue 22): the estimate's arithmetic, the measured probe on the
random SD15-geometry checkpoint (real ComfyUI), the refusal and its message, the skip variable, and
the trainer nodes surfacing the refusal before any perturbation is computed."""
from __future__ import annotations

import json

import pytest
import torch

import comfy.sd

from lord_ops import trainer as T
from lord_ops.comfy import data as data_mod, memory as cmem, stages as CT
from lord_ops.comfy.patch import init_lord_for_model
from lord_ops.memory import (ACTIVATION_FACTOR, GIB, MIB, OPTIMIZER_COPIES, SKIP_ENV, WORKSPACE, AllocationPeak,
                             NotEnoughMemory, TrainingMemory, available_memory)
from lord_ops.train_config import TrainConfig


@pytest.fixture(scope="module")
def loaded(sd15_checkpoint):
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    return model, clip, vae


def make_data(clip, size, n=2):
    g = torch.Generator().manual_seed(0)
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(f"a photo of sks person, view {i}")) for i in range(n)]
    images = [torch.round(torch.rand(3, size, size, generator=g) * 255) / 255 for _ in range(n)]
    return data_mod.TrainingData(images, conds, [f"view {i}" for i in range(n)])


def stage1_probe(model, vae, data, config, **kw):
    lord0 = init_lord_for_model(model, config.targets, config.rank, config.alpha, config.gate_hidden,
                                config.gate_activation, config.seed)
    return dict(make_adapter=lambda: T.TrainableLoRD(lord0), names=sorted(lord0.targets), passes=2, latent_copies=2,
                stage="Stage-1", **kw)


# ----------------------------------------------------------------------------------------------
# the arithmetic (hand numbers)


def hand(**over) -> TrainingMemory:
    base = dict(device="cpu", stage="Stage-1", batch=4, resident_bytes=GIB, adapter_bytes=10 * MIB,
                trainable_bytes=8 * MIB, activation_bytes=100 * MIB, data_bytes=MIB, available_bytes=None)
    base.update(over)
    return TrainingMemory(**base)


def test_estimate_arithmetic_on_hand_numbers():
    m = hand()
    f, ws = ACTIVATION_FACTOR["cpu"], WORKSPACE["cpu"]
    assert m.optimizer_bytes == OPTIMIZER_COPIES * 8 * MIB == 24 * MIB
    assert m.activations() == int(f * 4 * 100 * MIB) and m.activations(1) == int(f * 100 * MIB)
    fixed = 10 * MIB + 24 * MIB + MIB + ws
    assert m.fixed_bytes() == fixed and m.needed() == fixed + int(f * 400 * MIB)
    assert m.total() == GIB + m.needed()
    # DDP holds every pass's graph: twice the activations; the online attack counts where it is larger
    assert hand(passes_alive=2).activations() == int(f * 800 * MIB)
    assert hand(attack_bytes=GIB).activations() == int(f * GIB)
    assert hand(attack_bytes=MIB).activations() == m.activations()
    # what fits: exactly batch 2
    two = dataclass_available(m, m.needed(2))
    assert two.fits(2) and not two.fits(3) and not two.fits() and two.largest_batch() == 2
    assert dataclass_available(m, m.needed(1) - 1).largest_batch() == 0
    assert dataclass_available(m, 10 ** 15).largest_batch() == 1024  # capped at the widget's maximum
    # not measured, or nothing known about the device: never refused
    assert hand(activation_bytes=None, available_bytes=1).fits() and hand().fits()
    assert hand(activation_bytes=None, method="not measured: x").summary().endswith("not estimated (not measured: x)")
    d = two.to_dict()
    assert d["needed_bytes"] == m.needed() and d["largest_batch"] == 2 and d["fits"] is False
    assert json.loads(json.dumps(d)) == d  # the run report's entry is plain JSON


def dataclass_available(m: TrainingMemory, available: int) -> TrainingMemory:
    import dataclasses

    return dataclasses.replace(m, available_bytes=available, available_from="given")


def test_refusal_message_names_estimate_available_and_fixes():
    m = hand()
    m = dataclass_available(m, m.needed(2))
    text = m.explain()
    first = text.splitlines()[0]
    assert first.startswith("not enough memory on cpu for this Stage-1 run") and "are available (given)" in first
    assert "activations 0.10 GiB per sample x batch_size 4" in text and "AdamW" in text
    assert "batch_size 2 fits" in text and "grad_accumulation 2" in text  # keeps the effective batch of 4
    assert "gradient_checkpointing on" in text and f"{SKIP_ENV}=1" in text
    assert "gradient_checkpointing on" not in dataclass_available(hand(gradient_checkpointing=True), 1).explain()
    # online perturbations: named where the attack is what does not fit
    online = dataclass_available(hand(batch=1, attack_bytes=GIB, online_perturbations=True), 1)
    assert "online_perturbations off" in online.explain() and "even batch_size 1" not in online.explain()
    assert isinstance(NotEnoughMemory(m), ValueError) and str(NotEnoughMemory(m)) == text


def test_available_memory_and_allocation_peak_on_the_cpu():
    avail, source = available_memory("cpu")
    assert avail is not None and avail > 0 and source
    with AllocationPeak("cpu") as peak:
        x = torch.empty(64 * MIB, dtype=torch.uint8)
        x.fill_(1)
        del x
        y = torch.empty(16 * MIB, dtype=torch.uint8)
        del y
    assert 64 * MIB <= peak.peak_bytes < 66 * MIB, peak.peak_bytes
    assert "profiler" in peak.method
    with AllocationPeak("meta") as other:
        pass
    assert other.peak_bytes is None and "not measured" in other.method


# ----------------------------------------------------------------------------------------------
# the probe on real ComfyUI models


def test_probe_is_positive_and_grows_with_resolution_and_batch(loaded):
    model, clip, vae = loaded
    config = TrainConfig(stage="stage1")
    est = {}
    with torch.inference_mode():  # like the server
        for size, batch in ((32, 1), (64, 1), (64, 2)):
            data = make_data(clip, size)
            est[size, batch] = cmem.probe_training_memory(model, vae, data, config, probe_batch=batch,
                                                          **stage1_probe(model, vae, data, config))
    small, big, pair = est[32, 1], est[64, 1], est[64, 2]
    assert small.activation_bytes > 0 and "profiler" in small.method
    assert big.activation_bytes > 2 * small.activation_bytes  # 4x the pixels
    # the estimate scales a batch-1 probe linearly: a real batch-2 pass costs no more per sample
    assert pair.activation_bytes <= 1.1 * big.activation_bytes
    assert big.activations(2) == int(big.factor * 2 * big.activation_bytes)
    assert big.resident_bytes > 10 * MIB and big.adapter_bytes > 0 and big.trainable_bytes <= big.adapter_bytes
    assert big.data_bytes == 2 * 2 * 4 * 8 * 8 * 4  # 2 items x (clean + perturbed) latents [4, 8, 8] float32
    assert big.available_bytes > 0 and big.fits()


def test_check_refuses_names_the_largest_batch_and_can_be_skipped(loaded, monkeypatch):
    model, clip, vae = loaded
    data = make_data(clip, 32)
    with torch.inference_mode():
        config = TrainConfig(stage="stage1", batch_size=4)
        probe = stage1_probe(model, vae, data, config)
        ok = cmem.check_training_memory(model, vae, data, config, **probe)
        assert ok["fits"] and ok["needed_bytes"] > ok["activations_total_bytes"] > 0
        estimate = TrainingMemory(**{k: ok[k] for k in TrainingMemory.__dataclass_fields__})
        # midway between what batches 2 and 3 need (several MiB apart): robust to the probe's noise
        two, three = estimate.needed(2), estimate.needed(3)
        with pytest.raises(NotEnoughMemory, match="batch_size 2 fits") as err:
            cmem.check_training_memory(model, vae, data, config, available=(two + three) // 2, **probe)
        assert "gradient_checkpointing on" in str(err.value) and SKIP_ENV in str(err.value)
        assert err.value.estimate.largest_batch() == 2
        monkeypatch.setenv(SKIP_ENV, "1")
        assert cmem.check_training_memory(model, vae, data, config, available=1,
                                          **stage1_probe(model, vae, data, config)) == {"skipped": f"{SKIP_ENV} is set"}
        monkeypatch.setenv(SKIP_ENV, "0")
        with pytest.raises(NotEnoughMemory):
            cmem.check_training_memory(model, vae, data, config, available=1, **stage1_probe(model, vae, data, config))


def test_online_perturbations_probe_the_attack(loaded):
    model, clip, vae = loaded
    data = make_data(clip, 32)
    config = TrainConfig(stage="stage1", online_perturbations=True)
    with torch.inference_mode():
        est = cmem.probe_training_memory(model, vae, data, config,
                                         **{**stage1_probe(model, vae, data, config), "online_attack": True,
                                            "latent_copies": 1})
    assert est.attack_bytes > 0 and est.online_perturbations and est.data_bytes == 2 * 4 * 4 * 4 * 4


def tiny_available(monkeypatch):
    """What the device reports, replaced by 1 MiB (our own function; ComfyUI untouched)."""
    monkeypatch.setattr(cmem, "available_memory", lambda device: (MIB, "test: 1 MiB"))


def test_stages_refuse_before_the_perturbations_and_report_the_estimate(loaded, tmp_path, monkeypatch):
    model, clip, vae = loaded
    data = make_data(clip, 32)
    config = TrainConfig(steps=1, checkpoint_every=100)
    with torch.inference_mode():
        out = CT.train_stage1(model, vae, data, config, tmp_path / "cache", evaluate=False)
        assert out.report["memory"]["fits"] and out.report["memory"]["stage"] == "Stage-1"
        assert "memory" not in out.lord.provenance  # a run's file does not depend on the machine's free memory
        s2 = CT.train_stage2(model, vae, data, TrainConfig(stage="stage2", mode="plain", steps=1, checkpoint_every=100),
                             memory_check=False)
        assert s2.report["memory"] == {"skipped": "memory_check=False"}
        tiny_available(monkeypatch)
        with pytest.raises(NotEnoughMemory, match="are available \\(test: 1 MiB\\)"):
            CT.train_stage1(model, vae, data, config, tmp_path / "cache2", evaluate=False)
        assert not (tmp_path / "cache2").exists()  # refused before any perturbation was computed
        with pytest.raises(NotEnoughMemory, match="this Stage-2 run"):
            CT.train_stage2(model, vae, data, TrainConfig(stage="stage2", mode="pgd2_defense", steps=1),
                            tmp_path / "cache3")
        assert not (tmp_path / "cache3").exists()
        monkeypatch.setenv(SKIP_ENV, "1")
        out = CT.train_stage1(model, vae, data, config, tmp_path / "cache4", evaluate=False)
        assert out.report["memory"] == {"skipped": f"{SKIP_ENV} is set"} and len(out.result.history) == 1


def node_widgets(**over):
    base = dict(steps=1, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4, targets="attn",
                training_dtype="fp32", gradient_checkpointing=False, seed=0, checkpoint_every=100, run_name="mem")
    base.update(over)
    return {k: [v] for k, v in base.items()}


def test_trainer_nodes_surface_the_refusal(loaded, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_lord.nodes.train import LoRDTrainStage1, LoRDTrainStage2

    model, clip, vae = loaded
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    data = make_data(clip, 32)
    images = [torch.stack([data.images[i] for i in range(2)]).movedim(1, -1)]
    stage1 = node_widgets(gate_hidden=8, lambda_adv=1.0, lambda_gate=1.0, attack_strength=0.0, attack_step_size=0.0,
                          attack_steps=0, online_perturbations=False, perturbations="pgd_2", heldout_attack_steps=0)
    tiny_available(monkeypatch)
    with torch.inference_mode():
        with pytest.raises(NotEnoughMemory) as err:
            LoRDTrainStage1.execute([model], [vae], images, data.conds, **stage1)
        text = str(err.value)
        assert text.startswith("not enough memory on cpu for this Stage-1 run")
        assert "batch_size 2" in text and "gradient_checkpointing on" in text and SKIP_ENV in text
        assert not (tmp_path / "output" / "lord_training" / "pgd_cache").exists()
        with pytest.raises(NotEnoughMemory, match="this Stage-2 run"):
            LoRDTrainStage2.execute([model], data.conds[:1], vae=[vae], images=images,
                                    **node_widgets(mode="plain", prior_weight=1.0))
