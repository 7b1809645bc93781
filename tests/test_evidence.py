"""lab.evidence: the replicate protocol (own subject bags and seeds per replicate, paired analysis).

CI runs the pilot's first 2 replicates at the ``ci`` scale end to end (real runner, lab model) and
checks the analysis against values recomputed by hand from each replicate's results.json; the
subject sets are checked to be disjoint; the analysis maths (intervals, sign-flip p, Holm) are
tested against scipy and hand values in tests/test_analysis.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lab import declared as D
from lab import evidence as E
from lab import evidence_analysis as EA
from lab.data import DEMO_DIR, REPLICATE_BAGS, REPLICATE_SETS, replicate_folder
from lord_ops import analysis as an

ROOT = Path(__file__).resolve().parents[1]


def _pixels(path: Path) -> str:
    from PIL import Image

    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def _write_heldout_results(replicate: Path, methods: dict) -> None:
    """A replicate's results.json holding only each method's held-out loss (``methods``: name -> value)."""
    path = replicate / "run" / "report" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"methods": {m: {"metrics": {"heldout_loss": {"mean": v}}} for m, v in methods.items()}}))


def test_replicate_subjects_are_disjoint_from_each_other_and_the_demo():
    seen: dict[str, str] = {}
    for folder in [DEMO_DIR / "instance", DEMO_DIR / "reference"] + [replicate_folder(r) for r in range(REPLICATE_SETS)]:
        files = sorted(folder.glob("*.png"))
        if folder.parent.name == "replicates":
            assert len(files) == REPLICATE_BAGS, folder
        for f in files:
            h = _pixels(f)
            assert h not in seen, f"{f} repeats {seen.get(h)}"
            seen[h] = str(f)
    assert len({D.replicate_seed(r) for r in range(REPLICATE_SETS)}) == REPLICATE_SETS
    assert set(D.EXPERIMENTS["defense"].replicates) <= set(D.CONFIRMATORY)
    assert not set(D.EXPERIMENTS["pilot"].replicates) & set(D.CONFIRMATORY)


def test_analysis_of_synthetic_replicates_matches_hand_values():
    rng = np.random.default_rng(0)
    declared = D.EXPERIMENTS["defense"]
    reps = [10, 11, 12, 13, 14]
    values = {m: {meth: {r: float(rng.normal()) for r in reps} for meth in declared.methods} for m in D.METRICS}
    values["heldout_loss"]["lord"].pop(14)  # a replicate without this method: contrasts with it use 4
    result = EA.analyse(values, declared)
    v = values["heldout_loss"]
    rows = result["metrics"]["heldout_loss"]["contrasts"]
    a = [v["attacking"][r] - v["clean"][r] for r in reps]
    assert rows["A"]["n"] == 5 and rows["A"]["mean"] == pytest.approx(np.mean(a))
    assert rows["A"]["values"] == pytest.approx(a)
    rem = [v["lord"][r] - v["lord_clean"][r] - v["attacking"][r] + v["clean"][r] for r in reps[:4]]
    assert rows["removal_lord"]["n"] == 4 and rows["removal_lord"]["mean"] == pytest.approx(np.mean(rem))
    assert rows["removal_lord"]["replicates"] == reps[:4]
    family = {k: rows[k]["p"] for k in declared.family}
    assert {k: rows[k]["p_holm"] for k in declared.family} == pytest.approx(an.holm(family))
    assert rows["cost_lord"]["p_holm"] is None and result["metrics"]["subject_acc"]["contrasts"]["A"]["p_holm"] is None
    assert result["threat_gate"]["measurable"] == (abs(rows["A"]["d_z"]) >= 0.3)
    shares = result["metrics"]["heldout_loss"]["remaining_shares"]
    assert set(shares) == {"lord", "onebranch"} and shares["lord"] == result["metrics"]["heldout_loss"][
        "remaining_share_under_lord"]
    ob = [v["onebranch"][r] - v["onebranch_clean"][r] for r in reps]
    assert shares["onebranch"]["value"] == pytest.approx(np.mean(ob) / np.mean(a))
    text = E.markdown(result)
    assert "| A * | 5 |" in text and "held-out denoising loss (primary)" in text
    assert "Share of A remaining under LoRD: " in text and "Share of A remaining under onebranch: " in text
    assert E.forest_png(result)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_replicates_at_ci_scale_run_and_are_analysed(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-m", "lab.evidence", "run", "pilot", "--scale", "ci", "--replicates", "0-1",
                          "--out", str(tmp_path), "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                         env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rep = subprocess.run([sys.executable, "-m", "lab.evidence", "report", "pilot", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert rep.returncode == 0, rep.stdout[-4000:] + rep.stderr[-4000:]
    by_hand = {}
    for r in (0, 1):
        folder = tmp_path / "pilot" / f"r{r:03d}"
        config = (folder / "exp.toml").read_text()
        assert f"seed = {1000 + r}" in config and f"replicates/r{r:03d}" in config  # own seed, own subject
        methods = json.loads((folder / "run" / "report" / "results.json").read_text())["methods"]
        assert set(methods) == set(D.DEFENSE_METHODS)
        loss = {m: methods[m]["metrics"]["heldout_loss"] for m in methods}
        assert all(len(x["per_image"]) == E.HELDOUT_IMAGES["ci"] and x["mean"] > 0 for x in loss.values())
        by_hand[r] = loss["attacking"]["mean"] - loss["clean"]["mean"]
        assert methods["onebranch"]["one_branch"] and methods["lord"]["lord"]
    result = json.loads((tmp_path / "pilot" / "analysis.json").read_text())
    a = result["metrics"]["heldout_loss"]["contrasts"]["A"]
    assert a["n"] == 2 and a["replicates"] == [0, 1] and a["values"] == pytest.approx([by_hand[0], by_hand[1]])
    assert (tmp_path / "pilot" / "forest.png").read_bytes()[:4] == b"\x89PNG"
    assert "Replicate analysis: pilot" in (tmp_path / "pilot" / "analysis.md").read_text()


def test_threat_arms_pair_with_the_defense_runs_and_plan_no_stage1(tmp_path):
    """A dose-response arm runs the plain LoRA on its own attack's copies only (no Stage 1, no Detect)
    and its contrasts read 'clean' from the paired experiment's replicate folders."""
    import dataclasses

    from lab.ship import SHIPPED_CLASSIFIER

    threat = D.EXPERIMENTS["threat"]
    assert threat.replicates == range(10, 18)
    threat = dataclasses.replace(threat, replicates=range(10, 13))  # three synthetic replicates
    assert set(threat.family) == {a.contrast.name for a in threat.arms}
    assert threat.source(tmp_path, "clean", 12)[0] == tmp_path / "defense" / "r012" / "run" / "report" / "results.json"
    assert threat.source(tmp_path, "aspl_32", 12) == (tmp_path / "defense" / "r012" / "run" / "report" / "results.json",
                                                    "attacking")
    assert threat.source(tmp_path, "aspl_4", 12) == (
        tmp_path / "threat" / "aspl_4" / "r012" / "run" / "report" / "results.json", "attacking")
    # synthetic finished runs: the analysis pairs each arm with the defense folder's clean runs
    rng = np.random.default_rng(1)
    for r in (10, 11, 12):
        for meth in threat.methods:
            results, name = threat.source(tmp_path, meth, r)
            data = json.loads(results.read_text()) if results.is_file() else {"methods": {}}
            data["methods"][name] = {"metrics": {"heldout_loss": {"mean": float(rng.normal())},
                                                 "subject_acc": {"mean": 0.5}, "fd": {"value": 1.0}}}
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(data))
    values = EA.replicate_values(tmp_path, threat)
    values["heldout_loss"]["aspl_16"].pop(12)  # an arm with a replicate missing is not analysed (stopping rule)
    result = EA.analyse(values, threat)
    assert result["unfinished_arms"] == {"A_aspl_16": 2}
    assert "A_aspl_16" not in result["metrics"]["heldout_loss"]["contrasts"]
    rows = result["metrics"]["heldout_loss"]["contrasts"]
    v = values["heldout_loss"]
    assert rows["A_mist_v2_4"]["values"] == pytest.approx([v["mist_v2_4"][r] - v["clean"][r] for r in (10, 11, 12)])
    assert rows["A_aspl_32"]["p_holm"] is None and rows["A_aspl_4"]["p_holm"] is not None
    assert set(result["threat_gates"]) == {a.contrast.name for a in threat.arms + threat.reference_arms} - {"A_aspl_16"}
    assert "Threat gate (declared), A_aspl_8" in E.markdown(result)
    # the arm's run plans no Stage 1 and no Detect (nothing in it uses the LoRD)
    config = E.write_replicate_config(tmp_path, threat, 10, "ci", tmp_path / "none.safetensors", SHIPPED_CLASSIFIER,
                                      threat.arms[0])
    assert config == tmp_path / "threat" / "aspl_4" / "r010" / "exp.toml"
    text = config.read_text()
    assert 'preset = "anti_dreambooth_aspl"' in text and "epsilon = 4.0" in text and 'run = ["attacking"]' in text


