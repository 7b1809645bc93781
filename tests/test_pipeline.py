"""The experiment runner's stage engine (training/pipeline.py) and config validation
(training/experiment_config.py): caching, resuming, locks, and errors that name the field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.experiment_config import ConfigError, load_config
from training.pipeline import Plan, Stage

ROOT = Path(__file__).resolve().parents[1]


def _plan(tmp_path, calls, value=1, fail_at=None):
    plan = Plan(tmp_path, log=lambda s: None, poll_s=0.05)

    def run_a(folder):
        calls.append("a")
        (folder / "part.txt").write_text("x")
        return {"a": value}

    def run_b(folder):
        calls.append("b")
        if fail_at == "b":
            raise RuntimeError("boom")
        return {"b": plan.result("a")["a"] + 1}

    plan.add(Stage("a", {"v": value}, run_a))
    plan.add(Stage("b/x", {}, run_b, needs=("a",)))
    return plan


def test_finished_stages_are_never_recomputed(tmp_path):
    calls = []
    assert _plan(tmp_path, calls).run()["b/x"] == {"b": 2}
    assert calls == ["a", "b"]
    again = _plan(tmp_path, calls)
    assert again.run()["b/x"] == {"b": 2}
    assert calls == ["a", "b"] and again.ran == []
    done = json.loads((tmp_path / "stages" / "b__x" / "stage.json").read_text())
    assert done["name"] == "b/x" and isinstance(done["seconds"], float) and done["seconds"] >= 0  # for estimates


def test_changed_settings_recompute_the_stage_and_what_needs_it(tmp_path):
    calls = []
    _plan(tmp_path, calls).run()
    plan = _plan(tmp_path, calls, value=5)
    assert plan.run()["b/x"] == {"b": 6}
    assert calls == ["a", "b", "a", "b"] and plan.ran == ["a", "b/x"]


def test_an_interrupted_stage_resumes_in_its_folder(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        _plan(tmp_path, calls, fail_at="b").run()
    folder = tmp_path / "stages" / "b__x"
    assert (folder / "key.json").is_file() and not (folder / "stage.json").exists()
    assert not (folder / "lock").exists()  # released on failure
    (folder / "partial").write_text("kept")
    plan = _plan(tmp_path, calls)
    assert plan.run()["b/x"] == {"b": 2}
    assert (folder / "partial").read_text() == "kept"  # same settings: the folder is resumed, not emptied
    assert plan.ran == ["b/x"]


def test_a_stale_folder_is_emptied_when_settings_changed(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        _plan(tmp_path, calls, fail_at="b").run()
    folder = tmp_path / "stages" / "b__x"
    (folder / "partial").write_text("old")
    _plan(tmp_path, calls, value=3).run()
    assert not (folder / "partial").exists()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    calls = []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    folder = tmp_path / "stages" / "a"
    folder.mkdir(parents=True)
    (folder / "lock").write_text(f"{dead.stdout.strip()}@{socket.gethostname()}")
    assert _plan(tmp_path, calls).run()["a"] == {"a": 1}


def test_a_live_lock_makes_the_process_wait_for_the_stage(tmp_path):
    """A second process on the same output waits for a stage another one is computing."""
    import socket
    import threading

    calls = []
    plan = _plan(tmp_path, calls)
    folder = plan.folder("a")
    folder.mkdir(parents=True)
    (folder / "lock").write_text(f"{os.getppid()}@{socket.gethostname()}")  # a live process holds it
    done = {}

    def other_process_finishes():
        import time

        time.sleep(0.3)
        (folder / "stage.json").write_text(json.dumps({"digest": plan.full_digest("a"), "result": {"a": 41}}))
        (folder / "lock").unlink()

    t = threading.Thread(target=other_process_finishes)
    t.start()
    done.update(plan.run(["a"]))
    t.join()
    assert done["a"] == {"a": 41} and calls == []


def _write(tmp_path, text: str) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a photo of a person\n")
    (tmp_path / "ckpt.safetensors").write_bytes(b"x")
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


BASE = """
[model]
checkpoint = "ckpt.safetensors"
[subject]
instance_images = "imgs"
resolution = 64
[stage1]
data = "imgs"
"""


@pytest.mark.parametrize("extra, field, words", [
    ("[attack]\npreset = \"mist3\"\n", "[attack] preset", "unknown preset 'mist3'"),
    ("[sampling]\nimages = 0\n", "[sampling] images", "must be >= 1"),
    ("[sampling]\nstepz = 3\n", "[sampling] stepz", "unknown key"),
    ("[methods]\nrun = [\"clean\", \"magic\"]\n", "[methods] run", "unknown method 'magic'"),
    ("[sweep]\nshares = [0, 1.5]\n", "[sweep] shares", "0..1"),
    ("[metrics]\ninception_weights = \"nope.pth\"\n", "[metrics] inception_weights", "file not found"),
    ("[stage2]\nlearning_rate = -1\n", "[stage2]", "learning_rate must be > 0"),
    ("[stage2]\nrnak = 4\n", "[stage2] rnak", "unknown key"),
    ("[purification]\ndiffpure_strength = 0\n", "[purification] diffpure_strength", "(0, 1]"),
    ("[experiment]\nmode = \"artist\"\n", "[subject] protected_images", "required in artist mode"),
    ("[purification]\nnoise_sigma = 0\n", "[purification] noise_sigma", "(0, 1]"),
    ("[lord]\ndefense_strength = -1\n", "[lord] defense_strength", "0..10"),
    ("[attack]\ndefense_aware = \"yes\"\n", "[attack] defense_aware", "expected true or false"),
    ("[attack]\npreset = \"photoguard_encoder\"\ndefense_aware = true\n", "[attack] defense_aware",
     "VAE encoder only"),
    ("[attack]\ngate_evasion = 10.0\n", "[attack] gate_evasion", "needs [attack] defense_aware = true"),
    ("[attack]\ndefense_aware = true\ngate_evasion = -1.0\n", "[attack] gate_evasion", "must be >= 0"),
    ("[metrics]\nheldout_draws = 0\n", "[metrics] heldout_draws", "must be >= 1"),
    ("[metrics]\nheldout_timesteps = [50, 1000]\n", "[metrics] heldout_timesteps", "0..999"),
])
def test_bad_configs_name_the_field(tmp_path, extra, field, words):
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value) and words in str(err.value), str(err.value)


def test_resolution_and_missing_folders_are_checked(tmp_path):
    path = _write(tmp_path, BASE.replace("resolution = 64", "resolution = 60"))
    with pytest.raises(ConfigError, match=r"\[subject\] resolution"):
        load_config(path)
    path = _write(tmp_path, BASE.replace('instance_images = "imgs"', 'instance_images = "missing"'))
    with pytest.raises(ConfigError, match=r"\[subject\] instance_images: folder not found"):
        load_config(path)


def test_a_good_config_resolves_paths_relative_to_its_file(tmp_path):
    exp = load_config(_write(tmp_path, BASE + "[sweep]\nshares = [0, 0.5, 1]\n[stage2]\nsteps = 7\n"))
    assert exp.instance_images == (tmp_path / "imgs").resolve() and exp.checkpoint.is_file()
    assert exp.prompt == "a photo of sks person" and exp.class_text == "a photo of a person"
    assert exp.sweep_shares == (0, 0.5, 1) and exp.stage2 == {"steps": 7}


def test_the_cli_refuses_a_bad_config_before_any_work(tmp_path):
    path = _write(tmp_path, BASE + "[attack]\npreset = \"mist3\"\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "training.experiment", "--config", str(path), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "[attack] preset" in proc.stderr and "mist3" in proc.stderr
    assert not out.exists()


def test_the_cli_checks_sampler_names_against_this_comfyui(tmp_path):
    path = _write(tmp_path, BASE + "[sampling]\nsampler = \"no_such_sampler\"\n")
    proc = subprocess.run([sys.executable, "-m", "training.experiment", "--config", str(path), "--output",
                           str(tmp_path / "run"), "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "[sampling] sampler" in proc.stderr and "no_such_sampler" in proc.stderr and "euler" in proc.stderr


@pytest.mark.parametrize("extra, prepare, field, words", [
    ("[metrics]\ninception_weights = \"bad.pth\"\n", lambda d: __import__("torch").save({"w": __import__("torch").zeros(2)}, d / "bad.pth"),
     "[metrics] inception_weights", "Inception"),
    ("", lambda d: (d / "imgs" / "a.txt").unlink(missing_ok=True), "[stage1] data", "a.png has no (or an empty) caption"),
    ("[attack]\ntarget = \"target.png\"\n", lambda d: (d / "target.png").write_bytes(b"not a png"), "[attack] target",
     "cannot read"),
])
def test_inputs_that_would_fail_late_are_refused_before_any_work(tmp_path, extra, prepare, field, words):
    path = _write(tmp_path, BASE + extra)
    prepare(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "training.experiment", "--config", str(path), "--output", str(out),
                           "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert field in proc.stderr and words in proc.stderr, proc.stderr
    assert not out.exists()
