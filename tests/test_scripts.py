"""Every script a user or a benchmark runs still runs: its quick mode, as a subprocess, the way a user
starts it (``python -m <module>`` from the repository root), with everything written under ``tmp_path``.

* ``bash bench/gpu_check.sh --dry-run``: every step of the GPU check on the CPU at tiny sizes (the
  check itself only runs on a CUDA machine, never in CI); its bench step is the ``--quick`` run of
  ``bench_sampling``, ``bench_train`` and ``bench_attack``, so their results are checked from its
  JSON here rather than run twice;
* ``bench.bench_scaling --quick``, ``bench.stage1_presets --quick``, ``bench.bench_preview --quick``,
  ``bench.bench_memory --quick``, ``lab.make_doc_images --quick``
  and ``lab.make_template_thumbnails --quick``, each into a folder given on the command line.

The committed pictures and BENCHMARKS.md must come out of all this unchanged. Each run prints its
wall time (``pytest -s``); about 4 minutes in all on 2 idle CPU cores (a busy machine can triple that).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
# what a quick run must never write to (committed outputs of the full runs)
COMMITTED = ["BENCHMARKS.md", "docs/bench/scaling.png", "web/docs/images/*.png", "workflows/*.jpg",
             "docs/examples/*.png"]
NO_CUDA = "no CUDA"
NOT_WAITING = ["--max-other-cpu", "1000"]  # smoke runs: do not wait for a quiet machine (CI runners are shared)


def run(cmd: list, timeout: float = 900, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; assert its exit status; print its wall time."""
    cmd = [str(c) for c in cmd]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable})
    shown = " ".join(c.replace(str(ROOT) + os.sep, "") for c in cmd[1:] if not c.startswith("/tmp"))
    print(f"[test_scripts] {shown}: exit {proc.returncode} in {time.time() - t0:.1f} s")
    assert proc.returncode == expect, f"{shown}: exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def module(name: str, *args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", name, *args], **kw)


def digests() -> dict:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in COMMITTED for p in sorted(ROOT.glob(pattern))}


@pytest.fixture(scope="module", autouse=True)
def committed_outputs_unchanged():
    before = digests()
    assert before, "no committed outputs found"
    yield
    after = digests()
    assert after == before, f"a quick run changed committed files: {sorted(set(after.items()) ^ set(before.items()))}"


def open_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size, {k: v for k, v in im.info.items() if isinstance(v, str)}


# ----------------------------------------------------------------------------------------------
# bench/gpu_check.sh --dry-run (its bench step: the --quick runs of bench_sampling, bench_train, bench_attack)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", out], timeout=1800)
    return json.loads((out / "gpu_check.json").read_text()), proc, out


@pytest.mark.slow
@pytest.mark.server
def test_gpu_check_dry_run_passes_every_step_and_skips_the_cuda_measurements(dry_run):
    result, proc, out = dry_run
    assert "dry run (CPU): all steps passed" in proc.stdout
    assert result["ok"] is True and result["dry_run"] is True
    assert result["device"] is None and NO_CUDA in result["skipped"]["device"]
    steps = result["steps"]
    assert list(steps) == ["devices", "cli_stage1", "cli_stage2_lord", "cli_stage2_fp16", "mist_v2", "workflows",
                           "bench_sampling", "bench_train", "bench_attack"]
    for name, rec in steps.items():
        assert rec["status"] == "ok" and rec["returncode"] == 0, (name, rec.get("output_tail"))
        assert rec["peak_vram_mib"] is None and NO_CUDA in rec["skipped"]["peak_vram_mib"], name
        assert Path(rec["log"]).is_file() and rec["seconds"] > 0, name
    devices_log = Path(steps["devices"]["log"]).read_text()
    assert " passed" in devices_log and "deselected" in devices_log  # the dry run's selection ran
    # the CLI trained in the dtypes it records; fp16 compute with the loss scaler
    assert steps["cli_stage1"]["effective_dtype"]["compute"] == "fp32"
    assert steps["cli_stage2_lord"]["effective_dtype"]["compute"] == "fp32"
    assert steps["cli_stage2_fp16"]["effective_dtype"] == {"compute": "fp16", "grad_scaler": True, "weights": "fp32"}
    mist = steps["mist_v2"]
    assert mist["image_px"] == 64 and mist["attack_seconds"] > 0 and "dry run" in mist["note"]
    assert (out / "mist_v2_out" / "example_64.png").is_file()
    wf = steps["workflows"]
    assert sorted(wf["workflows"]) == [f"{w}.json" for w in WORKFLOWS]
    assert all(w["status"] == "success" for w in wf["workflows"].values()), wf["workflows"]
    assert wf["trained"]["lord"]["steps_trained"] == 2 and wf["trained"]["lora"]["steps_trained"] == 2


