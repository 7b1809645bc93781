"""The lab model (``lab/``): the shipped parts assemble deterministically into a checkpoint that
ComfyUI's stock loader reads as SD15; it samples recognisable garments (the shipped lab classifier
recognises the prompted class far above chance); and ``make demo`` at CI scale runs the evaluation and
every shipped workflow on it, writing a complete report with finite numbers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["clean", "attacking", "pgd2_defense", "jpeg", "diffpure", "lord", "lord_clean"]


@pytest.fixture(scope="module")
def lab_checkpoint(tmp_path_factory):
    from lab.ship import CHECKPOINT_NAME, ensure_checkpoint

    return ensure_checkpoint(tmp_path_factory.mktemp("lab") / CHECKPOINT_NAME)


def test_the_shipped_parts_assemble_deterministically_into_an_sd15_checkpoint(lab_checkpoint):
    import comfy.sd
    import comfy.supported_models
    from safetensors.torch import load_file

    from lab.ship import SHIPPED_PARTS, checkpoint_state_dict, ensure_checkpoint

    again = checkpoint_state_dict(SHIPPED_PARTS)
    on_disk = load_file(str(lab_checkpoint))
    assert sorted(again) == sorted(on_disk)
    assert all(torch.equal(again[k], on_disk[k]) for k in again)
    mtime = lab_checkpoint.stat().st_mtime_ns
    assert ensure_checkpoint(lab_checkpoint) == lab_checkpoint and lab_checkpoint.stat().st_mtime_ns == mtime

    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(lab_checkpoint), output_vae=True, output_clip=True)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert clip is not None and vae is not None
    # 32 px images <-> 4x4x4 latents through ComfyUI's own VAE object
    image = torch.rand(1, 32, 32, 3)
    latent = vae.encode(image)
    assert latent.shape == (1, 4, 4, 4) and torch.isfinite(latent).all()
    assert vae.decode(latent).shape[-3:] == (32, 32, 3)


def test_the_lab_model_samples_the_prompted_class(lab_checkpoint):
    from lab.evaluate import sample_accuracy
    from lab.ship import SHIPPED_CLASSIFIER

    result, images = sample_accuracy(lab_checkpoint, SHIPPED_CLASSIFIER, per_class=4, steps=12, cfg=4.0)
    assert images.shape == (36, 32, 32, 3) and images.dtype == torch.uint8
    assert images.float().std() > 10  # not blank
    print(f"lab model: classifier accuracy on samples of the 9 trained classes {result['accuracy']:.2f} "
          f"{result['per_class']}")
    assert result["chance"] == pytest.approx(0.1)
    assert result["accuracy"] >= 0.6, f"the lab model's samples are not recognisable (chance is 0.1): {result}"


def test_the_demo_at_ci_scale_writes_a_complete_report_and_runs_every_workflow(tmp_path):
    out = tmp_path / "demo"
    # the Stage-1 workflow on 2 images per class, as the ci scale's evaluation (all 8: 2 more minutes)
    proc = subprocess.run([sys.executable, "-m", "lab.demo", "--out", str(out), "--scale", "ci",
                           "--stage1-steps", "4", "--stage2-steps", "4", "--stage1-per-class", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "| LoRD | protected (LoRD live) |" in proc.stdout  # the table is printed
    summary = json.loads((out / "summary.json").read_text())
    results = json.loads((Path(summary["experiment"]["output"]) / "report" / "results.json").read_text())
    assert sorted(results["methods"]) == sorted(METHODS)
    for method in results["methods"].values():
        metrics = method["metrics"]
        assert {"fd", "kd", "subject_acc"} <= set(metrics)
        assert math.isfinite(metrics["fd"]["value"]) and metrics["fd"]["value"] >= 0
        assert 0.0 <= metrics["subject_acc"]["mean"] <= 1.0
        assert len(metrics["subject_acc"]["per_image"]) == len(method["samples"]) == 8
        assert sum(metrics["subject_acc"]["predicted"].values()) == 8
        corr = metrics["target_corr"]["per_image"]  # the texture metrics need no weights: always measured
        assert len(corr) == 8 and all(-1.0 <= c <= 1.0 for c in corr)
        assert metrics["hf_spectrum"]["value"] >= 0 and metrics["hf_spectrum"]["bins"] == [4, 16]
    assert not results["metrics"]["clip_iqa"]["available"]  # no CLIP weights here: not measured, not faked
    detection = results["detection"]
    assert detection["available"] and 0.0 <= detection["summary"]["auroc"] <= 1.0
    assert results["perturbation"]["mean"]["linf_levels"] > 0
    # the protect stage records the latent cell, which the score stage's target pattern uses (no model load)
    assert results["perturbation"]["attack"]["vae_downscale"] == 8
    report = Path(summary["experiment"]["output"]) / "report"
    for name in ("table1.md", "index.html", "roc.png", "grid_all.png"):
        assert (report / name).is_file(), name
    table = (report / "table1.md").read_text(encoding="utf-8")
    assert "Target correlation" in table and "HF spectrum distance" in table
    assert "Subject accuracy (lab-classifier)" in table and "missing:" not in table.split("Not measured")[0]
    # every shipped workflow ran on the lab model and saved 32 px images
    workflows = sorted(p.name for p in (ROOT / "workflows").glob("*.json"))
    assert sorted(summary["workflows"]) == workflows
    assert all(w["status"] == "success" for w in summary["workflows"].values()), summary["workflows"]
    from PIL import Image

    generated = summary["workflows"]["lord_defended_generation.json"]["images"]
    assert generated and all(Image.open(p).size == (32, 32) for p in generated)
    check = summary["defended_generation_subject"]  # the lab classifier's verdict on the defended images
    assert check["images"] == len(generated) and sum(check["predicted"].values()) == len(generated)
    assert check["share"] == check["subject"] / len(generated)
    assert summary["workflow_inputs"]["stage2_protected"] is True


def test_the_demo_adapts_the_shipped_workflows_and_inputs_to_lab_model_2(tmp_path):
    """``python -m lab.demo --lab textures``: the workflows' latents at 64 px, prompts in lab 2's words (its
    captions have no article), its checkpoint; the inputs from lab/texture_data (Stage-1 crops with captions,
    the wood subject); its evaluation protects with mist-v2 at 4 levels and trains Stage 1 on ACE-4 copies.
    The whole demo on lab 2 runs outside CI (README: its time); lab model 1's runs in the test above."""
    from lab.demo import for_lab_model, lab_inputs, lab_prompt, lab_threat
    from lab.declared import MIST_4, STAGE1_ACE_4
    from lab.experiment import LABS, write_config

    lab2 = LABS["textures"]
    assert lab_prompt("a photo of sks person", lab2) == "a photo of sks wood"
    assert lab_prompt("a photo of a person", lab2) == "a photo of wood"
    assert lab_prompt("a photo of a person", LABS["fashion"]) == "a photo of a bag"
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks person"}},
              "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres"}},
              "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}}
    for_lab_model(prompt, lab2.checkpoint_name, {}, batch=4, lab=lab2)
    assert prompt["1"]["inputs"] == {"width": 64, "height": 64, "batch_size": 4}
    assert prompt["2"]["inputs"]["text"] == "a photo of sks wood" and prompt["3"]["inputs"]["text"] == ""
    assert prompt["4"]["inputs"]["ckpt_name"] == lab2.checkpoint_name
    facts = lab_inputs(tmp_path / "input", None, stage1_per_class=1, lab=lab2)
    assert facts["stage1_images"] == len(lab2.trained_classes()) and facts["stage2_images"] == 8
    assert (tmp_path / "input" / "lord_train" / "brick_000.txt").read_text().strip() == "a photo of brick"
    assert sorted(p.name for p in (tmp_path / "input" / "protect_me").glob("*.png")) == ["wood_000.png", "wood_001.png"]
    threat = lab_threat(lab2)
    assert threat["attack"] == MIST_4.attack and threat["overrides"]["stage1_data"] == STAGE1_ACE_4
    assert lab_threat(LABS["fashion"]) == {}
    config = write_config(tmp_path / "exp", tmp_path / "none.safetensors", lab2.classifier, "ci", lab=lab2,
                          **threat).read_text()
    assert 'preset = "mist_v2"' in config and "epsilon = 4.0" in config and 'attack_preset = "ace_fixed"' in config
    assert "resolution = 64" in config and "rounds = 1" in config.split("[attack]")[1].split("[")[0]  # ci: 1 round
    # an attack given without rounds runs its preset's own, not the default ASPL attack's 10
    attack = {k: v for k, v in threat["attack"].items() if k != "rounds"}
    config = write_config(tmp_path / "exp2", tmp_path / "none.safetensors", lab2.classifier, "demo", lab=lab2,
                          attack=attack).read_text()
    assert "rounds" not in config.split("[attack]")[1].split("[")[0]
    # lab model 1's Stage-1 ablation scale is refused on lab 2 (its Stage 1 is the matched ACE copies)
    from lab.demo import main as demo_main

    with pytest.raises(SystemExit):
        demo_main(["--lab", "textures", "--scale", "demo-stage1-pgd32", "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()
