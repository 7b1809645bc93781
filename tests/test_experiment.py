"""The experiment runner end to end on the random test checkpoint (a miniature protocol): every
stage runs for real (protect with mist-v2's loop, Stage-1, Detect, JPEG + DiffPure-style
purification, Stage-2 for every method and sweep point, sampling, CLIP-IQA / FD / KD with random
metric networks) and writes every report file; a second run recomputes nothing; a run killed in
the middle of a stage and started again ends with the same results.json."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import tiny
from tools.mini_experiment import cut_images, write_mini_experiment

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["clean", "attacking", "pgd2_defense", "jpeg", "diffpure", "lord"]


def _cmd(config: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "training.experiment", "--config", str(config), "--cpu", *extra]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, sd15_checkpoint, comfyui_path):
    root = tmp_path_factory.mktemp("mini")
    clip_config, clip_weights = tiny.write_tiny_open_clip(root / "weights")
    inception = tiny.write_random_inception(root / "weights" / "inception.pth")
    config = write_mini_experiment(root, sd15_checkpoint, comfyui_path / "input" / "example.png",
                                   clip_iqa=(str(clip_config), clip_weights), inception=inception)
    proc = subprocess.run(_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=1500, env=_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return config, root / "run", proc.stdout


def _comparable(results: dict) -> dict:
    """results.json without the run folder's own location (two runs in two folders) and without the
    memory check's measurement of this machine (Stage 1's report["memory"]: a measurement, not an output)."""
    out = json.loads(json.dumps(results))
    for key in ("output", "config_path"):
        out["provenance"]["config"].pop(key, None)
    out["provenance"].get("stage1", {}).pop("memory", None)
    return out


def test_the_miniature_protocol_writes_a_complete_report(mini):
    _config, run, _stdout = mini
    report = run / "report"
    for name in ("results.json", "table1.md", "fig7.png", "roc.png", "index.html", "grid_all.png"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    assert sorted(results["methods"], key=lambda m: results["methods"][m]["row"]) == METHODS
    for m, entry in results["methods"].items():
        assert (report / f"grid_{m}.png").is_file()
        assert len(entry["samples"]) == 4 and all((report / p).is_file() for p in entry["samples"])
        iqa = entry["metrics"]["clip_iqa"]["per_image"]
        assert len(iqa) == 4 and all(0.0 <= v <= 1.0 for v in iqa)
        assert math.isfinite(entry["metrics"]["fid"]["value"]) and entry["metrics"]["fid"]["value"] >= 0
        assert math.isfinite(entry["metrics"]["kid"]["mean"])
    # random Inception at the 64-feature layer: a Frechet distance, never called FID
    assert results["metrics"]["fid"]["label"] == "FD (inception-v3 pool 64)"
    header = next(line for line in (report / "table1.md").read_text().splitlines() if line.startswith("| Method"))
    assert "FID" not in header and "FD (inception-v3 pool 64)" in header
    table = (report / "table1.md").read_text()
    assert "Damage undone" not in table and "Reading the rows: one training run per method" in table
    assert "lab.evidence" in results["single_run_note"]
    # different training data, different LoRAs, different samples
    assert results["methods"]["clean"]["metrics"] != results["methods"]["attacking"]["metrics"]
    det = results["detection"]
    assert det["available"] and len(det["scores_clean"]) == len(det["scores_protected"]) == 3
    assert 0.0 <= det["summary"]["auroc"] <= 1.0
    pert = results["perturbation"]
    assert all(p["linf_levels"] <= 4 for p in pert["per_image"]) and all(p["psnr_db"] > 30 for p in pert["per_image"])
    sweep = results["sweep"]["series"]
    assert [p["method"] for p in sweep["plain"]] == ["plain-clean", "plain-mix2", "plain-protected"]
    assert [p["method"] for p in sweep["lord"]] == ["lord-clean", "lord-mix2", "lord-protected"]
    prov = results["provenance"]
    assert len(prov["checkpoint"]["sha256"]) == 64 and prov["attack"]["preset"] == "mist_v2"
    assert prov["attack"]["surrogate"]["rounds"] == 2
    assert results["metrics"]["clip_iqa"]["weights"]["sha256"]
    html = (report / "index.html").read_text()
    assert "table" in html and "fig7.png" in html and "roc.png" in html


def test_a_second_run_recomputes_nothing(mini):
    config, run, _ = mini
    stamps = {p: p.stat().st_mtime_ns for p in (run / "stages").rglob("*") if p.is_file()}
    before = (run / "report" / "results.json").read_bytes()
    proc = subprocess.run(_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(0 stage(s) computed," in proc.stdout, proc.stdout[-2000:]
    assert "running" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (run / "report" / "results.json").read_bytes() == before


def test_a_killed_run_continues_to_the_same_results(mini, tmp_path):
    config, run, _ = mini
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(config, "--output", str(out)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    seen, killed_in = [], None
    deadline = time.time() + 900
    try:
        for line in proc.stdout:
            seen.append(line)
            # kill inside a Stage-2 training, after its first checkpoint was written
            if "train plain-protected: step 1/3" in line or "train lord-protected: step 1/3" in line:
                killed_in = line.strip()
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(seen[-30:])
    finally:
        proc.kill()
        proc.wait()
    assert killed_in, "".join(seen[-40:])
    assert not (out / "report" / "results.json").exists()
    again = subprocess.run(_cmd(config, "--output", str(out)), cwd=ROOT, capture_output=True, text=True,
                           timeout=1500, env=_env())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming an interrupted run" in again.stdout
    first = json.loads((run / "report" / "results.json").read_text())
    second = json.loads((out / "report" / "results.json").read_text())
    assert _comparable(second) == _comparable(first)


def test_list_shows_the_plan_and_only_runs_a_part(mini, tmp_path):
    config, _run, _ = mini
    out = tmp_path / "part"
    proc = subprocess.run(_cmd(config, "--output", str(out), "--list"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "todo     protect" in proc.stdout and "train/lord-protected  (needs" in proc.stdout
    proc = subprocess.run(_cmd(config, "--output", str(out), "--only", "purify/jpeg"), cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = sorted(p.parent.name for p in (out / "stages").glob("*/stage.json"))
    assert done == ["protect", "purify__jpeg"]  # the stage and what it needs, nothing else
    assert not (out / "report").exists()
    # a config whose methods do not use the LoRD (a threat arm of lab.evidence) plans no Stage 1 and no Detect
    plain = config.parent / "plain_only.toml"  # beside exp.toml: its relative image folders resolve alike
    plain.write_text(config.read_text().replace("[sweep]\nshares = [0.0, 0.5, 1.0]\n", "").replace(
        "[metrics]", '[methods]\nrun = ["clean", "attacking"]\n\n[metrics]'))
    proc = subprocess.run(_cmd(plain, "--output", str(tmp_path / "plain"), "--list"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "train/plain-protected" in proc.stdout and "stage1" not in proc.stdout and "detect" not in proc.stdout
    # a purifier on the clean images (its cost when nothing was attacked) needs no protect stage
    costs = config.parent / "purify_clean.toml"
    costs.write_text(plain.read_text().replace('run = ["clean", "attacking"]', 'run = ["clean", "jpeg_clean"]'))
    part = tmp_path / "costs"
    proc = subprocess.run(_cmd(costs, "--output", str(part), "--only", "purify/jpeg_clean"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.parent.name for p in (part / "stages").glob("*/stage.json")) == ["purify__jpeg_clean"]
    result = json.loads((part / "stages" / "purify__jpeg_clean" / "stage.json").read_text())
    assert result["result"]["source"] == "clean" and result["name"] == "purify/jpeg_clean"
    purified = sorted((part / "stages" / "purify__jpeg_clean" / "images").glob("*.png"))
    assert len(purified) == len(list((out / "stages" / "purify__jpeg" / "images").glob("*.png"))) > 0


def test_one_run_reports_no_damage_undone_and_says_how_to_read_its_rows():
    """The single-run "damage undone" share (no interval, no sign check) is gone: results.json says
    that differences between rows include the seed spread and where the replicate analysis is."""
    from training.experiment import results

    assert not hasattr(results, "damage_undone")
    assert "lab.evidence" in results.SINGLE_RUN_NOTE and "seed" in results.SINGLE_RUN_NOTE

def test_artist_mode_measures_given_protected_images(mini, tmp_path):
    """The artist's question on images protected elsewhere (here: the protocol run's mist-v2 images)
    with a LoRD trained before: no protect and no Stage-1 stage; Clean, Attacking, JPEG, DiffPure, LoRD."""
    import shutil

    config, run, _ = mini
    root = config.parent
    shutil.copytree(run / "stages" / "protect" / "images", tmp_path / "published")
    text = config.read_text()
    text = text.replace('[experiment]\noutput = "run"', '[experiment]\nmode = "artist"\noutput = "artist_run"')
    text = text.replace('instance_images = "instance"',
                        f'instance_images = "{root / "instance"}"\nprotected_images = "{tmp_path / "published"}"')
    text = text.replace("[attack]\npreset = \"mist_v2\"\nsteps = 2\nrounds = 2\n", "")
    text = text.replace('[stage1]\ndata = "stage1"', f'[stage1]\nlord = "{run / "stages" / "stage1" / "lord.safetensors"}"')
    text = text.replace("[sweep]\nshares = [0.0, 0.5, 1.0]\n", "")
    artist = tmp_path / "artist.toml"
    artist.write_text(text)
    proc = subprocess.run(_cmd(artist), cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "artist_run"
    stages = sorted(p.parent.name for p in (out / "stages").glob("*/stage.json"))
    assert "protect" not in stages and "stage1" not in stages
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["mode"] == "artist" and set(results["methods"]) == {"clean", "attacking", "jpeg", "diffpure", "lord"}
    protocol = json.loads((run / "report" / "results.json").read_text())
    # the same images, model, LoRD and seeds as the protocol run: the same Attacking numbers
    assert results["methods"]["attacking"]["metrics"] == protocol["methods"]["attacking"]["metrics"]
    assert results["detection"]["available"] and results["sweep"] is None
    assert (out / "report" / "index.html").is_file()


def test_b_strength_variants_share_the_lord_training_and_key_their_strength(tmp_path, sd15_checkpoint, comfyui_path):
    """``lord_b<k>`` methods sample the ``lord`` Stage-2 LoRA (no training of their own) with B' scaled by k
    at sampling and in the held-out loss; the strength is part of those stages' keys and of results.json."""
    from training.experiment.methods import Variant
    from training.experiment.runner import ExperimentRunner
    from training.experiment_config import load_config

    config = write_mini_experiment(tmp_path, sd15_checkpoint, comfyui_path / "input" / "example.png")
    held = tmp_path / "heldout"
    cut_images(comfyui_path / "input" / "example.png", held, 2, 64, offset=2)
    config.write_text(config.read_text().replace("[sweep]\nshares = [0.0, 0.5, 1.0]\n", "").replace(
        "[metrics]", '[methods]\nrun = ["lord", "lord_b05", "lord_clean_b2", "lord_gl0"]\n\n[metrics]\n'
        f'heldout_images = "{held}"'))
    runner = ExperimentRunner(load_config(config))
    runner.build()
    stages = runner.plan.stages
    assert [n for n in stages if n.startswith("train/")] == ["train/lord-protected", "train/lord-clean"]
    assert Variant("lord_b05", "protected").defense_strength == 0.5 and Variant("lord", "protected").defense_strength is None
    # method lord_clean_b2 is the Stage-2 run lord_b2-clean
    for name, strength in (("lord-protected", None), ("lord_b05-protected", 0.5), ("lord_b2-clean", 2.0),
                           ("lord_gl0-protected", None)):
        for kind in ("sample", "heldout"):
            st = stages[f"{kind}/{name}"]
            assert st.key.get("defense_strength") == strength, (kind, name, st.key)
            assert "train/lord-" + name.split("-")[1] in st.needs