def test_mist_runs_its_own_methods_and_reads_the_clean_runs_and_stage1_from_defense(tmp_path):
    """'mist' trains only the methods on the mist-v2-32 copies (in the threat arm's folders, where protect
    and the plain LoRA are cached), reads the clean-image runs from 'defense' and copies the defense
    replicate's Stage-1 stages (without lock or caches, never over an existing folder)."""
    from lab.ship import SHIPPED_CLASSIFIER

    mist = D.EXPERIMENTS["mist"]
    assert mist.attack == D.THREAT_ARMS[-1].attack and mist.replicates == range(10, 18)
    assert set(mist.family) <= {c.name for c in mist.contrasts}
    assert all(m in mist.methods for c in mist.contrasts if c.name in mist.family for m in c.methods)
    assert mist.own_methods == ("attacking", "lord", "onebranch", "lord_g10", "noise")
    home = tmp_path / "threat" / "mist_v2_32" / "r011" / "run"
    assert mist.source(tmp_path, "lord", 11) == (home / "report" / "results.json", "lord")
    assert mist.source(tmp_path, "attacking", 11) == (home / "report" / "results.json", "attacking")
    assert mist.source(tmp_path, "lord_clean_g10", 11) == (
        tmp_path / "defense" / "r011" / "run" / "report" / "results.json", "lord_clean_g10")
    # the other experiments are unchanged: defense runs all its methods itself
    assert D.EXPERIMENTS["defense"].own_methods == D.EXPERIMENTS["defense"].methods
    config = E.write_replicate_config(tmp_path, mist, 11, "ci", tmp_path / "none.safetensors", SHIPPED_CLASSIFIER)
    assert config == home.parent / "exp.toml"
    text = config.read_text()
    assert 'preset = "mist_v2"' in text and "epsilon = 32.0" in text
    assert 'run = ["attacking", "lord", "onebranch", "lord_g10", "noise"]' in text
    # Stage 1 of the defense replicate is copied once, without its lock and PGD cache
    source = tmp_path / "defense" / "r011" / "run" / "stages"
    for name in ("stage1", "stage1_onebranch"):
        (source / name / "pgd_cache").mkdir(parents=True)
        (source / name / "stage.json").write_text(json.dumps({"digest": name}))
        (source / name / "lord.safetensors").write_bytes(b"weights " + name.encode())
        (source / name / "lock").write_text("123@host")
    assert E.borrow_stages(tmp_path, mist, 11) == ["stage1", "stage1_onebranch"]
    copied = home / "stages" / "stage1"
    assert sorted(p.name for p in copied.iterdir()) == ["lord.safetensors", "stage.json"]
    (copied / "lord.safetensors").write_bytes(b"this run's own")
    assert E.borrow_stages(tmp_path, mist, 11) == []  # an existing stage folder is never overwritten
    assert (copied / "lord.safetensors").read_bytes() == b"this run's own"
    assert E.borrow_stages(tmp_path, mist, 12) == []  # nothing to borrow: the run trains its own Stage 1
    # experiments sharing a folder write the same method list, so running one never drops the other's results
    threat = D.EXPERIMENTS["threat"]
    arm_config = E.write_replicate_config(tmp_path, threat, 11, "ci", tmp_path / "none.safetensors",
                                          SHIPPED_CLASSIFIER, threat.arms[-1])
    assert arm_config == config and 'run = ["attacking", "lord", "onebranch", "lord_g10", "noise"]' in config.read_text()
    defense = E.write_replicate_config(tmp_path, D.EXPERIMENTS["defense"], 11, "ci", tmp_path / "none.safetensors",
                                       SHIPPED_CLASSIFIER).read_text()
    assert all(f'"{m}"' in defense for m in D.EXPERIMENTS["gates"].methods)


def test_finished_replicates_are_archived_and_read_back_when_the_output_folder_is_gone(tmp_path):
    """The output folder is scratch; a finished replicate's results.json is copied into the archive and the
    analysis reads it from there once the folder is gone (a later session resumes without recomputing)."""
    import dataclasses

    mist = dataclasses.replace(D.EXPERIMENTS["mist"], replicates=range(10, 12))
    out, archive = tmp_path / "out", tmp_path / "archive"
    results, name = mist.source(out, "lord", 11)
    assert EA.archived(results, out, archive) == archive / "threat" / "mist_v2_32" / "r011.json"
    assert EA.archived(mist.source(out, "clean", 10)[0], out, archive) == archive / "defense" / "r010.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"methods": {name: {"metrics": {"heldout_loss": {"mean": 0.25}}}}}))
    kept = E.archive_results(results, out, archive)
    assert json.loads(kept.read_text()) == json.loads(results.read_text())
    assert not list(archive.rglob("*.tmp*"))
    results.unlink()
    assert EA.replicate_values(out, mist, archive)["heldout_loss"]["lord"] == {11: 0.25}
    assert EA.replicate_values(out, mist, tmp_path / "elsewhere")["heldout_loss"]["lord"] == {}
    # an older output folder's copy (without 'noise') beside a fuller archived one: each method is read from the
    # copy that lists it, and the replicate's state sees both
    results.write_text(json.dumps({"methods": {name: {"metrics": {"heldout_loss": {"mean": 0.5}}}}}))
    kept.write_text(json.dumps({"methods": {name: {"metrics": {"heldout_loss": {"mean": 0.25}}},
                                            "noise": {"metrics": {"heldout_loss": {"mean": 0.75}}}}}))
    got = EA.replicate_values(out, mist, archive)["heldout_loss"]
    assert got["lord"] == {11: 0.5} and got["noise"] == {11: 0.75}
    assert "noise" not in E.missing_values(out, mist, 11, archive=archive)


