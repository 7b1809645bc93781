"""Report writer of the experiment runner (``training.experiment``): ``write_report(results, out_dir)``.

Renders the runner's ``results`` dict (schema below; the runner owns it) into a folder a person can
open: ``results.json`` (every number and its provenance), ``table1.md`` (laid out like the LoRD
paper's Table I, with the paper's own numbers), ``fig7.png`` (the protected-share sweep, like the
paper's Fig. 7), ``grid_<method>.png`` per method with samples plus ``grid_all.png``, ``roc.png``
(detection) and ``index.html`` (a static page showing all of it: relative links, no scripts, no
external assets). No ComfyUI import: plain Python, matplotlib (Agg canvas, no pyplot, so no global
backend switch) and PIL. Every file is written atomically (hidden temp file next to it, fsync,
``os.replace``); report files this call does not produce (``fig7.png``, ``roc.png``,
``grid_*.png`` left by an earlier report in the same folder) are deleted, so the folder always
matches ``results.json``. The output is deterministic: the same ``results`` give byte-identical
files (no dates, no software stamps in the PNGs).

A metric that could not be measured (``results["metrics"][id]["available"]`` false, or a method /
sweep point without a value) is shown as ``missing: <reason>`` everywhere (table, figure panel,
page), never as a number, even if the runner put a value next to it.

``results`` schema (the module contract of issue 10; only ``metrics`` and ``methods`` are required,
every other block may be absent or null)::

    {"format": "comfyui-lord-experiment", "version": 1, "mode": "protocol" | "artist",
     "subject": {"class_name", "instance_prompt", "instance_images", "paper_dataset": "CelebA-HQ" | null},
     "metrics": {"<id>": {"label": "CLIP-IQA" | "FID" | "FD (clip:RN50)" | "KID" | ..., "available": bool,
                          "missing": "<reason>", "higher_is_better": bool, "weights": {"path", "sha256"}, ...}},
     "methods": {"<id>": {"label", "row": int, "trained_on", "stage2_mode", "lord": bool,
                          "samples": ["images/<id>/0000.png", ...],      # relative to out_dir
                          "metrics": {"clip_iqa": {"mean", "std", "per_image"}, "fid": {"value"},
                                      "kid": {"mean", "std"}, "<id>": {"missing": "<reason>"}}}},
     "sweep": {"shares": [0, 0.5, 1.0],                                  # fractions 0..1 (plotted as %)
               "series": {"plain": [{"share", "method", "metrics"?}], "lord": [...]}} | null,
     "detection": {"available": true, "attack", "summary": lord_ops.metrics.detection_summary(...),
                   "scores_clean", "scores_protected"} | {"available": false, "missing": "<reason>"},
     "perturbation": {"attack": {...}, "per_image": [{"name", "psnr_db", "ssim", "linf_levels", ...}],
                      "mean": {...}} | null,
     "provenance": {"checkpoint": {"path", "sha256"}, "versions": {...}, "config": {...},
                    "seeds": {...}, "stage1": {...}, ...}}

Metric ids with fixed formatting: ``clip_iqa`` (3 decimals), ``fid`` (FID or FD, 2 decimals),
``kid`` (KID or KD, shown x 1e3 with 2 decimals); other ids are formatted by their label
(``FID``/``FD`` -> 2 decimals, ``KID``/``KD`` -> x 1e3) or with 3 decimals. A method metric value
is its ``mean`` (with ``std`` when present) or its ``value``. A sweep point uses its own
``metrics`` when it has them, else the metrics of the method it names.

Optional fields this module reads beyond the contract (all may be absent):

* ``methods[id]["paper_row"]``: the paper's Table I row (``"Attacking"``, ``"PGD-2 defense"``,
  ``"LoRD"``) the method corresponds to, for the side-by-side table; without it a method whose
  ``label`` equals a paper row name (case-insensitive) is matched.
* ``results["single_run_note"]``: how to read differences between the rows of one run (shown under
  the table).
* ``provenance["attack"]``: the attack preset, a string or a dict with ``"preset"``; else
  ``provenance["config"]["attack"]["preset"]``, else ``perturbation["attack"]["preset"]`` (or
  ``["name"]``), else ``detection["attack"]``.
* ``detection["fpr_target"]``: the false-positive rate the operating point was chosen for
  (default 0.05, ``detection_summary``'s default).

``write_report`` returns ``{file name: Path}`` of every file it wrote. Values must be plain JSON
(``float``/``int``/``str``/``bool``/``None``/lists/dicts; no numpy scalars or tensors): anything
else is refused with the path of the offending value before a file is written.

Re-render a report from its ``results.json`` (e.g. after a change to this package):
``python -m training.report REPORT_DIR/results.json`` (``--out DIR`` for another folder; the
sample paths stay relative to the report folder).

The package: ``__init__`` (this contract, ``write_report``: checks, atomic writes, stale files;
``main``, the CLI, run by ``__main__``), ``tables`` (Table I, the paper's numbers, ``table1.md``),
``figures`` (``fig7.png``, ``roc.png``), ``grids`` (``grid_*.png``), ``page`` (``index.html``) and
``common`` (the metric columns, labels and value cells, ``missing: <reason>``, the methods' order),
which the others share. Imports go one way: ``__init__`` -> ``page`` -> ``tables`` -> ``common``;
``figures`` and ``grids`` import only ``common``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lord_ops.atomic import atomic_write
from training.report.common import ordered_methods
from training.report.figures import fig7_png, roc_png
from training.report.grids import grid_all_png, grid_method_png, grid_names
from training.report.page import index_html
from training.report.tables import PAPER_DATASETS, PAPER_ROWS, PAPER_TABLE1, table1_md

__all__ = ["PAPER_TABLE1", "PAPER_ROWS", "PAPER_DATASETS", "write_report"]

_STALE_PATTERNS = ("fig7.png", "roc.png", "grid_*.png")
_TMP_SUFFIX = ".report-tmp"


def _check(results: dict) -> None:
    if not isinstance(results, dict):
        raise TypeError(f"write_report: results must be a dict, got {type(results).__name__}")
    for key in ("metrics", "methods"):
        if not isinstance(results.get(key), dict):
            raise ValueError(f"write_report: results[{key!r}] must be a dict "
                             "(see training/report/__init__.py's schema)")
    for mid, meta in results["metrics"].items():
        if not isinstance(meta, dict):
            raise ValueError(f"write_report: results['metrics'][{mid!r}] must be a dict")
    for mid, m in results["methods"].items():
        if not isinstance(m, dict):
            raise ValueError(f"write_report: results['methods'][{mid!r}] must be a dict")
        samples = m.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(p, str) for p in samples):
            raise ValueError(f"write_report: results['methods'][{mid!r}]['samples'] must be a list of paths "
                             "relative to the report folder")


def _json_problem(value, where: str = "results") -> str | None:
    """The path of the first value json cannot write (e.g. a numpy float32 or a tensor), or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} (key {k!r} is not a string)"
            found = _json_problem(v, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _json_problem(v, f"{where}[{i}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"{where} ({type(value).__module__}.{type(value).__name__})"


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write the report files for ``results`` into ``out_dir`` (created); returns ``{file name: Path}``.

    Sample paths in ``results["methods"][id]["samples"]`` are read relative to ``out_dir``; an
    unreadable sample becomes a grey "missing file" tile and is listed on the page.
    """
    _check(results)
    problem = _json_problem(results)
    if problem:
        raise ValueError(f"write_report: {problem} is not a plain JSON value; convert it with float()/int()/"
                         ".tolist() before reporting")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        path = out_dir / name
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), suffix=_TMP_SUFFIX)
        written[name] = path

    put("results.json", (json.dumps(results, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    put("table1.md", table1_md(results).encode("utf-8"))
    if results.get("sweep"):
        put("fig7.png", fig7_png(results))
    det = results.get("detection")
    if isinstance(det, dict) and det.get("available") and isinstance(det.get("summary"), dict):
        put("roc.png", roc_png(results))
    grids = grid_names(results)
    missing_files: list[str] = []
    entries = []
    for mid, m in ordered_methods(results):
        if mid not in grids:
            continue
        label = str(m.get("label", mid))
        put(grids[mid], grid_method_png(out_dir, label, list(m["samples"]), missing_files))
        entries.append((label, list(m["samples"])))
    if entries:
        put("grid_all.png", grid_all_png(out_dir, entries))
    put("index.html", index_html(results, written, grids, missing_files).encode("utf-8"))

    for pattern in _STALE_PATTERNS:  # files of an earlier report that this one does not produce
        for old in out_dir.glob(pattern):
            if old.name not in written and old.is_file():
                old.unlink()
    return written


def main(argv=None) -> int:
    """``python -m training.report RESULTS_JSON [--out DIR]``: re-render a report from its results.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results.json written by the experiment runner")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: the folder of RESULTS_JSON; sample paths are relative to it)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    written = write_report(results, args.out if args.out is not None else args.results.parent)
    for name in written:
        print(written[name])
    return 0