def test_share_methods_train_on_nested_mixes_and_refuse_more_than_the_subject_has(tmp_path, sd15_checkpoint,
                                                                                 comfyui_path):
    """``plain_mix<k>`` / ``lord_mix<k>`` (the paper's Fig. 7 as paired methods) train on the instance images
    with k of them protected (``lord_gl0_mix<k>`` samples ``lord_mix<k>``'s LoRA with B' off); the k of a smaller mix are among those of a larger one; k must leave at least
    one image clean and one protected."""
    from training.experiment.runner import ExperimentRunner
    from training.experiment_config import ConfigError, load_config

    config = write_mini_experiment(tmp_path, sd15_checkpoint, comfyui_path / "input" / "example.png",
                                   instance_images=4)
    base = config.read_text().replace("[sweep]\nshares = [0.0, 0.5, 1.0]\n", "")
    config.write_text(base.replace("[metrics]", '[methods]\nrun = ["clean", "plain_mix1", "lord_mix3", '
                                                '"lord_gl0_mix3"]\n\n[metrics]'))
    runner = ExperimentRunner(load_config(config))
    runner.build()
    stages = runner.plan.stages
    assert {"train/plain-mix1", "train/lord-mix3", "sample/lord-mix3", "sample/lord_gl0-mix3"} <= set(stages)
    # lord_gl0_mix3 samples lord_mix3's LoRA (no training of its own) with the gate forced to 0
    assert "train/lord_gl0-mix3" not in stages and "train/lord-mix3" in stages["sample/lord_gl0-mix3"].needs
    assert stages["sample/lord_gl0-mix3"].key != stages["sample/lord-mix3"].key
    ctx = runner.ctx
    assert len(ctx.mix_names(1)) == 1 and set(ctx.mix_names(1)) <= set(ctx.mix_names(3)) and len(ctx.mix_names(3)) == 3
    config.write_text(base.replace("[metrics]", '[methods]\nrun = ["clean", "plain_mix4"]\n\n[metrics]'))
    runner = ExperimentRunner(load_config(config))
    with pytest.raises(ConfigError, match="protects 4 of the instance images, but .* holds 4; use 1..3"):
        runner.build()


