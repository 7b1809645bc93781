"""lab/carry.py: unfinished replicates' stages carried through the repository (plain files, no ComfyUI)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from lab import carry
from lab.declared import EXPERIMENTS
from lab.evidence import main as evidence_main

FOLDER = "textures_defense"


def _stage(root, name, *, done, files=(), lock=None):
    folder = root / FOLDER / "r012" / "run" / "stages" / name
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps({"digest": name}))
    if done:
        (folder / "stage.json").write_text(json.dumps({"digest": name, "result": {}}))
    for rel, data in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if lock:
        (folder / "lock").write_text(lock)
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_save_keeps_outputs_and_resumable_work_but_not_locks_or_finished_caches(tmp_path):
    out, kept = tmp_path / "out", tmp_path / "carry"
    _stage(out, "protect", done=True, files=[("images/0.png", b"png"), ("pgd_cache/x", b"c")])
    _stage(out, "stage1", done=True, files=[("lord.safetensors", b"L"), ("checkpoint.pt", b"ck"),
                                            ("pgd_cache/a.safetensors", b"copy")])
    _stage(out, "stage1_onebranch", done=False, files=[("checkpoint.pt", b"ck1")],
           lock=f"{_dead_pid()}@{socket.gethostname()}")
    _stage(out, "train__plain-clean", done=False, files=[("checkpoint.pt", b"ck2"), ("samples/0.png", b"s"),
                                                        ("samples/.1.png.abc.tmp", b"half")],
           lock=f"{os.getpid()}@{socket.gethostname()}")  # running now: its whole files are carried
    (out / FOLDER / "r012" / "exp.toml").write_text("x")

    report = carry.save(out, FOLDER, kept)

    base = "textures_defense/r012/run/stages/"
    assert _tree(kept) == sorted(base + p for p in [
        "protect/images/0.png", "protect/key.json", "protect/stage.json",  # finished: no pgd_cache
        "stage1/key.json", "stage1/lord.safetensors", "stage1/stage.json",
        "stage1/pgd_cache/a.safetensors",  # the one-branch control still needs the copies
        "stage1_onebranch/checkpoint.pt", "stage1_onebranch/key.json",  # started: resumable, no lock
        "train__plain-clean/checkpoint.pt", "train__plain-clean/key.json", "train__plain-clean/samples/0.png"])
    assert len(report.copied) == 4 and not report.skipped

    # saving again changes nothing; once the control has finished, stage1's copies are dropped
    assert carry.save(out, FOLDER, kept).copied == []
    onebranch = out / FOLDER / "r012" / "run" / "stages" / "stage1_onebranch"
    (onebranch / "stage.json").write_text("{}")
    (onebranch / "lora.safetensors").write_bytes(b"B")
    report = carry.save(out, FOLDER, kept)
    assert sorted(report.copied) == ["textures_defense/r012/stage1", "textures_defense/r012/stage1_onebranch"]
    assert not (kept / base / "stage1" / "pgd_cache").exists()
    assert _tree(kept / base / "stage1_onebranch") == ["key.json", "lora.safetensors", "stage.json"]
    # the running stage's next file is carried by the next save; a vanished one is dropped
    (out / base / "train__plain-clean" / "samples" / "1.png").write_bytes(b"t")
    (out / base / "train__plain-clean" / "checkpoint.pt").unlink()
    assert carry.save(out, FOLDER, kept).copied == ["textures_defense/r012/train__plain-clean"]
    assert _tree(kept / base / "train__plain-clean") == ["key.json", "samples/0.png", "samples/1.png"]


def test_save_drops_finished_replicates_and_stages_the_output_folder_lost(tmp_path):
    out, kept = tmp_path / "out", tmp_path / "carry"
    _stage(out, "protect", done=True, files=[("a", b"1")])
    _stage(out, "stage1", done=False, files=[("checkpoint.pt", b"2")])
    carry.save(out, FOLDER, kept)
    import shutil
    shutil.rmtree(out / FOLDER / "r012" / "run" / "stages" / "stage1")  # e.g. its config changed
    assert carry.save(out, FOLDER, kept).removed == ["textures_defense/r012/stage1"]
    report = out / FOLDER / "r012" / "run" / "report"
    report.mkdir()
    (report / "results.json").write_text("{}")
    assert carry.save(out, FOLDER, kept).removed == ["textures_defense/r012"]
    assert not (kept / FOLDER / "r012").exists()


def test_restore_fills_what_the_output_folder_lacks_and_upgrades_started_stages(tmp_path):
    out, kept, fresh = tmp_path / "out", tmp_path / "carry", tmp_path / "fresh"
    _stage(out, "protect", done=True, files=[("images/0.png", b"png")])
    _stage(out, "stage1", done=False, files=[("checkpoint.pt", b"ck")])
    carry.save(out, FOLDER, kept)

    report = carry.restore(fresh, FOLDER, kept)
    assert sorted(report.copied) == ["textures_defense/r012/protect", "textures_defense/r012/stage1"]
    assert _tree(fresh) == _tree(kept)
    assert carry.restore(fresh, FOLDER, kept).copied == []  # the output folder has them now

    # a carried finished stage replaces a started one; a finished one in the output folder is never replaced
    stage1 = out / FOLDER / "r012" / "run" / "stages" / "stage1"
    (stage1 / "stage.json").write_text("{}")
    (stage1 / "lord.safetensors").write_bytes(b"L")
    carry.save(out, FOLDER, kept)
    assert carry.restore(fresh, FOLDER, kept).copied == ["textures_defense/r012/stage1"]
    assert _tree(fresh / FOLDER / "r012" / "run" / "stages" / "stage1") == ["key.json", "lord.safetensors",
                                                                          "stage.json"]
    assert not list(fresh.rglob(".*restoring"))
    # ... unless a running process is computing the started one
    busy = tmp_path / "busy"
    _stage(busy, "stage1", done=False, lock=f"{os.getpid()}@{socket.gethostname()}")
    report = carry.restore(busy, FOLDER, kept)
    assert ("textures_defense/r012/stage1", "a running process is computing it") in report.skipped
    assert not (busy / FOLDER / "r012" / "run" / "stages" / "stage1" / "stage.json").exists()
    assert carry.restore(fresh, FOLDER, kept, replicate="r013").copied == []


def test_cli_carry_and_restore(tmp_path, capsys):
    out, kept, fresh = tmp_path / "out", tmp_path / "carry", tmp_path / "fresh"
    _stage(out, "protect", done=True, files=[("a", b"1")])
    assert evidence_main(["carry", "textures_defense", "--out", str(out), "--carry", str(kept)]) == 0
    assert "1 stage(s) copied" in capsys.readouterr().out
    assert evidence_main(["restore", "textures_defense", "--out", str(fresh), "--carry", str(kept)]) == 0
    assert (fresh / FOLDER / "r012" / "run" / "stages" / "protect" / "stage.json").is_file()
    # one process carries several experiments: a folder two share is saved once, every arm's folder is visited
    capsys.readouterr()
    assert evidence_main(["carry", "textures_defense", "textures_share", "textures_threat", "--out", str(out),
                          "--carry", str(kept)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(f"carry {FOLDER}:" in line for line in lines) == 1
    assert any("carry textures_threat/ace_4:" in line for line in lines)
    with pytest.raises(SystemExit):  # report takes one experiment
        evidence_main(["report", "textures_defense", "textures_share", "--out", str(out)])
    assert "report takes one experiment" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # run takes several, but --replicates names one experiment's
        evidence_main(["run", "textures_defense", "textures_share", "--replicates", "10", "--out", str(out)])
    assert "--replicates names one experiment's replicates" in capsys.readouterr().err



def test_a_replicate_is_prepared_with_its_carried_stages_at_demo_scale_only(tmp_path, capsys):
    """The glue on a fresh output folder: before ``lab.evidence run`` runs a replicate at demo scale it copies
    that replicate's carried stages (not another replicate's); a ci-scale run never reads the carry."""
    from lab import declared as D
    from lab import evidence as E

    kept, out = tmp_path / "carry", tmp_path / "out"
    for r in ("r012", "r014"):
        protect = kept / FOLDER / r / "run" / "stages" / "protect"
        protect.mkdir(parents=True)
        (protect / "key.json").write_text(json.dumps({"digest": r}))
    declared = D.EXPERIMENTS["textures_defense"]
    lab = E.LABS[declared.lab]
    config = E.prepare_replicate(out, declared, 12, "ci", tmp_path / "model.safetensors", lab.classifier, carried=kept)
    assert config.is_file() and not (out / FOLDER / "r012" / "run").exists()
    config = E.prepare_replicate(out, declared, 12, "demo", tmp_path / "model.safetensors", lab.classifier,
                                 carried=kept)
    assert config == out / FOLDER / "r012" / "exp.toml"
    assert "1 stage(s) restored" in capsys.readouterr().out
    stages = out / FOLDER / "r012" / "run" / "stages"
    assert json.loads((stages / "protect" / "key.json").read_text()) == {"digest": "r012"}
    assert not (out / FOLDER / "r014").exists()


def test_status_counts_replicates_without_reading_results(tmp_path, capsys, monkeypatch):
    """``lab.evidence status``: finished (every value the report reads is archived: own runs and the paired
    experiment's), waiting (own runs finished, the paired ones missing), started (finished stages in the output
    folder or the carry; running when a live process holds a stage lock) and not started, per experiment."""
    from lab import evidence

    monkeypatch.setattr(evidence, "PUBLISHED", tmp_path / "published")  # no published report here
    out, kept, archive = tmp_path / "out", tmp_path / "carry", tmp_path / "archive"
    _stage(out, "protect", done=True)  # replicate 12: started in the output folder, a stage running
    _stage(out, "stage1", done=False, lock=f"{os.getpid()}@{socket.gethostname()}")
    started = kept / FOLDER / "r017" / "run" / "stages"  # replicate 17: only carried, two stages finished
    for name in ("protect", "stage1"):
        (started / name).mkdir(parents=True)
        (started / name / "stage.json").write_text("{}")
    (archive / FOLDER).mkdir(parents=True)
    (archive / "textures").mkdir(parents=True)
    defense, share = (EXPERIMENTS[n] for n in ("textures_defense", "textures_share"))
    (archive / FOLDER / "r010.json").write_text(json.dumps({"methods": {m: {} for m in defense.own_methods}}))
    (archive / FOLDER / "r011.json").write_text(json.dumps({"methods": {m: {} for m in defense.own_methods
                                                                         + share.own_methods}}))
    # the paired runs ("textures": clean, attacking, noise) of replicate 10 only
    (archive / "textures" / "r010.json").write_text(json.dumps({"methods": {m: {} for m in
                                                                           ("clean", "attacking", "noise")}}))
    assert evidence_main(["status", "textures_defense", "textures_share", "--out", str(out), "--carry", str(kept),
                          "--archive", str(archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("textures_defense (replicates 10-19): 1 finished: 10; 1 waiting: 11 (needs clean, "
                               "attacking, noise); 2 started: 12 (1 stages done, running), 17 (2 stages done); 6 not "
                               "started: 13, 14, 15, 16, 18, 19; stage time left not known yet: none of the "
                               "stages left has a recorded time in this folder")  # nothing timed: no number
    # replicate 10's archived copy lacks the share sweep's methods: not finished for textures_share
    assert lines[1].startswith("textures_share (replicates 10-19): 0 finished; 1 waiting: 11 (needs clean, "
                               "attacking, noise); 2 started: 12 (1 stages done, running), 17 (2 stages done); 7 not "
                               "started: 10, 13,")
    assert len(lines) == 2