@pytest.mark.slow
def test_gpu_check_dry_run_bench_step_measured_every_quick_benchmark(dry_run):
    """bench_sampling, bench_train and bench_attack --quick (run once, by the dry run): JSON and Markdown."""
    steps = dry_run[0]["steps"]
    for name in ("bench_sampling", "bench_train", "bench_attack"):
        assert steps[name]["problems"] == [], (name, steps[name]["problems"])
        assert steps[name]["result"]["facts"]["device"] == "cpu"
    rows = steps["bench_sampling"]["result"]["rows"]
    assert {r["variant"] for r in rows} == {"base", "lora", "lord_plain", "lord_fused"}
    assert all(r["model"] == "tiny" and r["px"] == 64 and r["median_ms"] > 0 for r in rows)
    train = steps["bench_train"]["result"]
    assert [(t["model"], t["px"]) for t in train["times"]] == [("tiny", 64)]
    assert set(train["times"][0]["median"]) == {"core", "lord"} and train["times"][0]["ratio"]["lord"] > 0
    assert len(train["mems"]) == 2 and all(m["delta_bytes"] >= 0 for m in train["mems"])
    attack = steps["bench_attack"]["result"]
    assert [t["px"] for t in attack["times"]] == [64] and attack["times"][0]["median"]["glue"] > 0
    assert len(attack["mems"]) == 2 and [m["low_memory"] for m in attack["mists"]] == [True, False]
    md = (dry_run[2] / "BENCHMARKS_dry_run.md").read_text()
    for name in ("bench_sampling", "bench_train", "bench_attack"):
        assert f"<!-- {name}:start -->" in md and f"<!-- {name}:end -->" in md
        assert f"Command: `python -m bench.{name} --quick --max-other-cpu 1000`" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_cuda_stops_with_exit_2_unless_dry_run(tmp_path):
    proc = run(["bash", "bench/gpu_check.sh", "--out", tmp_path], expect=2, timeout=120)
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


# ----------------------------------------------------------------------------------------------
# The other scripts' quick modes


@pytest.mark.slow
def test_bench_scaling_quick_writes_json_markdown_and_figure(tmp_path):
    js, md, png = tmp_path / "scaling.json", tmp_path / "BENCHMARKS.md", tmp_path / "scaling.png"
    module("bench.bench_scaling", "--quick", *NOT_WAITING, "--json", js, "--md", md, "--png", png)
    result = json.loads(js.read_text())
    assert result["skipped"] == []
    points = {(p["workload"], p["px"], p["batch"]) for p in result["points"]}
    assert points == {(w, px, b) for w in ("sampling", "training") for px, b in ((64, 1), (96, 1), (64, 2))}
    assert all(p["ratio"] > 0 and p["lord_ms"] > 0 and p["stock_ms"] > 0 for p in result["points"])
    text = md.read_text()
    assert "<!-- bench_scaling:start -->" in text and "<!-- bench_scaling:end -->" in text
    assert "Command: `python -m bench.bench_scaling --quick --max-other-cpu 1000`" in text
    assert "![LoRD vs stock" in text  # the figure's link
    assert open_image(png)[0][0] > 100