def test_a_defense_aware_attacker_protects_against_the_lord_defended_model(tmp_path, sd15_checkpoint, comfyui_path):
    """``[attack] defense_aware``: Stage 1 is trained first (even when no method uses the LoRD) and the
    surrogate attack (mist-v2's loop) runs on the LoRD-patched model; its copies differ from the
    unaware attacker's with the same seed, and its key names the LoRD. ``[attack] gate_evasion`` reuses that
    Stage 1, keys the weight and reports the gate the penalty read."""
    config = write_mini_experiment(tmp_path, sd15_checkpoint, comfyui_path / "input" / "example.png")
    base = config.read_text().replace("[sweep]\nshares = [0.0, 0.5, 1.0]\n", "").replace(
        "[metrics]", '[methods]\nrun = ["clean", "attacking"]\n\n[metrics]')
    config.write_text(base.replace('rounds = 2\n', 'rounds = 2\ndefense_aware = true\n'))
    listing = subprocess.run(_cmd(config, "--list"), cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert listing.returncode == 0, listing.stderr
    assert "protect  (needs stage1)" in listing.stdout and "detect" not in listing.stdout, listing.stdout
    runs = {}
    for name, text in (("aware", None), ("plain", base)):
        if text is not None:
            config.write_text(text)
        proc = subprocess.run(_cmd(config, "--output", str(tmp_path / name), "--only", "protect"), cwd=ROOT,
                              capture_output=True, text=True, timeout=900, env=_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = tmp_path / name / "stages"
    assert (runs["aware"] / "stage1" / "lord.safetensors").is_file() and not (runs["plain"] / "stage1").exists()
    key = json.loads((runs["aware"] / "protect" / "key.json").read_text())["key"]
    assert key["defense_aware"] == {"stage": "stage1"}
    result = json.loads((runs["aware"] / "protect" / "stage.json").read_text())["result"]
    assert result["attack"]["defense_aware"] is True
    from training.experiment.images import read_png

    differs = [bool((read_png(p) != read_png(runs["plain"] / "protect" / "images" / p.name)).any())
               for p in sorted((runs["aware"] / "protect" / "images").glob("*.png"))]
    assert len(differs) == 3 and all(differs)
    # the gate-evasion attacker: the same Stage 1 (same folder), protect again with the penalty term
    aware = {p.name: read_png(p) for p in (runs["aware"] / "protect" / "images").glob("*.png")}
    lord_file = runs["aware"] / "stage1" / "lord.safetensors"
    trained = lord_file.stat().st_mtime_ns
    config.write_text(base.replace('rounds = 2\n', 'rounds = 2\ndefense_aware = true\ngate_evasion = 100.0\n'))
    proc = subprocess.run(_cmd(config, "--output", str(tmp_path / "aware"), "--only", "protect"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lord_file.stat().st_mtime_ns == trained  # Stage 1 not retrained
    key = json.loads((runs["aware"] / "protect" / "key.json").read_text())["key"]
    assert key["gate_evasion"] == 100.0 and key["defense_aware"] == {"stage": "stage1"}
    evasion = json.loads((runs["aware"] / "protect" / "stage.json").read_text())["result"]["attack"]["gate_evasion"]
    assert evasion["weight"] == 100.0 and evasion["passes"] > 0 and 0 < evasion["mean_gate_last_pass"] < 1
    assert any(bool((read_png(p) != aware[p.name]).any())
               for p in sorted((runs["aware"] / "protect" / "images").glob("*.png")))
