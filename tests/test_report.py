"""The experiment report writer (``training/report/``) on synthetic results dicts (no ComfyUI needed).

Covers: every file written, results.json round trip, Table I layout and number formatting, the paper's
numbers, missing metrics shown as "missing: ..." and never as numbers, index.html links only to files
that exist, PNGs open, stale files of an earlier report removed, byte-identical reruns.
"""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.report_results import METHODS, make_results
from training.report import PAPER_TABLE1, write_report


def table_rows(md: str) -> list[list[str]]:
    """Cells of the first markdown table (our Table I), header first."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if line.startswith("|---"):
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for k, v in attrs:
            if k in ("src", "href"):
                self.links.append(v)


def check_index(out: Path) -> list[str]:
    parser = _Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert parser.scripts == 0
    for link in parser.links:
        assert not re.match(r"^[a-z]+:|^/", link), f"non-relative link {link}"
        assert (out / link).is_file(), f"index.html links to {link}, which does not exist"
    return parser.links


def check_pngs(written: dict):
    for name, path in written.items():
        if name.endswith(".png"):
            with Image.open(path) as im:
                im.load()
                assert 100 <= im.width <= 4000 and 100 <= im.height <= 4000, (name, im.size)


def test_full_report(tmp_path):
    out = tmp_path / "report"
    res = make_results(out)
    written = write_report(res, out)
    expected = {"results.json", "table1.md", "fig7.png", "roc.png", "index.html", "grid_all.png"} | {
        f"grid_{m[0]}.png" for m in METHODS}
    assert set(written) == expected
    for name, path in written.items():
        assert path == out / name and path.is_file() and path.stat().st_size > 0
    assert not list(out.glob(".*report-tmp"))

    text = (out / "results.json").read_text(encoding="utf-8")
    assert json.loads(text) == json.loads(json.dumps(res))  # inf survives as Infinity
    assert text == json.dumps(res, indent=2, sort_keys=True) + "\n"

    md = (out / "table1.md").read_text(encoding="utf-8")
    rows = table_rows(md)
    assert rows[0] == ["Method", "Trained on", "CLIP-IQA ↑", "FID ↓", "KID ×10³ ↓"]
    assert [r[0] for r in rows[1:]] == [m[1] for m in METHODS]
    by = {r[0]: r for r in rows[1:]}
    assert by["Clean"][2:5] == ["0.612 ± 0.046", "80.12", "12.34 ± 2.10"]
    assert by["Attacking"][2:5] == ["0.301 ± 0.070", "160.46", "45.60 ± 5.20"]
    assert by["DiffPure-style"][2] == "0.500"  # no std -> no ±
    assert by["LoRD"][1] == "protected (LoRD live)"
    assert by["LoRD"][2:] == ["0.556 ± 0.033", "96.00", "15.00 ± 1.50"]
    assert "×10³" in md and "multiplied by 1000" in md
    # setting under the table
    for s in ("v1-5-pruned-emaonly.safetensors", "ab12ab12ab12", "attack preset: mist_v2",
              "images per method: 5–18", "sampling=1234", "training=0"):
        assert s in md, s
    # the paper's CelebA-HQ numbers beside ours
    assert "## The paper's Table I (CelebA-HQ) beside ours" in md
    lord_line = next(line for line in md.splitlines() if line.startswith("| LoRD | LoRD |"))
    assert "0.493" in lord_line and "100.727" in lord_line and "0.556 ± 0.033" in lord_line and "96.00" in lord_line
    assert "154.161" in md and "146.686" in md and "182.771" not in md  # only the matching dataset
    assert "missing:" not in md

    links = check_index(out)
    for name in expected - {"index.html"}:
        assert name in links, name
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "0.556 ± 0.033" in page and "100.727" in page and "AUROC: 0.8750" in page
    assert "Stage-1 gate by timestep" in page and "<td>400</td><td>0.410</td><td>0.620</td><td>0.800</td>" in page
    assert "35.12 dB" in page and "0.9123" in page and "∞ dB" in page
    assert "ab12" * 16 in page and "c" * 64 in page and "comfyui-lord 0.4.0" in page
    check_pngs(written)
    with Image.open(out / "grid_attacking.png") as im:  # 16 of 18 shown: 4 x 4 tiles
        assert im.height > 4 * 192 and im.width >= 4 * 192
    with Image.open(out / "grid_all.png") as im:  # one row per method
        assert im.height >= len(METHODS) * 128


def test_fid_missing(tmp_path):
    out = tmp_path / "report"
    res = make_results(out, fid=False)
    written = write_report(res, out)
    assert "fig7.png" in written
    md = (out / "table1.md").read_text(encoding="utf-8")
    rows = table_rows(md)
    fid_col = rows[0].index("FID ↓")
    for r in rows[1:]:
        assert r[fid_col] == "missing: no Inception weights: set metrics.inception_weights"
        assert not re.search(r"\d", r[fid_col])
    page = (out / "index.html").read_text(encoding="utf-8")
    for text in (md, page):
        assert "777.77" not in text and "777" not in text  # the stray value is never shown
        assert "missing: no Inception weights" in text
    # the paper block: our FID column says missing, the paper's numbers are still there
    lord_line = next(line for line in md.splitlines() if line.startswith("| LoRD | LoRD |"))
    assert "100.727" in lord_line and "missing: no Inception weights" in lord_line
    check_index(out)
    check_pngs(written)


def test_no_sweep_no_detection_removes_stale_files(tmp_path):
    out = tmp_path / "report"
    full = write_report(make_results(out), out)
    assert {"fig7.png", "roc.png"} <= set(full)
    res = make_results(out, sweep=False, detection=False)
    del res["methods"]["jpeg"]
    written = write_report(res, out)
    assert "fig7.png" not in written and "roc.png" not in written and "grid_jpeg.png" not in written
    assert not (out / "fig7.png").exists() and not (out / "roc.png").exists() and not (out / "grid_jpeg.png").exists()
    assert (out / "images/jpeg/0000.png").exists()  # samples are not report files: kept
    links = check_index(out)
    assert "fig7.png" not in links and "roc.png" not in links
    res["single_run_note"] = "one training run per method: read the rows with care"
    written = write_report(res, out)
    md = (out / "table1.md").read_text(encoding="utf-8")
    assert "Damage undone" not in md and "Reading the rows: one training run per method" in md
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "No sweep in this run." in page
    assert "missing: no held-out images: set detection.heldout" in page
    check_pngs(written)


def test_artist_mode_paper_not_comparable(tmp_path):
    out = tmp_path / "report"
    res = make_results(out, artist=True)
    written = write_report(res, out)
    assert "grid_clean.png" not in written and "fig7.png" in written
    md = (out / "table1.md").read_text(encoding="utf-8")
    assert [r[0] for r in table_rows(md)[1:]] == [m[1] for m in METHODS if m[0] != "clean"]
    assert "Mode: artist." in md
    assert "paper, not comparable: different model and data" in md
    for ds, rows in PAPER_TABLE1.items():  # the whole paper table, every number as printed
        for row, vals in rows.items():
            assert f"{vals['clip_iqa']:.3f}" in md and f"{vals['fid']:.3f}" in md, (ds, row)
    assert "0.620" in md and "137.918" in md and "95.262" in md
    check_index(out)
    check_pngs(written)


def test_unknown_paper_dataset_and_fd_label(tmp_path):
    out = tmp_path / "report"
    res = make_results(out, paper_dataset="FFHQ", sweep=False, detection=False)
    md = (out / "table1.md")
    write_report(res, out)
    assert "not comparable: paper_dataset 'FFHQ'" in md.read_text(encoding="utf-8")
    res = make_results(out, paper_dataset="celeba_hq", sweep=False, detection=False)
    res["metrics"]["fid"]["label"] = "FD (clip:RN50)"
    res["metrics"]["kid"]["label"] = "KD (clip:RN50)"
    write_report(res, out)
    text = md.read_text(encoding="utf-8")
    assert table_rows(text)[0][3:5] == ["FD (clip:RN50) ↓", "KD (clip:RN50) ×10³ ↓"]
    assert "(CelebA-HQ) beside ours" in text and "not FID" in text


def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    res_a, res_b = make_results(a), make_results(b)
    wa = write_report(res_a, a)
    first = {n: p.read_bytes() for n, p in wa.items()}
    wa2 = write_report(copy.deepcopy(res_a), a)
    wb = write_report(res_b, b)
    assert set(wa) == set(wa2) == set(wb)
    for name in wa:
        assert wa2[name].read_bytes() == first[name], f"{name} differs on a rewrite"
        assert wb[name].read_bytes() == first[name], f"{name} differs in another folder"


def test_cli_rerenders_identically(tmp_path):
    from training.report import main

    out = tmp_path / "report"
    written = write_report(make_results(out), out)
    before = {n: p.read_bytes() for n, p in written.items()}
    assert main([str(out / "results.json")]) == 0
    assert {n: p.read_bytes() for n, p in written.items()} == before


def test_bad_results_are_refused(tmp_path):
    with pytest.raises(ValueError, match="results\\['methods'\\]"):
        write_report({"metrics": {}}, tmp_path)
    with pytest.raises(ValueError, match="samples"):
        write_report({"metrics": {}, "methods": {"x": {"samples": "images/x"}}}, tmp_path)


def test_unreadable_sample_is_a_grey_tile_and_listed(tmp_path):
    out = tmp_path / "report"
    res = make_results(out, sweep=False, detection=False)
    res["methods"]["lord"]["samples"][1] = "images/lord/gone.png"
    (out / "images/attacking/0003.png").write_bytes(b"not a png")
    written = write_report(res, out)
    assert "grid_lord.png" in written and "grid_attacking.png" in written
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<li>images/lord/gone.png</li>" in page and "<li>images/attacking/0003.png</li>" in page
    links = check_index(out)  # the page never links to the unreadable files
    assert "images/lord/gone.png" not in links
    with Image.open(out / "grid_lord.png") as im:  # tile 2 (index 1) is the light grey placeholder
        assert im.convert("RGB").getpixel((4 + 192 + 4 + 2, 34 + 2)) == (235, 235, 235)
    res = make_results(tmp_path)
    res["methods"]["lord"]["metrics"]["clip_iqa"]["mean"] = np.float32(0.5)
    with pytest.raises(ValueError, match=r"results\['methods'\]\['lord'\]\['metrics'\]\['clip_iqa'\]\['mean'\] "
                                         r"\(numpy.float32\)"):
        write_report(res, tmp_path / "r")
    assert not (tmp_path / "r").exists()