def test_stage1_presets_quick_reports_each_preset(tmp_path, sd15_checkpoint):
    (tmp_path / "v1-5-pruned-emaonly-fp16.safetensors").symlink_to(sd15_checkpoint)  # the script's own name
    proc = module("bench.stage1_presets", "--quick", "--out", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["quick"] is True and result["settings"]["steps"] == 2
    assert [r["preset"] for r in result["rows"]] == ["pgd_2", "mixed"]
    for row in result["rows"]:
        assert 0.0 <= row["in_sample_auroc"] <= 1.0 and row["final"]["step"] == 2
        assert set(row["heldout"]) == {"ace_fixed", "pgd_fixed"}
        assert all(0.0 <= v["auroc"] <= 1.0 for v in row["heldout"].values())
    assert "| preset | seed | in-sample AUROC |" in proc.stdout and "| mixed | 0 |" in proc.stdout


def test_bench_preview_quick_reports_both_stages():
    proc = module("bench.bench_preview", "--quick")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| stage")]
    assert len(rows) == 3, proc.stdout  # the header and one row per stage
    for stage in ("stage1", "stage2"):
        cells = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {stage} | 32 px"))
        assert float(cells.split("|")[5]) > 0, cells  # preview / step


def test_bench_memory_quick_compares_the_estimate_with_the_measured_peak(tmp_path):
    js = tmp_path / "memory.json"
    proc = module("bench.bench_memory", "--quick", "--json", js)
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 1 and "error" not in rows[0], rows
    r = rows[0]
    assert (r["model"], r["px"], r["stage"], r["batch"]) == ("tiny", 64, "stage1", 1)
    assert r["estimate"]["activation_bytes"] > 0 and r["measured"]["delta_bytes"] > 0
    assert r["ratio"] == r["estimate"]["needed_bytes"] / r["measured"]["delta_bytes"] >= 1.0  # never refuses what fits
    assert "| tiny 64 px, stage1, batch 1 |" in proc.stdout and "Estimate / measured" in proc.stdout


def test_make_doc_images_quick_writes_the_three_strips_into_out(tmp_path):
    proc = module("lab.make_doc_images", "--quick", "--out", tmp_path)
    tile, line = 128, 16  # the strips' layout (lab/pictures.py): tiles, a label line, a caption line
    for name, tiles, lines in (("protect_ace", 3, 2), ("detect_heatmap", 4, 3), ("purify_jpeg", 3, 2)):
        assert open_image(tmp_path / f"{name}.png")[0] == (tiles * (tile + 4) - 4, tile + lines * line), name
    assert "smoke run: LoRD barely trained" in proc.stdout  # a quick run never quotes its AUROC as a measurement


@pytest.mark.slow
@pytest.mark.server
def test_make_template_thumbnails_quick_writes_thumbnails_and_examples_into_out(tmp_path):
    module("lab.make_template_thumbnails", "--quick", "--out", tmp_path)
    thumbs = sorted(p.stem for p in (tmp_path / "workflows").glob("*.jpg"))
    assert thumbs == WORKFLOWS
    for stem in thumbs:
        assert open_image(tmp_path / "workflows" / f"{stem}.jpg")[0] == (320, 320)
    for name in ("defended_generation.png", "detect_heatmap.png"):
        size, text = open_image(tmp_path / "examples" / name)
        assert "workflow" in text and "prompt" in text, name  # drag-and-drop loads the workflow
        # ... the graph that ran on the lab model (lab/make_template_thumbnails.py's lab_workflow)
        for chunk in ("workflow", "prompt"):
            assert '"lord_lab_fashion.safetensors"' in text[chunk] and "a photo of" in text[chunk], (name, chunk)
        assert "person" not in text["prompt"], name


@pytest.mark.parametrize("script", ["lab.make_doc_images", "lab.make_template_thumbnails"])
def test_quick_picture_runs_need_an_output_folder(script):
    """A quick run never falls back on the committed pictures' folder."""
    proc = module(script, "--quick", expect=2, timeout=120)
    assert "--out" in proc.stderr
    committed = "web/docs/images" if script == "lab.make_doc_images" else "."
    proc = module(script, "--quick", "--out", committed, expect=2, timeout=120)
    assert "--out" in proc.stderr