def test_a_rerun_replicate_is_compared_with_its_archived_copy(tmp_path, capsys):
    """A replicate rerun because an experiment sharing its folder added methods must reproduce the methods its
    archived copy already has; the check says so, or names the methods that differ."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    results = out / "textures_defense" / "r010" / "run" / "report" / "results.json"
    results.parent.mkdir(parents=True)

    def tree(lord_loss, extra=None):
        methods = {"lord": {"metrics": {"heldout_loss": {"mean": lord_loss, "per_image": [0.1, 0.2]}, "note": "x"}},
                   "jpeg": {"metrics": {"heldout_loss": {"mean": 0.5, "per_image": [0.3, 0.4]}}}}
        methods.update(extra or {})
        return {"methods": methods, "provenance": {"commit": "abc"}}

    results.write_text(json.dumps(tree(0.25)))
    assert E.check_reproduction(results, out, archive) is None  # nothing archived yet
    E.archive_results(results, out, archive)
    results.write_text(json.dumps(tree(0.25, {"plain_mix2": {"metrics": {"heldout_loss": {"mean": 0.7}}}})))
    same = {"difference": 0.0, "keys": 0}
    assert E.check_reproduction(results, out, archive) == {"jpeg": same, "lord": same}
    assert "reproduced: the rerun's 2 record(s)" in capsys.readouterr().out
    results.write_text(json.dumps(tree(0.2625)))
    assert E.check_reproduction(results, out, archive)["lord"] == {"difference": pytest.approx(0.0125), "keys": 0}
    said = capsys.readouterr().out
    assert "NOT reproduced" in said and "lord (largest difference 0.0125)" in said and "jpeg" not in said
    changed = tree(0.25)
    changed["methods"]["jpeg"]["metrics"]["fd"] = {"value": 3.0}  # a number the archived copy lacks ...
    changed["methods"]["jpeg"]["metrics"]["heldout_loss"]["mean"] = 0.75  # ... does not hide a real difference
    changed["detection"] = {"summary": {"auroc": 0.9}}
    before = {**tree(0.25), "detection": {"summary": {"auroc": 0.8}}}
    found = E.reproduction(before, changed)
    assert found["jpeg"] == {"difference": pytest.approx(0.25), "keys": 1}
    assert found["(detection)"]["difference"] == pytest.approx(0.1)
    results.write_text("{not json")
    assert E.check_reproduction(results, out, archive) is None and "not checked" in capsys.readouterr().out


def test_an_experiment_can_train_stage1_on_other_copies(tmp_path):
    """``Declared.stage1_data`` reaches the replicate's exp.toml (the Stage-1 copies' attack)."""
    from lab.ship import SHIPPED_CLASSIFIER

    pilot = D.EXPERIMENTS["matched_pilot"]
    assert set(pilot.replicates) <= set(D.EXPLORATION)
    text = E.write_replicate_config(tmp_path, pilot, 3, "ci", tmp_path / "none.safetensors",
                                    SHIPPED_CLASSIFIER).read_text()
    stage1 = text.split("[stage1]")[1].split("[stage2]")[0]
    assert 'attack_preset = "ace_fixed"' in stage1 and "attack_epsilon = 32.0" in stage1
    assert 'attack_preset = "pgd_2"' in E.write_replicate_config(
        tmp_path, D.EXPERIMENTS["mist"], 3, "ci", tmp_path / "none.safetensors", SHIPPED_CLASSIFIER).read_text()


def test_the_report_summarises_the_stage1_gate_over_replicates(tmp_path):
    """Detect and the Stage-1 in-sample gate separation are read from each replicate's results.json (the
    run that trained the LoRD), summarised with a t interval and shown in the report."""
    import dataclasses

    matched = dataclasses.replace(D.EXPERIMENTS["matched"], replicates=range(10, 13))
    for r, (clean, prot) in zip((10, 11), ((0.2, 0.8), (0.4, 0.9))):
        results, _ = matched.source(tmp_path, "lord", r)
        results.parent.mkdir(parents=True)
        results.write_text(json.dumps({
            "methods": {}, "detection": {"available": True, "summary": {"auroc": 0.5 + r / 100},
                                         "scores_clean": [clean - 0.1, clean + 0.1], "scores_protected": [prot, prot]},
            "provenance": {"stage1": {"gate_separation_train": {
                "mean_gate_clean": clean, "mean_gate_perturbed": prot,
                "by_timestep": {"50": {"mean_gate_clean": clean / 2, "mean_gate_perturbed": prot, "auroc": 1.0}}}}}}))
    values = EA.gate_values(tmp_path, matched, tmp_path / "no_archive")  # not the repository's archive
    assert values["detect_auroc"] == {10: pytest.approx(0.6), 11: pytest.approx(0.61)}
    assert values["detect_clean"] == {10: pytest.approx(0.2), 11: pytest.approx(0.4)}
    assert values["stage1_clean_t50"] == {10: pytest.approx(0.1), 11: pytest.approx(0.2)}
    gates = EA.summarise_replicates(values)
    assert gates["detect_protected"]["mean"] == pytest.approx(0.85) and gates["detect_protected"]["n"] == 2
    lo, hi = gates["detect_clean"]["ci_low"], gates["detect_clean"]["ci_high"]
    half = 12.706 * np.std([0.2, 0.4], ddof=1) / np.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert (lo, hi) == (pytest.approx(0.3 - half, abs=1e-3), pytest.approx(0.3 + half, abs=1e-3))
    text = E.markdown({**EA.analyse({m: {} for m in D.METRICS}, matched), "gates": gates})
    assert "## The Stage-1 gate (exploratory)" in text and "Stage 1, in-sample, t = 50: mean gate on clean images" in text
    assert EA.gate_values(tmp_path, D.EXPERIMENTS["threat"], tmp_path / "no_archive") == {}  # no LoRD in a plain-only experiment


def test_the_report_summarises_each_attack_settings_perturbation_size(tmp_path):
    """Per attack setting (a dose-response's arms and reference arm; otherwise 'attacking'), the report gives the
    perturbation's size over the finished replicates -- PSNR, SSIM, L-inf and L2 (pixel levels) as each run's
    report recorded them -- read where the method's value is read (the reference arm from the paired
    experiment's run), a run whose method has not finished left out; the markdown shows it as an exploratory
    table."""
    declared = D.EXPERIMENTS["textures_threat"]
    for method, r, psnr, finished in (("ace_4", 10, 36.0, True), ("ace_4", 11, 38.0, True), ("ace_8", 10, 30.0, False),
                                      ("mist_v2_4", 10, 36.5, True), ("mist_v2_4", 11, 36.1, True)):
        results, name = declared.source(tmp_path, method, r)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({
            "methods": {name: {"metrics": {}}} if finished else {},
            "perturbation": {"mean": {"psnr_db": psnr, "ssim": 0.9, "linf_levels": 4.0, "l2_levels": 400.0 + r}}}))
    values = EA.perturbation_values(tmp_path, declared, tmp_path / "no_archive")
    assert set(values) == {"ace_4", "mist_v2_4"}  # ace_8's run has not finished
    assert values["ace_4"]["psnr_db"] == {10: 36.0, 11: 38.0} and values["mist_v2_4"]["l2_levels"] == {10: 410.0, 11: 411.0}
    assert EA.perturbed_methods(declared)[-1] == "mist_v2_4" and EA.perturbed_methods(D.EXPERIMENTS["defense"]) == (
        "attacking",)
    assert EA.perturbed_methods(D.EXPERIMENTS["evasion"]) == ("attacking", "attacking_unaware")
    summary = {m: EA.summarise_replicates(v) for m, v in values.items()}
    assert summary["ace_4"]["psnr_db"]["mean"] == pytest.approx(37.0)
    text = E.markdown({**EA.analyse({m: {} for m in D.METRICS}, declared), "perturbations": summary})
    assert "## Perturbation size per attack setting (exploratory)" in text
    assert "| ace_4 | 2 | 37.00 (36.00 to 38.00) | 0.9000 (0.9000 to 0.9000) | 4.00 (4.00 to 4.00) | 410.5 (410.0 to 411.0) |" in text
    assert "Perturbation size" not in E.markdown(EA.analyse({m: {} for m in D.METRICS}, declared))


def test_a_co_primary_question_is_holm_adjusted_with_the_primary_ones():
    """A family entry 'metric:contrast' (lab model 2's "does the ACE target show in the samples?") is asked on
    that metric, Holm-adjusted together with the primary-metric questions, starred in its section; an
    unknown metric is refused."""
    rng = np.random.default_rng(1)
    reps = list(range(10, 20))
    declared = dataclasses.replace(D.EXPERIMENTS["defense"], family=("A", "target_corr:A"))
    values = {m: {meth: {r: float(rng.normal()) for r in reps} for meth in declared.methods} for m in D.METRICS}
    result = EA.analyse(values, declared)
    primary = result["metrics"]["heldout_loss"]["contrasts"]["A"]
    texture = result["metrics"]["target_corr"]["contrasts"]["A"]
    assert result["family_analysed"] == ["A", "target_corr:A"]
    assert [primary["p_holm"], texture["p_holm"]] == pytest.approx(list(an.holm(
        {"A": primary["p"], "target_corr:A": texture["p"]}).values()))
    assert result["metrics"]["fd"]["contrasts"]["A"]["p_holm"] is None
    text = E.markdown(result)
    assert "correlation of the samples with the ACE target (co-primary: declared questions)" in text
    assert "| A * | 10 |" in text.split("correlation of the samples with the ACE target")[1].split("##")[0]
    assert D.family_question("removal_lord") == ("heldout_loss", "removal_lord")
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        D.family_question("nope:A")


def test_the_lab2_experiment_runs_on_its_own_subject_crops_with_noise_purification_and_no_stage1(tmp_path):
    """'textures' (lab model 2): each replicate's own 8 wood crops at 64 px, mist-v2 at its published 4 levels,
    the plain LoRA on clean, protected and noise-purified copies; its co-primary questions read the target
    correlation; replicates disjoint from its pilot's."""
    from lab.experiment import LABS

    declared = D.EXPERIMENTS["textures"]
    assert declared.lab == "textures" and len(declared.replicates) >= 10
    assert not set(declared.replicates) & set(D.EXPERIMENTS["pilot_textures"].replicates)
    assert {D.family_question(q) for q in declared.family} >= {("heldout_loss", "A"), ("target_corr", "A")}
    config = E.write_replicate_config(tmp_path, declared, 10, "ci", tmp_path / "none.safetensors",
                                      LABS["textures"].classifier)
    text = config.read_text()
    assert 'run = ["clean", "attacking", "noise"]' in text and "resolution = 64" in text
    assert str(LABS["textures"].replicate_folder(10)) in text and 'preset = "mist_v2"' in text and "epsilon = 4.0" in text
    assert 'class_name = "wood"' in text


def test_the_lab2_defense_pilot_trains_stage1_on_ace4_copies_and_borrows_the_pilot_protected_copies(tmp_path):
    """'pilot_textures_defense' (exploration on lab model 2): Stage 1 on ACE copies at the threat's 4 levels and
    step, LoRD / one-branch / purifier runs of its own on pilot_textures' protected copies (borrowed), the plain
    runs read from pilot_textures; exploration replicates only; each purifier has its contrast."""
    from lab.experiment import LABS

    declared = D.EXPERIMENTS["pilot_textures_defense"]
    assert declared.lab == "textures" and set(declared.replicates) <= set(D.EXPLORATION)
    assert set(declared.replicates) <= set(D.EXPERIMENTS["pilot_textures"].replicates)
    assert declared.own_methods == D.TEXTURE_DEFENSES and declared.borrowed_stages == ("protect",)
    config = E.write_replicate_config(tmp_path, declared, 1, "ci", tmp_path / "none.safetensors",
                                      LABS["textures"].classifier).read_text()
    stage1 = config.split("[stage1]")[1].split("[stage2]")[0]
    assert 'attack_preset = "ace_fixed"' in stage1 and "attack_epsilon = 4.0" in stage1
    assert "attack_step_size = 0.6375" in stage1 and "resolution = 64" in config
    assert "attack_steps = 3" in stage1  # the ci scale's few attack steps reach the Stage-1 copies (ACE has 150)
    assert 'preset = "mist_v2"' in config.split("[attack]")[1] and "jpeg" in config and "diffpure" in config
    pilot = tmp_path / "pilot_textures" / "r001" / "run" / "report" / "results.json"
    assert declared.source(tmp_path, "attacking", 1) == (pilot, "attacking")
    assert declared.source(tmp_path, "jpeg", 1)[0] == tmp_path / "pilot_textures_defense" / "r001" / "run" / "report" / "results.json"
    names = {c.name: c for c in declared.contrasts}
    for purifier in ("noise", "jpeg", "diffpure"):
        assert dict(names[f"{purifier}_vs_plain_prot"].weights) == {purifier: 1, "attacking": -1}
    assert 'pgd2_defense' in config and dict(names["lord_vs_pgd2_prot"].weights) == {"lord": 1, "pgd2_defense": -1}
    # the borrowed protect stage is copied once, without its lock
    source = tmp_path / "pilot_textures" / "r001" / "run" / "stages" / "protect"
    source.mkdir(parents=True)
    (source / "stage.json").write_text("{}")
    (source / "lock").write_text("1@host")
    assert E.borrow_stages(tmp_path, declared, 1) == ["protect"] and E.borrow_stages(tmp_path, declared, 1) == []
    copied = tmp_path / "pilot_textures_defense" / "r001" / "run" / "stages" / "protect"
    assert (copied / "stage.json").is_file() and not (copied / "lock").exists()


def test_the_lab2_defense_comparison_pairs_with_textures_and_reads_its_plain_and_noise_runs(tmp_path):
    """'textures_defense' (confirmatory on lab model 2): "textures"' confirmatory replicates, its protected copies
    borrowed, its clean / attacking / noise runs read from it; Stage 1 on ACE-4 copies; the family names
    LoRD's removal (B' live and off at sampling), the one-branch control and every other baseline, and the
    target correlation co-primary."""
    from lab.experiment import LABS

    declared = D.EXPERIMENTS["textures_defense"]
    assert declared.replicates == D.EXPERIMENTS["textures"].replicates == range(10, 20)
    assert set(declared.replicates) <= set(D.CONFIRMATORY) and declared.lab == "textures"
    assert declared.attack == D.EXPERIMENTS["textures"].attack and declared.stage1_data == D.STAGE1_ACE_4
    assert declared.borrowed_stages == ("protect",) and "noise" not in declared.own_methods
    assert {"lord", "lord_gl0", "onebranch", "jpeg", "diffpure", "pgd2_defense"} <= set(declared.own_methods)
    textures = tmp_path / "textures" / "r012" / "run" / "report" / "results.json"
    for method in ("clean", "attacking", "noise"):
        assert declared.source(tmp_path, method, 12) == (textures, method)
    assert declared.source(tmp_path, "lord_gl0", 12)[0] == tmp_path / "textures_defense" / "r012" / "run" / "report" / "results.json"
    assert {"removal_gl0", "pgd2_vs_plain_prot", "target_corr:removal_gl0"} <= set(declared.family)
    config = E.write_replicate_config(tmp_path, declared, 12, "ci", tmp_path / "none.safetensors",
                                      LABS["textures"].classifier).read_text()
    assert str(LABS["textures"].replicate_folder(12)) in config and 'attack_preset = "ace_fixed"' in config


def test_the_lab2_share_sweep_reuses_the_defense_folder_and_adds_b_prime_off_at_sampling(tmp_path):
    """'textures_share' (confirmatory on lab model 2, the paper's Fig. 7): runs in 'textures_defense''s folder
    (its Stage 1 and LoRD runs are reused, and that folder's configs name every method of both, so neither run
    drops the other's results); plain and LoRD Stage-2 runs on 2, 4 and 6 of 8 protected, the LoRD ones also
    sampled with B' off (sharing their training); the plain 0- and 8-of-8 runs are read from "textures"."""
    from lab.experiment import LABS

    declared, defense = D.EXPERIMENTS["textures_share"], D.EXPERIMENTS["textures_defense"]
    assert declared.home == defense.home == "textures_defense" and declared.replicates == defense.replicates
    assert declared.stage1_data == defense.stage1_data and declared.attack == defense.attack
    assert set(defense.own_methods) < set(declared.own_methods)
    assert E.folder_methods("textures_defense") == defense.own_methods + D.TEXTURE_SHARE_METHODS
    assert declared.source(tmp_path, "clean", 15) == (tmp_path / "textures" / "r015" / "run" / "report" / "results.json",
                                                      "clean")
    config = E.write_replicate_config(tmp_path, declared, 15, "ci", tmp_path / "none.safetensors",
                                      LABS["textures"].classifier).read_text()
    assert '"lord_gl0_mix4"' in config and '"pgd2_defense"' in config and '"noise"' not in config
    assert "slope_gl0_vs_plain" in declared.family and "target_corr:slope_plain" in declared.family


def test_the_lab2_dose_response_pairs_its_arms_with_textures_clean_runs(tmp_path):
    """'textures_threat' (confirmatory on lab model 2): ACE against the fixed model, the mist-v2 preset and ASPL
    at 4, 8, 16 and 32 levels -- each arm in its own folder, its plain LoRA on that attack's copies read as the
    arm's method and paired with "textures"' clean run; mist-v2 at 4 levels is "textures"' own attack (reference
    arm, not rerun) and the arm recipe reproduces it."""
    from lab.experiment import LABS

    declared = D.EXPERIMENTS["textures_threat"]
    arms = {a.name: a.attack for a in declared.arms}
    assert len(arms) == 11 and "mist_v2_4" not in arms and declared.replicates == range(10, 20)
    assert D._mist(4) == D.MIST_4.attack == declared.reference_arms[0].attack
    assert arms["ace_4"] == {"preset": "ace_fixed", "epsilon": 4.0, "step_size": 0.6375}
    assert arms["ace_32"]["step_size"] == 2.0 and arms["mist_v2_32"]["rounds"] == 5 and arms["aspl_8"]["rounds"] == 10
    assert declared.family == tuple(f"A_{a}" for a in arms)
    assert declared.source(tmp_path, "ace_8", 11) == (
        tmp_path / "textures_threat" / "ace_8" / "r011" / "run" / "report" / "results.json", "attacking")
    assert declared.source(tmp_path, "mist_v2_4", 11) == (
        tmp_path / "textures" / "r011" / "run" / "report" / "results.json", "attacking")
    contrasts = {c.name: c for c in declared.contrasts}
    assert "against the fixed model" in contrasts["A_ace_16"].question
    config = E.write_replicate_config(tmp_path, declared, 11, "ci", tmp_path / "none.safetensors",
                                      LABS["textures"].classifier, declared.arms[0]).read_text()
    assert 'run = ["attacking"]' in config and 'preset = "ace_fixed"' in config and "rounds" not in config.split(
        "[attack]")[1].split("[")[0]


def test_the_lab2_purifier_follow_up_runs_on_fresh_replicates_with_clean_image_controls(tmp_path):
    """'textures_purify' (confirmatory on lab model 2): replicates no other experiment used (fresh seeds and
    subject crops), its own protect (mist-v2 at 4 levels), no Stage 1; each purifier on the protected AND the
    clean images, so that its removal subtracts its own cost; the analysis reports the share of A remaining under
    each purifier from those pairs."""
    from lab.experiment import LABS

    declared = D.EXPERIMENTS["textures_purify"]
    others = set().union(*(set(d.replicates) for n, d in D.EXPERIMENTS.items() if d.lab == "textures"
                           and n != "textures_purify"))
    assert not set(declared.replicates) & others and set(declared.replicates) <= set(D.CONFIRMATORY)
    assert len(declared.replicates) == 10 and declared.attack == D.MIST_4.attack and not declared.paired_with
    contrasts = {c.name: dict(c.weights) for c in declared.contrasts}
    assert contrasts["removal_diffpure"] == {"diffpure": 1, "diffpure_clean": -1, "attacking": -1, "clean": 1}
    assert contrasts["cost_jpeg"] == {"jpeg_clean": 1, "clean": -1}
    assert contrasts["diffpure_vs_clean"] == {"diffpure": 1, "clean": -1}
    text = E.write_replicate_config(tmp_path, declared, 20, "ci", tmp_path / "none.safetensors",
                                    LABS["textures"].classifier).read_text()
    assert 'run = ["clean", "attacking", "diffpure", "diffpure_clean", "jpeg", "jpeg_clean"]' in text
    assert str(LABS["textures"].replicate_folder(20)) in text and "seed = 1020" in text
    rng = np.random.default_rng(1)
    reps = list(declared.replicates)
    values = {m: {meth: {r: float(rng.normal()) for r in reps} for meth in declared.methods} for m in D.METRICS}
    block = EA.analyse(values, declared)["metrics"]["heldout_loss"]
    v = values["heldout_loss"]
    assert set(block["remaining_shares"]) == {"diffpure", "jpeg"}
    share = np.mean([v["diffpure"][r] - v["diffpure_clean"][r] for r in reps]) / np.mean(
        [v["attacking"][r] - v["clean"][r] for r in reps])
    assert block["remaining_shares"]["diffpure"]["value"] == pytest.approx(share)
    assert all(block["contrasts"][q]["p_holm"] is not None for q in declared.family)
    # diffpure_vs_clean (= A + removal + cost) is read against its declared margin, outside the Holm family
    assert "diffpure_vs_clean" not in declared.family and block["contrasts"]["diffpure_vs_clean"]["p_holm"] is None
    from scipy import stats

    d = np.array([v["diffpure"][r] - v["clean"][r] for r in reps])
    half = stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    eq = block["contrasts"]["diffpure_vs_clean"]["equivalence"]
    assert eq["margin"] == D.TEXTURE_PURIFY_MARGIN and eq["ci90_high"] == pytest.approx(d.mean() + half)
    assert eq["equivalent"] is False  # unit-variance noise: far wider than the margin
    near = {**values, "heldout_loss": {**v, "diffpure": {r: v["clean"][r] + 1e-5 * (-1) ** r for r in reps}}}
    eq = EA.analyse(near, declared)["metrics"]["heldout_loss"]["contrasts"]["diffpure_vs_clean"]["equivalence"]
    assert eq["equivalent"] is True
    assert "**equivalent** to 0 within the margin" in E.markdown(EA.analyse(near, declared))
    below = {**values, "heldout_loss": {**v, "diffpure": {r: v["clean"][r] - 0.01 + 1e-5 * (-1) ** r for r in reps}}}
    eq = EA.analyse(below, declared)["metrics"]["heldout_loss"]["contrasts"]["diffpure_vs_clean"]["equivalence"]
    assert eq["reading"] == "below the margin" and eq["equivalent"] is False
    assert "**below the margin**" in E.markdown(EA.analyse(below, declared))
    # the forest plot shows the reading's two terms on its row: the margin as a band around 0, the 90% interval
    from lab import evidence_report as ER

    result = EA.analyse(near, declared)
    ax = ER.forest_figure(result).axes[0]
    rows = list(result["metrics"]["heldout_loss"]["contrasts"])
    row = len(rows) - 1 - rows.index("diffpure_vs_clean")
    (band,) = ax.collections
    (x0, y0), (x1, y1) = band.get_paths()[0].get_extents().get_points()
    assert (x0, x1) == pytest.approx((-D.TEXTURE_PURIFY_MARGIN, D.TEXTURE_PURIFY_MARGIN)) and y0 < row < y1
    eq = result["metrics"]["heldout_loss"]["contrasts"]["diffpure_vs_clean"]["equivalence"]
    assert any(list(line.get_xdata()) == pytest.approx([eq["ci90_low"], eq["ci90_high"]]) for line in ax.lines)
    assert ax.get_legend() is not None
    assert ER.forest_figure(EA.analyse(values, D.EXPERIMENTS["textures_defense"])).axes[0].get_legend() is None


def test_every_declared_family_names_known_contrasts_of_its_own_methods():
    """A confirmatory question can only be analysed if its contrast exists and the experiment reads every
    method it combines (e.g. 'strength' reuses 'matched''s folder and adds the B'-strength methods)."""
    for declared in D.EXPERIMENTS.values():
        names = {c.name: c for c in declared.contrasts}
        for question in declared.family:
            _, contrast = D.family_question(question)
            assert contrast in names, (declared.name, question)
            assert all(m in declared.methods for m in names[contrast].methods), (declared.name, question)
        for contrast, margin in declared.equivalence:  # a declared equivalence reading: a primary contrast of
            assert contrast in names and contrast not in declared.family and margin > 0, (declared.name, contrast)
            assert all(m in declared.methods for m in names[contrast].methods), (declared.name, contrast)
    assert set(D.STRENGTH_METHODS) <= set(E.folder_methods("matched"))
    assert E.folder_methods("matched")[:len(D.DEFENSE_METHODS)] == D.DEFENSE_METHODS


def test_the_share_slopes_are_least_squares_slopes_per_protected_image():
    """slope_plain / slope_lord read the five share points (0, 2, 4, 6, 8 of 8 protected) as numpy's
    least-squares slope does; slope_lord_vs_plain is their difference."""
    shares = np.array([0, 2, 4, 6, 8])
    plain = dict(zip(("clean", "plain_mix2", "plain_mix4", "plain_mix6", "attacking"), [0.21, 0.25, 0.22, 0.30, 0.29]))
    lord = dict(zip(("lord_clean", "lord_mix2", "lord_mix4", "lord_mix6", "lord"), [0.20, 0.2, 0.26, 0.23, 0.24]))
    gl0 = dict(zip(("lord_clean_gl0", "lord_gl0_mix2", "lord_gl0_mix4", "lord_gl0_mix6", "lord_gl0"),
                   [0.19, 0.23, 0.2, 0.22, 0.27]))
    value = {**plain, **lord}
    contrasts = {c.name: c for c in D.CONTRASTS}
    apply = lambda name: sum(w * {**value, **gl0}[m] for m, w in contrasts[name].weights)  # noqa: E731
    slope = lambda series: np.polyfit(shares, list(series.values()), 1)[0]  # noqa: E731
    assert apply("slope_plain") == pytest.approx(slope(plain))
    assert apply("slope_lord") == pytest.approx(slope(lord))
    assert apply("slope_lord_vs_plain") == pytest.approx(slope(lord) - slope(plain))
    assert apply("slope_gl0") == pytest.approx(slope(gl0))
    assert apply("slope_gl0_vs_plain") == pytest.approx(slope(gl0) - slope(plain))
    assert list(D.SHARE_SERIES["LoRD, B' off at sampling"]) == list(gl0)
    # the report draws the curve only when every share point has replicates
    declared = D.EXPERIMENTS["share"]
    values = {m: {meth: {r: value[meth] + 0.01 * r for r in (10, 11)} for meth in value} for m in D.METRICS}
    result = {**EA.analyse(values, declared), "values": values}
    assert E.share_curve_png(result)[:8] == b"\x89PNG\r\n\x1a\n"
    values[D.PRIMARY].pop("lord_mix4")
    assert E.share_curve_png({**result, "values": values}) is None
    # lab 2's sweep draws a third series, LoRD with B' off at sampling, wherever it has replicates
    both = {**value, **gl0}
    values = {m: {meth: {r: both[meth] + 0.01 * r for r in (10, 11)} for meth in both} for m in D.METRICS}
    result = {**EA.analyse(values, D.EXPERIMENTS["textures_share"]), "values": values}
    three = E.share_curve_png(result)
    assert three[:8] == b"\x89PNG\r\n\x1a\n"
    values[D.PRIMARY].pop("lord_gl0_mix2")  # two series left: drawn without the third
    assert E.share_curve_png({**result, "values": values}) not in (None, three)
    values[D.PRIMARY].pop("plain_mix2")  # no plain curve: nothing to compare with
    assert E.share_curve_png({**result, "values": values}) is None


def test_the_adaptive_attacker_protects_against_the_borrowed_lord_and_reads_clean_runs_from_its_pair(tmp_path):
    """'adaptive_pilot' writes a defense-aware mist-v2-32 config with Stage 1 on ACE-32 copies, runs only
    the methods that see the attack, and reads the clean-image runs from the matched pilot's replicate."""
    from lab.ship import SHIPPED_CLASSIFIER

    adaptive = D.EXPERIMENTS["adaptive_pilot"]
    assert adaptive.own_methods == D.ADAPTIVE_OWN and adaptive.attack["defense_aware"] is True
    config = E.write_replicate_config(tmp_path, adaptive, 3, "ci", tmp_path / "none.safetensors", SHIPPED_CLASSIFIER)
    text = config.read_text()
    assert config == tmp_path / "adaptive_pilot" / "r003" / "exp.toml"
    assert "defense_aware = true" in text and 'preset = "mist_v2"' in text and 'attack_preset = "ace_fixed"' in text
    assert 'run = ["attacking", "lord", "lord_gl0", "onebranch"]' in text
    assert adaptive.source(tmp_path, "lord_clean_gl0", 3) == (
        tmp_path / "matched_pilot" / "r003" / "run" / "report" / "results.json", "lord_clean_gl0")
    from training.experiment_config import load_config

    (tmp_path / "none.safetensors").write_bytes(b"")  # load_config checks that the file exists, not its contents
    assert load_config(config).attack_defense_aware is True
    unaware = E.write_replicate_config(tmp_path, D.EXPERIMENTS["matched_pilot"], 3, "ci", tmp_path / "none.safetensors",
                                       SHIPPED_CLASSIFIER)
    assert "defense_aware" not in unaware.read_text() and "gate_evasion" not in text
    evasion = E.write_replicate_config(tmp_path, D.EXPERIMENTS["evasion_pilot_w10"], 3, "ci",
                                       tmp_path / "none.safetensors", SHIPPED_CLASSIFIER)
    assert evasion == tmp_path / "evasion_pilot_w10" / "r003" / "exp.toml"
    loaded = load_config(evasion)
    assert loaded.attack_defense_aware is True and loaded.attack_gate_evasion == 10.0


def test_the_adaptive_experiment_reads_the_unaware_runs_under_their_aliases(tmp_path):
    """'adaptive' runs only the methods on its own (defense-aware) copies; the clean-image runs and the
    unaware attacker's runs come from 'matched', the latter under aliases, so survival contrasts pair them."""
    adaptive = D.EXPERIMENTS["adaptive"]
    assert adaptive.own_methods == D.ADAPTIVE_OWN
    matched = tmp_path / "matched" / "r012" / "run" / "report" / "results.json"
    assert adaptive.source(tmp_path, "lord_unaware", 12) == (matched, "lord")
    assert adaptive.source(tmp_path, "clean", 12) == (matched, "clean")
    assert adaptive.source(tmp_path, "lord", 12) == (tmp_path / "adaptive" / "r012" / "run" / "report" / "results.json",
                                                     "lord")
    for r, (aware, unaware) in {12: (0.30, 0.20), 13: (0.31, 0.22)}.items():
        for folder, methods in (("adaptive", {"attacking": 0.40, "lord": aware, "lord_gl0": 0.25, "onebranch": 0.4}),
                                ("matched", {"clean": 0.1, "lord_clean": 0.1, "lord_clean_gl0": 0.1,
                                             "onebranch_clean": 0.1, "attacking": 0.35, "lord": unaware,
                                             "lord_gl0": 0.2})):
            _write_heldout_results(tmp_path / folder / f"r{r:03d}", methods)
    values = EA.replicate_values(tmp_path, adaptive, archive=tmp_path / "no_archive")
    rows = EA.analyse(values, adaptive)["metrics"]["heldout_loss"]["contrasts"]
    # (aware lord - aware attacking) - (unaware lord - unaware attacking): (0.30-0.40)-(0.20-0.35), (0.31-0.40)-(0.22-0.35)
    assert rows["survival_lord"]["values"] == pytest.approx([0.05, 0.04])
    assert rows["survival_gl0"]["values"] == pytest.approx([0.0, 0.0], abs=1e-12)  # (0.25-0.40)-(0.20-0.35)


def test_the_stage1_source_experiments_train_on_aspl_copies_and_compare_with_the_matched_lord(tmp_path):
    """'source_aspl' / 'source_mixed' write Stage 1 on ASPL (or ASPL + ACE) copies with their surrogate rounds,
    borrow 'matched''s protected copies, run only the LoRD methods and read the plain runs and the matched
    LoRD's runs (as *_ace) from 'matched'; removal_gl0_vs_ace is the difference of the two removals."""
    from lab.ship import SHIPPED_CLASSIFIER
    from training.experiment_config import load_config, train_config

    for name, preset in (("source_aspl", "aspl"), ("source_mixed", "aspl_ace")):
        declared = D.EXPERIMENTS[name]
        assert declared.own_methods == D.SOURCE_METHODS and declared.borrowed_stages == ("protect",)
        config = E.write_replicate_config(tmp_path, declared, 10, "ci", tmp_path / "none.safetensors",
                                          SHIPPED_CLASSIFIER)
        stage1 = config.read_text().split("[stage1]")[1].split("[stage2]")[0]
        assert f'attack_preset = "{preset}"' in stage1 and "attack_rounds = 1" in stage1  # ci: 1 round
        demo = E.write_replicate_config(tmp_path / "demo", declared, 10, "demo", tmp_path / "none.safetensors",
                                        SHIPPED_CLASSIFIER)
        assert "attack_rounds = 10" in demo.read_text()
        (tmp_path / "none.safetensors").write_bytes(b"")
        stage1_config = train_config(load_config(demo), "stage1")
        assert stage1_config.attack_preset == preset and stage1_config.stage1_attacks()[0][1].rounds == 10
    declared = D.EXPERIMENTS["source_aspl"]
    matched = tmp_path / "matched" / "r011" / "run" / "report" / "results.json"
    assert declared.source(tmp_path, "lord_gl0_ace", 11) == (matched, "lord_gl0")
    assert declared.source(tmp_path, "attacking", 11) == (matched, "attacking")
    for r, gl0 in {11: 0.30, 12: 0.26}.items():
        for folder, methods in (("source_aspl", {"lord": 0.4, "lord_clean": 0.2, "lord_gl0": gl0, "lord_clean_gl0": 0.2}),
                                ("matched", {"clean": 0.2, "attacking": 0.4, "lord": 0.38, "lord_clean": 0.2,
                                             "lord_gl0": 0.25, "lord_clean_gl0": 0.21})):
            _write_heldout_results(tmp_path / folder / f"r{r:03d}", methods)
    values = EA.replicate_values(tmp_path, declared, archive=tmp_path / "no_archive")
    rows = EA.analyse(values, declared)["metrics"]["heldout_loss"]["contrasts"]
    # (gl0 - 0.2) - (0.25 - 0.21)
    assert rows["removal_gl0_vs_ace"]["values"] == pytest.approx([0.06, 0.02])
    assert rows["removal_gl0"]["values"] == pytest.approx([-0.1, -0.14])  # (gl0 - 0.2) - (0.4 - 0.2)


def test_the_report_shows_the_first_samples_of_every_method(tmp_path):
    """``sample_grid_png``: one labelled row per method from the first replicate whose runs still hold their
    samples (read where the experiment reads each method, e.g. the clean runs from its pair); without the pair's
    folder, its own methods' rows; None when no replicate has even those (only results.json is archived)."""
    from PIL import Image

    declared = D.EXPERIMENTS["source_aspl"]
    assert EA.sample_grid_png(tmp_path, declared) is None
    for folder, methods in (("source_aspl", D.SOURCE_METHODS), ("matched", ("clean", "attacking", "lord", "lord_clean",
                                                                           "lord_gl0", "lord_clean_gl0"))):
        report = tmp_path / folder / "r011" / "run" / "report"
        (report / "img").mkdir(parents=True, exist_ok=True)
        for k, m in enumerate(methods):
            Image.new("RGB", (32, 32), (10 * k, 0, 0)).save(report / "img" / f"{m}.png")
        (report / "results.json").write_text(json.dumps({"methods": {m: {"samples": [f"img/{m}.png"] * 3}
                                                                     for m in methods}}))
    png, replicate = EA.sample_grid_png(tmp_path, declared, per_method=3)
    assert replicate == 11 and png[:8] == b"\x89PNG\r\n\x1a\n"
    # the paired experiment's folder gone: the experiment's own rows are still shown (the missing ones named)
    import shutil

    shutil.rmtree(tmp_path / "matched")
    png, replicate = EA.sample_grid_png(tmp_path, declared, per_method=3)
    assert replicate == 11 and png[:8] == b"\x89PNG\r\n\x1a\n"
    # one of its own runs without samples: no grid
    (tmp_path / "source_aspl" / "r011" / "run" / "report" / "results.json").write_text(json.dumps(
        {"methods": {m: {"samples": [f"img/{m}.png"] * 3} for m in D.SOURCE_METHODS[1:]}}))
    assert EA.sample_grid_png(tmp_path, declared, per_method=3) is None


def test_a_tall_figures_title_stays_above_its_first_row():
    """``png_bytes(fig, clear_of=suptitle)`` keeps room for the title: on a sample grid as tall as textures_threat's
    (13 rows of 64 px strips) tight_layout alone put the title inside the first row; a two-line title fits too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lab import evidence_report as ER

    for lines in (1, 2):
        fig = Figure(figsize=(14.4, 13 * 1.75))
        FigureCanvasAgg(fig)
        for i in range(13):
            fig.add_subplot(13, 1, i + 1).imshow(np.zeros((64, 512, 3)))
        title = fig.suptitle("\n".join(["a title"] * lines), fontsize=9)
        ER.png_bytes(fig, clear_of=title)
        renderer = fig.canvas.get_renderer()
        assert title.get_window_extent(renderer).y0 >= fig.axes[0].get_window_extent(renderer).y1, lines


def test_workers_are_numbered_from_zero_and_a_worker_outside_the_range_is_refused(capsys):
    assert E.parse_worker(None) == (0, 1)
    assert E.parse_worker("1/2") == (1, 2)
    with pytest.raises(ValueError, match="K >= 1"):
        E.parse_worker("0/0")
    for bad in ("2/2", "-1/2", "0/0", "1", "a/2"):  # "2/2" once selected no replicate and exited 0 silently
        with pytest.raises(ValueError, match="--worker"):
            E.parse_worker(bad)
    with pytest.raises(SystemExit, match="0/2 and 1/2"):
        E.main(["run", "textures_defense", "--worker", "2/2"])
    assert E.parse_replicates("10-12,15", range(0)) == [10, 11, 12, 15]
    for bad in ("12-10", "ten"):
        with pytest.raises(ValueError, match="--replicates"):
            E.parse_replicates(bad, range(0))
    # a valid worker that owns none of the chosen replicates says so instead of running nothing silently
    assert E.main(["run", "textures_defense", "--replicates", "10", "--worker", "1/2"]) == 0
    assert "worker 1/2 has none of replicates [10]" in capsys.readouterr().out
    # run takes a queue of experiments, each in turn with this worker's share ("textures" 10-19, "textures_purify"
    # 20-29: worker 99/100 owns none of either)
    assert E.main(["run", "textures", "textures_purify", "--worker", "99/100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[evidence] textures", "[evidence] textures_purify"]


def test_status_estimates_the_stage_time_left_from_the_finished_replicates(tmp_path):
    """``status`` adds the stage time left: per unfinished replicate, the median time of each stage it has
    finished neither in the output folder nor in the carry (stage.json's seconds, else the replicate's
    timings.json), summed; stages never timed (or only started) are counted, not guessed; with no finished
    replicate the sum is a lower bound and says so."""
    declared = D.EXPERIMENTS["textures_purify"]
    folder = declared.home

    def finish(r, name, seconds=None, timings=None):
        stage = E.replicate_dir(tmp_path, folder, r) / "run" / "stages" / name.replace("/", "__")
        stage.mkdir(parents=True, exist_ok=True)
        record = {"digest": "x", "name": name, "result": {}} | ({"seconds": seconds} if seconds is not None else {})
        (stage / "stage.json").write_text(json.dumps(record))
        if timings:
            (stage.parent.parent / "timings.json").write_text(json.dumps({"ran": [], "seconds": timings}))

    for r, t in ((20, 100.0), (21, 300.0), (22, 200.0)):
        finish(r, "protect", t)
        finish(r, "train/plain-clean", timings={"train/plain-clean": t / 10})
    finish(20, "reference")  # finished, never timed
    started = E.replicate_dir(tmp_path, folder, 20) / "run" / "stages" / "purify__jpeg_clean"
    started.mkdir()
    (started / "key.json").write_text("{}")  # started, not finished: a stage to run, untimed
    times = E.stage_times(tmp_path, folder)
    assert times == {"protect": [100.0, 300.0, 200.0], "train/plain-clean": [10.0, 30.0, 20.0], "reference": [],
                     "purify/jpeg_clean": []}
    carried = tmp_path / "carry"
    assert E.time_left(tmp_path, folder, 21, times, set(times), carried) == (0.0, 2)  # two untimed stages left
    assert E.time_left(tmp_path, folder, 23, times, set(times), carried) == (200.0 + 20.0, 2)  # not started: medians
    kept = E.replicate_dir(carried, folder, 23) / "run" / "stages" / "protect"  # finished in the carry only
    kept.mkdir(parents=True)
    (kept / "stage.json").write_text(json.dumps({"name": "protect"}))
    assert E.time_left(tmp_path, folder, 23, times, set(times), carried) == (20.0, 2)
    states = [(None, r, ("not started", 0, False, [])) for r in (23, 24)]
    line = E.status_lines(declared, states, {(None, 23): (3600.0, 1, False), (None, 24): (3600.0, 0, False)})[0]
    assert "about 2.0 hours of one worker's stage time left" in line and "1 stage run(s) never timed" in line
    line = E.status_lines(declared, states, {(None, 23): (0.0, 3, True)})[0]  # untimed only, nothing finished
    assert "0.0 hours" not in line and "stage time left not known yet: none of the stages left has a recorded time" in line
    line = E.status_lines(declared, states, {(None, 23): (60.0, 3, True)})[0]  # timed in part, nothing finished
    assert "at least 0.0 hours" in line and "no replicate in this folder has finished" in line
    assert "stage time left" not in E.status_lines(declared, states)[0]
    # a dose-response: arms no replicate has reached share one line, the others keep theirs
    threat = D.EXPERIMENTS["textures_threat"]
    first, *rest = threat.arms
    states = [(arm, r, ("finished" if (arm is first and r == 10) else "not started", 0, False, []))
              for arm in threat.arms for r in threat.replicates]
    lines = E.status_lines(threat, states)
    assert len(lines) == 2 and lines[0].startswith(f"textures_threat arm {first.name} (replicates 10-19): 1 finished")
    assert lines[1] == (f"textures_threat: {len(rest)} arm(s) not started (replicates 10-19 each): "
                        + ", ".join(a.name for a in rest))
    assert len(E.status_lines(threat, states, {(rest[0].name, 10): (60.0, 0, False)})) == 3  # an estimate: own line


def test_a_replicate_whose_results_name_methods_this_code_does_not_run_there_is_flagged(tmp_path):
    """Experiments share folders (textures_share runs in textures_defense's): code older than such an experiment
    would rewrite the folder's report without the newer methods. ``methods_dropped`` names them, and no archived
    replicate of this repository is flagged by the current code."""
    results = tmp_path / "results.json"
    own = E.folder_methods("textures_defense")
    results.write_text(json.dumps({"methods": {m: {} for m in own}}))
    assert E.methods_dropped(results, "textures_defense") == []
    results.write_text(json.dumps({"methods": {m: {} for m in own + ("lord_gl0_mix8", "plain_mix9")}}))
    assert E.methods_dropped(results, "textures_defense") == ["lord_gl0_mix8", "plain_mix9"]
    assert E.methods_dropped(tmp_path / "missing.json", "textures_defense") == []
    # the other way round: an archived textures_defense replicate (from before textures_share was declared)
    # answers textures_defense but not textures_share, whose own methods it lacks
    results.write_text(json.dumps({"methods": {m: {} for m in D.EXPERIMENTS["textures_defense"].own_methods}}))
    assert E.methods_missing(results, D.EXPERIMENTS["textures_defense"]) == []
    assert E.methods_missing(results, D.EXPERIMENTS["textures_share"]) == list(D.TEXTURE_SHARE_METHODS)
    arm = D.EXPERIMENTS["textures_threat"].arms[0]
    results.write_text(json.dumps({"methods": {"attacking": {}}}))
    assert E.methods_missing(results, D.EXPERIMENTS["textures_threat"], arm) == []
    for archived in sorted(EA.ARCHIVE.rglob("r*.json")):
        assert E.methods_dropped(archived, str(archived.parent.relative_to(EA.ARCHIVE))) == [], archived


def test_a_confirmatory_report_waits_for_every_replicate_and_publishes_only_complete(tmp_path, monkeypatch, capsys):
    """EVIDENCE.md's stopping rule in the tool: ``report`` refuses a confirmatory experiment with unfinished
    replicates (``--interim`` analyses them labelled INTERIM); ``--publish`` copies a complete report of
    demo-scale runs into docs/evidence as ``<name>_<file>``."""
    import dataclasses

    textures = dataclasses.replace(D.EXPERIMENTS["textures"], replicates=range(10, 13))
    monkeypatch.setitem(E.EXPERIMENTS, "textures", textures)
    monkeypatch.setattr(E, "PUBLISHED", tmp_path / "published")
    out, archive = tmp_path / "out", tmp_path / "archive"
    rng = np.random.default_rng(3)

    def finish(r, scale="demo"):
        from lab.experiment import SCALES

        p = SCALES[scale]
        config = {"stage1": {"steps": p["stage1_steps"]}, "stage2": {"steps": p["stage2_steps"]},
                  "sampling": {"images": p["images"], "steps": p["sample_steps"]}}
        path = archive / "textures" / f"r{r:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"methods": {m: {"metrics": {"heldout_loss": {"mean": float(rng.normal())}}}
                                                for m in textures.methods}, "provenance": {"config": config}}))

    finish(10), finish(11)
    args = ["report", "textures", "--out", str(out), "--archive", str(archive), "--carry", str(tmp_path / "carry")]
    with pytest.raises(SystemExit, match=r"1 declared replicate\(s\) have not finished \(12\)"):
        E.main(args)
    with pytest.raises(SystemExit, match="only a complete report is published"):
        E.main(args + ["--interim", "--publish"])
    assert E.main(args + ["--interim"]) == 0
    text = (out / "textures" / "analysis.md").read_text()
    assert "**INTERIM**: 1 declared replicate(s) not finished (12)" in text
    assert json.loads((out / "textures" / "analysis.json").read_text())["interim"]["unfinished"] == ["12"]
    assert not (tmp_path / "published").exists()
    finish(12, scale="ci")  # a ci-scale run (minutes, not the declared protocol) is never published
    with pytest.raises(SystemExit, match=r"3 run\(s\) were not made at demo scale.*: 12 clean \(.*r012.json: ci\)"):
        E.main(args + ["--publish"])
    assert not (tmp_path / "published").exists()
    finish(12)
    stale = tmp_path / "published" / "textures_samples.png"  # an earlier report's grid: this one makes none
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    (out / "textures" / "samples.png").write_bytes(b"old")  # nor is a leftover in the output folder published
    capsys.readouterr()
    assert E.main(args + ["--publish"]) == 0
    published = tmp_path / "published" / "textures_analysis.md"
    assert published.read_text() == (out / "textures" / "analysis.md").read_text() and "INTERIM" not in published.read_text()
    assert (tmp_path / "published" / "textures_forest.png").read_bytes()[:4] == b"\x89PNG"
    assert not stale.exists() and sorted(p.name for p in stale.parent.iterdir()) == [
        "textures_analysis.json", "textures_analysis.md", "textures_forest.png"]


def test_a_per_arm_stopping_rule_reports_the_finished_arms_and_a_paired_run_counts(tmp_path, monkeypatch):
    """lab 1's "threat" declared a per-arm stopping rule: its report runs with an arm unfinished (stated, no
    INTERIM); a replicate whose own run finished but whose paired 'clean' run is missing is "waiting", not
    finished."""
    import dataclasses

    threat = dataclasses.replace(D.EXPERIMENTS["threat"], replicates=range(10, 12))
    monkeypatch.setitem(E.EXPERIMENTS, "threat", threat)
    out, archive = tmp_path / "out", tmp_path / "archive"
    for r in (10, 11):
        for method in threat.methods:
            path, name = threat.source(out, method, r)
            if method == "aspl_16" and r == 11:
                continue  # one arm unfinished
            data = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
            data["methods"][name] = {"metrics": {"heldout_loss": {"mean": 0.1 * r + len(method) / 100}}}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
    assert E.unfinished(out, threat, archive) == ["aspl_16/11"]
    assert E.main(["report", "threat", "--out", str(out), "--archive", str(archive)]) == 0
    text = (out / "threat" / "analysis.md").read_text()
    assert "Not finished: aspl_16/11; the declared stopping rule (per_arm)" in text and "INTERIM" not in text
    clean, _ = threat.source(out, "clean", 10)
    clean.unlink()  # the paired experiment's run is gone: the arm's own run alone does not finish a replicate
    state = E.replicate_state(out, threat, 10, threat.arms[0], archive)
    assert state[0] == "waiting" and state[3] == ["clean"]


def test_a_dose_response_arm_finds_its_clean_run_in_the_output_folder_or_the_archive(tmp_path):
    """An arm of "textures_threat" reads the clean run from "textures"; a machine whose output folder lost that
    run still has it archived, and the run's note ("... is missing") is printed only when neither has it."""
    declared = D.EXPERIMENTS["textures_threat"]
    out, archive = tmp_path / "out", tmp_path / "archive"
    expected = E.replicate_dir(out, "textures", 10) / "run" / "report" / "results.json"
    assert E.missing_pair(declared, out, 10, archive) == expected  # in neither place
    kept = EA.archived(expected, out, archive)
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    assert E.missing_pair(declared, out, 10, archive) is None  # archived only
    assert E.missing_pair(declared, out, 11, archive) == E.replicate_dir(out, "textures", 11) / "run" / "report" / \
        "results.json"
    expected.parent.mkdir(parents=True)
    expected.write_text("{}")
    kept.unlink()
    assert E.missing_pair(declared, out, 10, archive) is None  # in the output folder only
    # this repository's archive holds every "textures" replicate the arms pair with
    assert all(E.missing_pair(declared, tmp_path / "empty", r) is None for r in declared.replicates)


def test_the_dose_curve_draws_each_attacks_effect_against_its_budget_and_marks_what_was_established():
    """textures_threat's report draws, per attack preset, A (arm minus clean) at 4, 8, 16 and 32 levels with its
    95% interval, on the primary metric and on the target correlation; a marker is filled only where the declared
    question is established (Holm), a square marks the reference arm; an experiment without arms draws none."""
    from lab import evidence_report as ER

    declared = D.EXPERIMENTS["textures_threat"]
    reps = list(declared.replicates)
    rng = np.random.default_rng(3)
    # ASPL damages at 32 levels in every replicate; every other arm is noise around 0
    shift = {"aspl_32": 0.05}
    values = {m: {meth: {r: float(rng.normal(0, 0.01)) + shift.get(meth, 0.0) for r in reps}
                  for meth in declared.methods} for m in D.METRICS}
    result = {**EA.analyse(values, declared), "values": values}
    fig = ER.dose_curve_figure(result)
    primary, corr = fig.axes
    assert "held-out" in primary.get_title() and "target" in corr.get_title()
    contrasts = result["metrics"][D.PRIMARY]["contrasts"]
    markers = [line for line in primary.lines if line.get_marker() in ("o", "s")]
    assert len(markers) == 12  # 11 declared arms + the reference arm mist_v2_4
    filled = {round(float(line.get_ydata()[0]), 9) for line in markers
              if line.get_marker() == "o" and line.get_markerfacecolor() != "white"}
    assert filled == {round(contrasts["A_aspl_32"]["mean"], 9)}
    assert contrasts["A_aspl_32"]["p_holm"] < 0.05
    squares = [line for line in markers if line.get_marker() == "s"]  # the reference arm: judged in "textures"
    assert len(squares) == 1 and float(squares[0].get_ydata()[0]) == pytest.approx(contrasts["A_mist_v2_4"]["mean"])
    assert squares[0].get_fillstyle() == "left"
    # the target correlation is exploratory here: no marker is filled, whatever its intervals
    corr_markers = [line for line in corr.lines if line.get_marker() in ("o", "s")]
    assert len(corr_markers) == 12
    assert all(line.get_markerfacecolor() == "white" for line in corr_markers if line.get_marker() == "o")
    assert "(exploratory)" in corr.get_title() and "n = 10 replicates" in fig._suptitle.get_text()
    series = ER.dose_series(result, D.PRIMARY)
    assert {p: [b for b, _, _ in pts] for p, pts in series.items()} == {
        "ace_fixed": [4, 8, 16, 32], "anti_dreambooth_aspl": [4, 8, 16, 32], "mist_v2": [4, 8, 16, 32]}
    assert ER.dose_curve_png(result)[:8] == b"\x89PNG\r\n\x1a\n"
    # an arm not analysed is left out (a preset with one budget left is a point); no target correlation: one panel
    import copy

    part = copy.deepcopy(result)
    for name in ("A_ace_8", "A_ace_16", "A_ace_32"):
        part["metrics"][D.PRIMARY]["contrasts"].pop(name)
    part["metrics"]["target_corr"]["contrasts"] = {}
    (only,) = ER.dose_curve_figure(part).axes
    assert len([line for line in only.lines if line.get_marker() in ("o", "s")]) == 9
    assert [b for b, _, _ in ER.dose_series(part, D.PRIMARY)["ace_fixed"]] == [4]
    # an experiment without a dose-response (no arms) has no curve
    defense = D.EXPERIMENTS["defense"]
    values = {m: {meth: {r: float(rng.normal()) for r in reps[:3]} for meth in defense.methods} for m in D.METRICS}
    assert ER.dose_curve_png(EA.analyse(values, defense)) is None


def test_redraw_draws_a_published_reports_figures_from_its_analysis_alone(tmp_path, monkeypatch):
    """``redraw`` reads only ``<name>_analysis.json`` from the published folder and writes the figures the analysis
    yields (the same bytes ``report`` draws: forest plot, dose curve), leaving the analysis itself untouched; a name
    without a published analysis is refused with what to do."""
    from lab import evidence_report as ER

    monkeypatch.setattr(E, "PUBLISHED", tmp_path)
    declared = D.EXPERIMENTS["textures_threat"]
    rng = np.random.default_rng(5)
    values = {m: {meth: {r: float(rng.normal(0, 0.01)) for r in declared.replicates} for meth in declared.methods}
              for m in D.METRICS}
    result = {**EA.analyse(values, declared), "values": values}
    text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
    (tmp_path / "textures_threat_analysis.json").write_text(text)
    assert E.main(["redraw", "textures_threat"]) == 0
    assert list(json.loads(text)["metrics"][D.PRIMARY]["contrasts"]) != list(result["metrics"][D.PRIMARY]["contrasts"])
    assert (tmp_path / "textures_threat_dose_curve.png").read_bytes() == ER.dose_curve_png(result)
    # the json's sorted keys are put back in the analysis' order: the forest plot's rows as report drew them
    assert (tmp_path / "textures_threat_forest.png").read_bytes() == ER.forest_png(result)
    assert not (tmp_path / "textures_threat_share_curve.png").exists()
    assert (tmp_path / "textures_threat_analysis.json").read_text() == text
    with pytest.raises(SystemExit, match="no published analysis .*report textures_share --publish"):
        E.main(["redraw", "textures_share"])


def _archived_experiments() -> list[str]:
    """The reported experiments whose every declared run is archived (their analysis can be made again)."""
    names = []
    for name, declared in D.EXPERIMENTS.items():
        if not (E.PUBLISHED / f"{name}_analysis.json").is_file():
            continue
        runs = [EA.archived(declared.source(Path("/nowhere"), m, r)[0], Path("/nowhere"))
                for m in declared.methods for r in declared.replicates]
        if all(p.is_file() for p in runs):
            names.append(name)
    return names


@pytest.mark.parametrize("name", _archived_experiments())
def test_a_published_analysis_is_made_again_from_the_archived_runs(name, tmp_path):
    """Every number a published report states -- each contrast's mean, interval, d_z, p and Holm p, the shares of A
    remaining, the gate summaries -- comes out the same when today's code analyses the archived runs (an empty
    output folder: the archive alone). Code added after publication may only add exploratory rows; a change to
    the analysis, the decision rule's inputs or the archive that moves a published number fails here."""
    declared = D.EXPERIMENTS[name]
    published = json.loads((E.PUBLISHED / f"{name}_analysis.json").read_text())
    again = EA.analyse(EA.replicate_values(tmp_path, declared), declared)
    for metric, block in published["metrics"].items():
        for contrast, row in block["contrasts"].items():
            now = again["metrics"][metric]["contrasts"][contrast]
            for key in ("n", "mean", "ci_low", "ci_high", "d_z", "p", "p_holm"):
                want = row.get(key)
                assert now.get(key) == (None if want is None else pytest.approx(want, rel=1e-9, abs=1e-12)), (
                    metric, contrast, key)
        for prot, share in (block.get("remaining_shares") or {}).items():
            now = again["metrics"][metric]["remaining_shares"][prot]
            assert [now[k] for k in ("value", "ci_low", "ci_high")] == pytest.approx(
                [share[k] for k in ("value", "ci_low", "ci_high")], rel=1e-9), (metric, prot)
    gates = EA.summarise_replicates(EA.gate_values(tmp_path, declared))
    assert set(gates) == set(published.get("gates") or {})
    for k, row in (published.get("gates") or {}).items():
        assert gates[k]["mean"] == pytest.approx(row["mean"], rel=1e-9), k


def test_every_archived_report_is_checked():
    """The check above runs on every reported experiment whose runs are archived (a newly published one joins it
    by itself); the twelve of 2026-12-05 are among them."""
    assert {"matched", "strength", "share", "adaptive", "source_aspl", "source_mixed", "evasion", "textures",
            "textures_defense", "textures_share", "textures_purify", "textures_threat"} <= set(_archived_experiments())


def test_heldout_treats_the_held_out_images_as_a_sample_of_the_subject(tmp_path, monkeypatch, capsys):
    """``heldout``: each declared held-out-loss question computed per replicate and per held-out image (the runner's
    ``per_image`` losses), its published interval (images fixed: Student t over the replicates) beside the crossed
    one (replicates x images, lord_ops.analysis.crossed_interval) and Holm over the questions shown; a contrast
    whose runs scored different images is left out; an experiment with unfinished replicates is named, not
    analysed; --publish writes heldout_sensitivity.md / .json."""
    from lord_ops import analysis as an

    monkeypatch.setattr(E, "PUBLISHED", tmp_path / "published")
    (tmp_path / "published").mkdir()
    from lab.experiment import SCALES

    declared = D.EXPERIMENTS["textures"]
    rng = np.random.default_rng(0)
    image_effect = rng.normal(0, 0.01, 4)
    demo = {"stage1": {"steps": SCALES["demo"]["stage1_steps"]}, "stage2": {"steps": SCALES["demo"]["stage2_steps"]},
            "sampling": {"images": SCALES["demo"]["images"], "steps": SCALES["demo"]["sample_steps"]}}
    names = [f"wood_{i:03d}" for i in range(4)]
    losses = {}
    for r in declared.replicates:
        methods = {}
        for meth, shift in (("clean", 0.0), ("attacking", 0.002), ("noise", 0.002)):
            per = [0.05 + shift * (1 + image_effect[i] * 50) + rng.normal(0, 0.0005) for i in range(4)]
            losses[meth, r] = per
            listed = names if not (meth == "noise" and r == 12) else [n + "x" for n in names]
            methods[meth] = {"metrics": {"heldout_loss": {"mean": float(np.mean(per)), "per_image": per,
                                                          "names": listed},
                                         "target_corr": {"mean": shift * 20 + float(rng.normal(0, 0.01))}}}
        results, _ = declared.source(tmp_path, "clean", r)
        results.parent.mkdir(parents=True)
        results.write_text(json.dumps({"methods": methods, "provenance": {"config": demo}}))
    result = EA.heldout_sensitivity(tmp_path, declared, tmp_path / "no_archive")
    rows = result["questions"]
    assert set(rows) == {"A"}  # noise_vs_plain_prot: replicate 12's noise run scored other images
    assert result["skipped"] == {
        "noise_vs_plain_prot": "its runs scored different held-out images (in Holm's family with its published p)"}
    # Holm's family is the declared one: the co-primary questions and the skipped one with their published p
    assert set(result["holm_with"]) == {"noise_vs_plain_prot", "target_corr:A", "target_corr:noise_vs_plain_prot"}
    d = [[losses["attacking", r][i] - losses["clean", r][i] for i in range(4)] for r in declared.replicates]
    mean, _, low, high = an.mean_interval([np.mean(row) for row in d])
    assert (rows["A"]["mean"], rows["A"]["ci_low"], rows["A"]["ci_high"]) == (
        pytest.approx(mean), pytest.approx(low), pytest.approx(high))
    crossed = an.crossed_interval(d)
    assert rows["A"]["crossed"]["ci_low"] == pytest.approx(crossed["ci_low"]) and rows["A"]["images"] == 4
    assert rows["A"]["crossed"]["p_holm"] >= crossed["p"] and rows["A"]["published_established"] is not None
    # lab 2's reference crops come from fewer wood textures: the sources are a sample too
    assert EA.reference_sources("fashion") is None
    assert len(set(EA.reference_sources("textures").values())) < len(EA.reference_sources("textures"))
    common = ["--out", str(tmp_path), "--archive", str(tmp_path / "no_archive"), "--carry", str(tmp_path / "no_carry")]
    assert E.main(["heldout", "textures", "textures_defense", *common]) == 0
    shown = capsys.readouterr().out
    assert "Not analysed: textures_defense (none of its runs is in the output folder or the archive)." in shown
    with pytest.raises(SystemExit, match="not analysed: textures_defense .*nothing published"):
        E.main(["heldout", "textures", "textures_defense", *common, "--publish"])  # only complete sets are published
    assert not (tmp_path / "published" / "heldout_sensitivity.md").exists()
    assert E.main(["heldout", "textures", *common, "--publish"]) == 0
    text = (tmp_path / "published" / "heldout_sensitivity.md").read_text()
    assert "## textures" in text and "| A | 10 x 4 |" in text and "holds with the images a sample" in text
    assert "Not analysed: noise_vs_plain_prot (its runs scored different held-out images" in text
    published = json.loads((tmp_path / "published" / "heldout_sensitivity.json").read_text())
    assert published["textures"]["questions"]["A"]["images"] == 4
    assert text in capsys.readouterr().out
    ci_run, _ = declared.source(tmp_path, "clean", 10)  # a run at another scale is never published
    ci_run.write_text(ci_run.read_text().replace('"provenance": {"config": {"stage1": {"steps": ',
                                                 '"provenance": {"config": {"stage1": {"steps": 1'))
    with pytest.raises(SystemExit, match="textures \\(some of its runs were not made at demo scale"):
        E.main(["heldout", "textures", *common, "--publish"])
    assert (tmp_path / "published" / "heldout_sensitivity.md").read_text() == text  # the published files untouched


def test_the_heldout_reading_sets_the_published_decision_against_the_crossed_tests():
    """"holds" only when the published decision was established and every crossed test (images; sources, where
    the images are crops of fewer sources) excludes 0 on the published sign with Holm p < 0.05; the other
    readings likewise, and a question missing from the published analysis is said to be."""
    from lab.evidence_report import heldout_reading

    yes = {"ci_low": 0.1, "ci_high": 0.3, "p_holm": 0.01}
    no = {"ci_low": -0.1, "ci_high": 0.3, "p_holm": 0.4}
    multiplicity = {"ci_low": 0.1, "ci_high": 0.3, "p_holm": 0.06}
    other_sign = {"ci_low": -0.3, "ci_high": -0.1, "p_holm": 0.01}

    def read(established, crossed, **extra):
        return heldout_reading({"published_established": established, "mean": 0.2, "crossed": crossed, **extra})

    assert read(True, yes) == "holds with the images a sample"
    assert read(True, yes, by_source=no) == "depends on these source textures"
    assert read(True, yes, by_source=other_sign) == "depends on these source textures"
    assert read(True, multiplicity) == "depends on these images"
    assert read(False, no) == "not established either way"
    assert read(False, yes) == "established only with the images a sample"
    assert read(None, yes) == "not in the published analysis"
