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
                                      "kid": {"mean", "std"}, "<id>": {"missing": "<reason>"}},
                          "recovered": {"<metric id>": fraction}}},      # optional
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
* ``results["recovered_definition"]``: one sentence that defines the "damage undone" column
  (default: the share of the Clean - Attacking gap the method closes).
* ``provenance["attack"]``: the attack preset, a string or a dict with ``"preset"``; else
  ``provenance["config"]["attack"]["preset"]``, else ``perturbation["attack"]["preset"]`` (or
  ``["name"]``), else ``detection["attack"]``.
* ``detection["fpr_target"]``: the false-positive rate the operating point was chosen for
  (default 0.05, ``detection_summary``'s default).

``write_report`` returns ``{file name: Path}`` of every file it wrote. Values must be plain JSON
(``float``/``int``/``str``/``bool``/``None``/lists/dicts; no numpy scalars or tensors): anything
else is refused with the path of the offending value before a file is written.

Re-render a report from its ``results.json`` (e.g. after a change to this module):
``python -m training.report REPORT_DIR/results.json`` (``--out DIR`` for another folder; the
sample paths stay relative to the report folder).
"""
from __future__ import annotations

import html
import json
import math
import re
import sys
from pathlib import Path

__all__ = ["PAPER_TABLE1", "PAPER_ROWS", "PAPER_DATASETS", "write_report"]

# The LoRD paper's Table I, exactly as printed (CLIP-IQA higher is better, FID lower is better).
PAPER_TABLE1 = {
    "CelebA-HQ": {
        "Attacking": {"clip_iqa": 0.362, "fid": 154.161},
        "PGD-2 defense": {"clip_iqa": 0.485, "fid": 146.686},
        "LoRD": {"clip_iqa": 0.493, "fid": 100.727},
    },
    "VGGFace2": {
        "Attacking": {"clip_iqa": 0.385, "fid": 182.771},
        "PGD-2 defense": {"clip_iqa": 0.203, "fid": 152.525},
        "LoRD": {"clip_iqa": 0.620, "fid": 137.918},
    },
    "Landscape": {
        "Attacking": {"clip_iqa": 0.607, "fid": 133.289},
        "PGD-2 defense": {"clip_iqa": 0.240, "fid": 150.136},
        "LoRD": {"clip_iqa": 0.675, "fid": 95.262},
    },
}
PAPER_ROWS = ("Attacking", "PGD-2 defense", "LoRD")
PAPER_DATASETS = ("CelebA-HQ", "VGGFace2", "Landscape")
PAPER_SETTING = ("Stable Diffusion 1.x, the mist-v2 ACE attack, 100 generated images per row, FID against the "
                 "clean Stage-2 images, CLIP-IQA with 'A good/bad photo of a {class}'")

_METRIC_ORDER = ("clip_iqa", "fid", "kid")
_SERIES_LABELS = {"plain": "LoRA (plain)", "lord": "LoRD"}
_SERIES_ORDER = ("plain", "lord")
_GRID_TILE, _GRID_COLS, _GRID_MAX = 192, 4, 16
_ALL_TILE, _ALL_MAX, _ALL_LABEL_W = 128, 8, 220
_STALE_PATTERNS = ("fig7.png", "roc.png", "grid_*.png")
_TMP_SUFFIX = ".report-tmp"


# --------------------------------------------------------------------------------------- files
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from lord_ops.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), suffix=_TMP_SUFFIX)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _png_bytes_pil(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")  # PIL writes no date or software chunk: deterministic
    return buf.getvalue()


def _png_bytes_figure(fig) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------- small formatting
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_ids(results: dict) -> list[str]:
    """The metrics shown as columns: the paper's (CLIP-IQA, FID, KID) first, then the others. A
    paper metric without weights is a "missing: ..." column, unless the run measures with another
    extractor instead (the lab model): then it is listed once in the notes (:func:`_hidden_metrics`)."""
    metrics = results.get("metrics") or {}
    hidden = _hidden_metrics(results)
    known = [m for m in _METRIC_ORDER if m in metrics and m not in hidden]
    return known + sorted(m for m in metrics if m not in _METRIC_ORDER)


def _hidden_metrics(results: dict) -> list[str]:
    metrics = results.get("metrics") or {}
    if not any((meta or {}).get("available") for m, meta in metrics.items() if m not in _METRIC_ORDER):
        return []
    return [m for m in _METRIC_ORDER if m in metrics and not (metrics[m] or {}).get("available")]


def _metric_kind(metric_id: str, meta: dict) -> str:
    """"iqa" (3 decimals), "fd" (2 decimals) or "kd" (x 1e3, 2 decimals)."""
    if metric_id == "clip_iqa":
        return "iqa"
    if metric_id == "fid":
        return "fd"
    if metric_id == "kid":
        return "kd"
    label = str(meta.get("label", metric_id)).upper()
    if label.startswith(("KID", "KD")):
        return "kd"
    if label.startswith(("FID", "FD")):
        return "fd"
    return "iqa"


def _arrow(meta: dict) -> str:
    hib = meta.get("higher_is_better")
    return "↑" if hib is True else "↓" if hib is False else ""


def _metric_label(metric_id: str, meta: dict) -> str:
    return str(meta.get("label") or metric_id)


def _metric_header(metric_id: str, meta: dict) -> str:
    label = _metric_label(metric_id, meta)
    if _metric_kind(metric_id, meta) == "kd":
        label += " ×10³"
    arrow = _arrow(meta)
    return f"{label} {arrow}" if arrow else label


def _fmt_value(metric_id: str, meta: dict, value: float, std=None) -> str:
    kind = _metric_kind(metric_id, meta)
    scale, decimals = (1e3, 2) if kind == "kd" else (1.0, 2) if kind == "fd" else (1.0, 3)
    text = f"{value * scale:.{decimals}f}"
    if _is_number(std) and math.isfinite(std):
        text += f" ± {std * scale:.{decimals}f}"
    return text


def _missing(reason) -> str:
    reason = str(reason).strip() if reason else ""
    return f"missing: {reason or 'no reason given'}"


def _metric_value(results: dict, metric_id: str, entry) -> tuple[float | None, float | None, str | None]:
    """(value, std, None) or (None, None, "missing: <reason>") for one method's / point's metric entry."""
    meta = (results.get("metrics") or {}).get(metric_id) or {}
    if not meta.get("available", False):
        return None, None, _missing(meta.get("missing"))
    if not isinstance(entry, dict):
        return None, None, _missing("not computed for this method")
    if entry.get("missing"):
        return None, None, _missing(entry["missing"])
    value = entry.get("mean", entry.get("value"))
    if not _is_number(value):
        return None, None, _missing("no value recorded")
    if not math.isfinite(value):
        return None, None, _missing(f"not a finite number ({value})")
    std = entry.get("std")
    return float(value), (float(std) if _is_number(std) else None), None


def _metric_cell(results: dict, metric_id: str, entry) -> str:
    value, std, missing = _metric_value(results, metric_id, entry)
    if missing:
        return missing
    meta = results["metrics"][metric_id]
    return _fmt_value(metric_id, meta, value, std)


def _percent(v) -> str:
    return f"{v * 100:.0f}%"


def _recovered_cell(results: dict, method: dict) -> str:
    rec = method.get("recovered")
    if not isinstance(rec, dict) or not rec:
        return "—"
    metrics = results.get("metrics") or {}
    parts = []
    for mid in _metric_ids(results) + sorted(k for k in rec if k not in metrics):
        if mid not in rec:
            continue
        meta = metrics.get(mid) or {}
        label = _metric_label(mid, meta)
        v = rec[mid]
        if mid in metrics and not meta.get("available", False):
            parts.append(f"{label} missing")
        elif _is_number(v) and math.isfinite(v):
            parts.append(f"{label} {_percent(v)}")
        else:
            parts.append(f"{label} n/a")
    return " · ".join(parts) if parts else "—"


def _ordered_methods(results: dict) -> list[tuple[str, dict]]:
    methods = results.get("methods") or {}
    return sorted(methods.items(), key=lambda kv: (kv[1].get("row", 1 << 30), str(kv[0])))


def _safe_name(method_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(method_id)) or "method"


def _grid_names(results: dict) -> dict[str, str]:
    """method id -> grid file name (unique) for each method with samples."""
    names, used = {}, set()
    for mid, m in _ordered_methods(results):
        if not m.get("samples"):
            continue
        base = name = f"grid_{_safe_name(mid)}.png"
        k = 2
        while name in used or name == "grid_all.png":
            name = base[:-4] + f"_{k}.png"
            k += 1
        used.add(name)
        names[mid] = name
    return names


def _norm_dataset(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _paper_dataset(results: dict) -> str | None:
    wanted = (results.get("subject") or {}).get("paper_dataset")
    if not wanted:
        return None
    for ds in PAPER_DATASETS:
        if _norm_dataset(ds) == _norm_dataset(wanted):
            return ds
    return None


def _paper_row_method(results: dict, row: str) -> tuple[str, dict] | None:
    ordered = _ordered_methods(results)
    for mid, m in ordered:
        if str(m.get("paper_row", "")).lower() == row.lower():
            return mid, m
    for mid, m in ordered:
        if "paper_row" not in m and str(m.get("label", "")).lower() == row.lower():
            return mid, m
    return None


def _attack_preset(results: dict) -> str | None:
    prov = results.get("provenance") or {}
    att = prov.get("attack")
    if isinstance(att, str) and att:
        return att
    if isinstance(att, dict) and att.get("preset"):
        return str(att["preset"])
    cfg_att = (prov.get("config") or {}).get("attack") if isinstance(prov.get("config"), dict) else None
    if isinstance(cfg_att, dict) and cfg_att.get("preset"):
        return str(cfg_att["preset"])
    pert = results.get("perturbation") or {}
    att = pert.get("attack") if isinstance(pert, dict) else None
    if isinstance(att, dict):
        for key in ("preset", "name", "method"):
            if att.get(key):
                return str(att[key])
    elif isinstance(att, str) and att:
        return att
    det = results.get("detection") or {}
    if isinstance(det, dict) and det.get("attack"):
        return str(det["attack"])
    return None


def _short_hash(h) -> str:
    return str(h)[:12] if h else "unknown"


def _plain(v) -> str:
    """A provenance value as one line of text (deterministic)."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, ensure_ascii=False)
    return str(v)


def _samples_count_text(results: dict) -> str:
    counts = sorted({len(m.get("samples") or []) for _, m in _ordered_methods(results)})
    if not counts:
        return "no methods"
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _setting_lines(results: dict) -> list[str]:
    prov = results.get("provenance") or {}
    subject = results.get("subject") or {}
    lines = []
    ck = prov.get("checkpoint") or {}
    if ck:
        lines.append(f"checkpoint: {Path(str(ck.get('path', '?'))).name} (sha256 {_short_hash(ck.get('sha256'))})")
    else:
        lines.append("checkpoint: not recorded")
    lines.append(f"attack preset: {_attack_preset(results) or 'not recorded'}")
    lines.append(f"images per method: {_samples_count_text(results)}")
    if subject:
        lines.append(f"subject: {subject.get('class_name', '?')}, prompt \"{subject.get('instance_prompt', '?')}\", "
                     f"{subject.get('instance_images', '?')} instance images")
    seeds = prov.get("seeds")
    if isinstance(seeds, dict) and seeds:
        lines.append("seeds: " + ", ".join(f"{k}={_plain(seeds[k])}" for k in sorted(seeds)))
    elif seeds is not None:
        lines.append(f"seeds: {_plain(seeds)}")
    else:
        lines.append("seeds: not recorded")
    for mid in _metric_ids(results):
        meta = results["metrics"][mid]
        label = _metric_label(mid, meta)
        if not meta.get("available", False):
            lines.append(f"{label}: {_missing(meta.get('missing'))}")
            continue
        w = meta.get("weights") or {}
        extra = f", backbone {meta['backbone']}" if meta.get("backbone") else ""
        if w:
            lines.append(f"{label} weights: {Path(str(w.get('path', '?'))).name} "
                         f"(sha256 {_short_hash(w.get('sha256'))}){extra}")
    pert = results.get("perturbation")
    if isinstance(pert, dict) and isinstance(pert.get("mean"), dict):
        mean = pert["mean"]
        bits = []
        if _is_number(mean.get("psnr_db")):
            bits.append(f"PSNR {_fmt_db(mean['psnr_db'])}")
        if _is_number(mean.get("ssim")):
            bits.append(f"SSIM {mean['ssim']:.4f}")
        if _is_number(mean.get("linf_levels")):
            bits.append(f"L∞ {mean['linf_levels']:g} levels")
        if bits:
            lines.append("perturbation (mean over the protected images): " + ", ".join(bits))
    return lines


def _fmt_db(v) -> str:
    if not _is_number(v):
        return "n/a"
    if math.isinf(v):
        return "∞ dB (identical)"
    return f"{v:.2f} dB"


# -------------------------------------------------------------------------------- table model
def _table1(results: dict) -> tuple[list[str], list[list[str]]]:
    mids = _metric_ids(results)
    header = ["Method", "Trained on"] + [_metric_header(m, results["metrics"][m]) for m in mids] + ["Damage undone"]
    rows = []
    for _mid, m in _ordered_methods(results):
        label = str(m.get("label", _mid))
        trained = str(m.get("trained_on", "—"))
        if m.get("lord"):
            trained += " (LoRD live)"
        cells = [label, trained]
        for metric_id in mids:
            cells.append(_metric_cell(results, metric_id, (m.get("metrics") or {}).get(metric_id)))
        cells.append(_recovered_cell(results, m))
        rows.append(cells)
    return header, rows


def _table_notes(results: dict) -> list[str]:
    notes = []
    mids = _metric_ids(results)
    for mid in mids:
        meta = results["metrics"][mid]
        if _metric_kind(mid, meta) == "kd":
            notes.append(f"{_metric_label(mid, meta)} values are multiplied by 1000 (×10³); mean ± std over "
                         "the KID subsets.")
    if "clip_iqa" in mids and results["metrics"]["clip_iqa"].get("available"):
        notes.append("CLIP-IQA: mean ± std over the generated images of P(good) for "
                     "'A good photo of a {class}.' vs 'A bad photo of a {class}.'.")
    for mid in mids:
        meta = results["metrics"][mid]
        if meta.get("available") and meta.get("definition"):
            notes.append(f"{_metric_label(mid, meta)}: {meta['definition']}; mean ± std over the generated images.")
    hidden = _hidden_metrics(results)
    if hidden:
        notes.append("Not measured in this run: " + "; ".join(
            f"{_metric_label(m, results['metrics'][m])} ({_missing(results['metrics'][m].get('missing'))})"
            for m in hidden) + ".")
    for mid in mids:
        meta = results["metrics"][mid]
        label = _metric_label(mid, meta)
        if mid == "fid" and label != "FID" and meta.get("available"):
            notes.append(f"{label} is a Fréchet distance on another feature extractor, not FID: "
                         "its values are not comparable with the paper's FID.")
    definition = results.get("recovered_definition")
    if not any(isinstance(m.get("recovered"), dict) and m["recovered"] for _, m in _ordered_methods(results)):
        if any(m.get("recovered_skipped") for _, m in _ordered_methods(results)):
            notes.append("Damage undone: not computed -- the Clean-Attacking gap is within its noise for every "
                         "metric (the attack did not measurably change them; see recovered_skipped in results.json).")
        else:
            notes.append("Damage undone: not computed in this run (it needs a Clean and an Attacking row).")
        return notes
    if not definition and results.get("mode") == "artist":
        definition = ("share of the quality gap the method closes, as recorded by the runner (artist mode has no "
                      "Clean row; see results.json)")
    if not definition:
        definition = ("share of the gap between the Clean and the Attacking rows that the method closes, per "
                      "metric (100% = as good as Clean, 0% = no better than Attacking)")
    notes.append(f"Damage undone: {definition}; — where it does not apply.")
    return notes


def _paper_compare(results: dict) -> dict:
    """The paper block: either beside ours for the matching dataset, or the whole table (not comparable)."""
    ds = _paper_dataset(results)
    wanted = (results.get("subject") or {}).get("paper_dataset")
    if ds is None:
        header = ["Paper row"]
        for d in PAPER_DATASETS:
            header += [f"{d} CLIP-IQA ↑", f"{d} FID ↓"]
        rows = []
        for r in PAPER_ROWS:
            cells = [r]
            for d in PAPER_DATASETS:
                cells += [f"{PAPER_TABLE1[d][r]['clip_iqa']:.3f}", f"{PAPER_TABLE1[d][r]['fid']:.3f}"]
            rows.append(cells)
        why = "different model and data" if not wanted else \
            f"paper_dataset {wanted!r} is none of {', '.join(PAPER_DATASETS)}"
        return {"title": f"The paper's Table I (paper, not comparable: {why})", "header": header, "rows": rows,
                "notes": [f"Paper setting: {PAPER_SETTING}."]}
    metrics = results.get("metrics") or {}
    header = ["Paper row", "Our method", "CLIP-IQA ↑ (paper)"]
    has_iqa, has_fd = "clip_iqa" in metrics, "fid" in metrics
    if has_iqa:
        header.append(f"{_metric_header('clip_iqa', metrics['clip_iqa'])} (ours)")
    header.append("FID ↓ (paper)")
    if has_fd:
        header.append(f"{_metric_header('fid', metrics['fid'])} (ours)")
    rows = []
    for r in PAPER_ROWS:
        match = _paper_row_method(results, r)
        p = PAPER_TABLE1[ds][r]
        ours = (match[1].get("metrics") or {}) if match else {}
        no_row = _missing("no matching method in this run")
        cells = [r, str(match[1].get("label", match[0])) if match else "—", f"{p['clip_iqa']:.3f}"]
        if has_iqa:
            cells.append(_metric_cell(results, "clip_iqa", ours.get("clip_iqa")) if match else no_row)
        cells.append(f"{p['fid']:.3f}")
        if has_fd:
            cells.append(_metric_cell(results, "fid", ours.get("fid")) if match else no_row)
        rows.append(cells)
    notes = [f"Paper setting: {PAPER_SETTING}. Numbers are comparable only where our setting matches."]
    if has_fd and _metric_label("fid", metrics["fid"]) != "FID":
        notes.append(f"Our {_metric_label('fid', metrics['fid'])} is not FID: do not compare it with the paper's FID.")
    return {"title": f"The paper's Table I ({ds}) beside ours", "header": header, "rows": rows, "notes": notes}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def _subject_line(results: dict) -> str:
    s = results.get("subject") or {}
    mode = results.get("mode", "protocol")
    paper = s.get("paper_dataset")
    return (f"Mode: {mode}. Subject: {s.get('class_name', '?')} (prompt \"{s.get('instance_prompt', '?')}\", "
            f"{s.get('instance_images', '?')} instance images). Paper dataset: {paper or 'none'}.")


def _table1_md(results: dict) -> str:
    header, rows = _table1(results)
    lines = ["# Table I: image quality of the personalised model per method", "", _subject_line(results), ""]
    lines += _md_table(header, rows)
    lines.append("")
    lines += [f"- {n}" for n in _table_notes(results)]
    lines += ["", "Setting:", ""]
    lines += [f"- {s}" for s in _setting_lines(results)]
    paper = _paper_compare(results)
    lines += ["", f"## {paper['title']}", ""]
    lines += _md_table(paper["header"], paper["rows"])
    lines.append("")
    lines += [f"- {n}" for n in paper["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ figures
def _series_order(series: dict) -> list[str]:
    return [s for s in _SERIES_ORDER if s in series] + sorted(s for s in series if s not in _SERIES_ORDER)


def _point_entry(results: dict, point: dict, metric_id: str):
    metrics = point.get("metrics")
    if not isinstance(metrics, dict):
        method = (results.get("methods") or {}).get(point.get("method")) or {}
        metrics = method.get("metrics") or {}
    return metrics.get(metric_id)


def _fig7_metrics(metrics: dict) -> tuple[str, str]:
    """The two panels of Fig. 7: a quality score (CLIP-IQA, else subject accuracy) and a distance
    (FID, else another extractor's FD); the paper's pair when neither alternative is available."""
    def available(mid):
        return (metrics.get(mid) or {}).get("available", False)

    score = "clip_iqa" if available("clip_iqa") or not available("subject_acc") else "subject_acc"
    distance = "fid" if available("fid") or not available("fd") else "fd"
    return score, distance


def _fig7(results: dict) -> bytes:
    from matplotlib.figure import Figure

    sweep = results["sweep"]
    series = sweep.get("series") or {}
    metrics = results.get("metrics") or {}
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for ax, mid in zip(axes, _fig7_metrics(metrics)):
        meta = metrics.get(mid)
        title = _metric_header(mid, meta) if meta else {"clip_iqa": "CLIP-IQA ↑", "fid": "FID ↓"}[mid]
        ax.set_title(title)
        ax.set_xlabel("protected images in the training set (%)")
        if meta is None or not meta.get("available", False):
            reason = _missing(meta.get("missing") if meta else "this run has no such metric")
            _panel_message(ax, reason)
            continue
        plotted, reasons = 0, []
        for key in _series_order(series):
            xs, ys, es = [], [], []
            for point in sorted(series[key] or [], key=lambda p: p.get("share", 0)):
                value, std, missing = _metric_value(results, mid, _point_entry(results, point, mid))
                if missing:
                    reasons.append(f"{_SERIES_LABELS.get(key, key)} at {100 * point.get('share', 0):g}%: {missing}")
                    continue
                xs.append(100.0 * float(point.get("share", 0)))
                ys.append(value)
                es.append(std)
            if not xs:
                continue
            yerr = [e if e is not None else 0.0 for e in es] if any(e is not None for e in es) else None
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=_SERIES_LABELS.get(key, key))
            plotted += 1
        if plotted:
            ax.set_ylabel(_metric_label(mid, meta))
            ax.set_xlim(-5, 105)
            ax.grid(True, alpha=0.3)
            ax.legend()
            if reasons:
                ax.text(0.01, 0.01, "\n".join(reasons[:3]), transform=ax.transAxes, fontsize=7, va="bottom",
                        color="firebrick")
        else:
            _panel_message(ax, reasons[0] if reasons else _missing("no sweep points"))
    fig.suptitle("Quality vs share of protected images (cf. the paper's Fig. 7)")
    fig.tight_layout()
    return _png_bytes_figure(fig)


def _panel_message(ax, text: str) -> None:
    import textwrap

    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, textwrap.fill(text, 40), transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="firebrick")


def _roc(results: dict) -> bytes:
    from matplotlib.figure import Figure

    det = results["detection"]
    summary = det.get("summary") or {}
    roc = summary.get("roc") or {}
    fig = Figure(figsize=(5.2, 5))
    ax = fig.subplots()
    auroc = summary.get("auroc")
    auroc_text = f"{auroc:.3f}" if _is_number(auroc) else "n/a"
    ax.plot(roc.get("fpr", []), roc.get("tpr", []), color="tab:blue", label=f"LoRD Detect (AUROC {auroc_text})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    at = summary.get("at_fpr") or {}
    if _is_number(at.get("fpr")) and _is_number(at.get("tpr")):
        target = det.get("fpr_target", 0.05)
        thr = at.get("threshold")
        thr_text = f"{thr:.3g}" if _is_number(thr) else str(thr)
        ax.plot([at["fpr"]], [at["tpr"]], marker="o", markersize=8, color="tab:red", linestyle="none",
                label=f"threshold {thr_text} (FPR ≤ {100 * target:g}%): TPR {at['tpr']:.2f}, FPR {at['fpr']:.2f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false-positive rate (clean images flagged)")
    ax.set_ylabel("true-positive rate (protected images flagged)")
    ax.set_title(f"Detection ROC ({det.get('attack', 'attack not recorded')})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png_bytes_figure(fig)


# -------------------------------------------------------------------------------------- grids
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(path: Path, size: int):
    """The image at ``path`` scaled to fit a size x size RGB tile (aspect kept), or a grey "missing file" tile."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(size / im.width, size / im.height)
            new_size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            # small samples (tests, tiny models) are enlarged with visible pixels, large ones reduced smoothly
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            im = im.resize(new_size, resample)
            tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        return tile, True
    except (OSError, ValueError):
        draw = ImageDraw.Draw(tile)
        draw.text((8, size // 2 - 8), "missing file", fill=(150, 30, 30), font=_font(max(10, size // 12)))
        return tile, False


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _grid_method(out_dir: Path, label: str, samples: list[str], missing_files: list[str]) -> bytes:
    from PIL import Image, ImageDraw

    shown = samples[:_GRID_MAX]
    cols = min(_GRID_COLS, len(shown))
    rows = math.ceil(len(shown) / cols)
    header, pad = 34, 4
    width = cols * _GRID_TILE + (cols + 1) * pad
    canvas = Image.new("RGB", (width, header + rows * (_GRID_TILE + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(18)
    title = f"{label} ({len(shown)} of {len(samples)} samples)"
    draw.text((pad + 2, 7), _fit_text(draw, title, font, width - 2 * pad), fill=(0, 0, 0), font=font)
    for i, rel in enumerate(shown):
        tile, ok = _tile(out_dir / rel, _GRID_TILE)
        if not ok:
            missing_files.append(rel)
        r, c = divmod(i, cols)
        canvas.paste(tile, (pad + c * (_GRID_TILE + pad), header + r * (_GRID_TILE + pad)))
    return _png_bytes_pil(canvas)


def _grid_all(out_dir: Path, entries: list[tuple[str, list[str]]]) -> bytes:
    from PIL import Image, ImageDraw

    pad = 4
    cols = max(min(_ALL_MAX, len(s)) for _, s in entries)
    width = _ALL_LABEL_W + cols * (_ALL_TILE + pad) + pad
    canvas = Image.new("RGB", (width, len(entries) * (_ALL_TILE + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    for r, (label, samples) in enumerate(entries):
        y = pad + r * (_ALL_TILE + pad)
        draw.text((8, y + _ALL_TILE // 2 - 10), _fit_text(draw, label, font, _ALL_LABEL_W - 16), fill=(0, 0, 0),
                  font=font)
        for c, rel in enumerate(samples[:_ALL_MAX]):
            tile, _ok = _tile(out_dir / rel, _ALL_TILE)
            canvas.paste(tile, (_ALL_LABEL_W + c * (_ALL_TILE + pad), y))
    return _png_bytes_pil(canvas)


# --------------------------------------------------------------------------------------- html
_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.missing { color: #a11; font-style: italic; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="missing"' if str(c).startswith("missing:") else ""
            cells.append(f"<td{cls}>{_e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _html_list(items: list[str], cls: str = "") -> list[str]:
    attr = f' class="{cls}"' if cls else ""
    return [f"<ul{attr}>"] + [f"<li>{_e(i)}</li>" for i in items] + ["</ul>"]


def _index_html(results: dict, written: dict[str, Path], grids: dict[str, str],
                missing_files: list[str]) -> str:
    s = results.get("subject") or {}
    title = f"LoRD experiment report: {s.get('class_name', 'subject')} ({results.get('mode', 'protocol')} mode)"
    h = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
         f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>", f"<p>{_e(_subject_line(results))}</p>",
         '<p>Files: <a href="results.json">results.json</a> (every number and its provenance) · '
         '<a href="table1.md">table1.md</a></p>']
    if missing_files:
        h.append("<p class=\"missing\">Sample files that could not be read (grey tiles in the grids):</p>")
        h += _html_list(sorted(set(missing_files)))

    # Table I
    header, rows = _table1(results)
    h += ["<h2>Table I: image quality per method</h2>"] + _html_table(header, rows)
    h += _html_list(_table_notes(results), "note")
    h += ["<h3>Setting</h3>"] + _html_list(_setting_lines(results))
    paper = _paper_compare(results)
    h += [f"<h3>{_e(paper['title'])}</h3>"] + _html_table(paper["header"], paper["rows"])
    h += _html_list(paper["notes"], "note")

    # Fig. 7
    h.append("<h2>Fig. 7: quality vs share of protected images</h2>")
    if "fig7.png" in written:
        h.append('<p><img src="fig7.png" alt="Fig. 7: quality vs share of protected training images"></p>')
    else:
        h.append("<p>No sweep in this run.</p>")

    # Detection
    h.append("<h2>Detection (LoRD Detect, clean vs protected held-out images)</h2>")
    det = results.get("detection")
    if isinstance(det, dict) and det.get("available"):
        summary = det.get("summary") or {}
        at = summary.get("at_fpr") or {}
        target = det.get("fpr_target", 0.05)
        items = [f"attack: {det.get('attack', 'not recorded')}",
                 f"AUROC: {summary['auroc']:.4f}" if _is_number(summary.get("auroc")) else "AUROC: n/a",
                 f"images: {summary.get('negatives', len(det.get('scores_clean') or []))} clean, "
                 f"{summary.get('positives', len(det.get('scores_protected') or []))} protected"]
        if _is_number(at.get("tpr")):
            thr = at.get("threshold")
            thr_text = f"{thr:.4g}" if _is_number(thr) else str(thr)
            fpr_text = f"{at['fpr']:.3f}" if _is_number(at.get("fpr")) else "n/a"
            items.append(f"threshold at FPR ≤ {100 * target:g}%: {thr_text} (actual FPR {fpr_text}, "
                         f"TPR {at['tpr']:.3f})")
        h += _html_list(items)
        if "roc.png" in written:
            h.append('<p><img src="roc.png" alt="Detection ROC curve"></p>')
    else:
        reason = det.get("missing") if isinstance(det, dict) else "no detection in this run"
        h.append(f'<p class="missing">{_e(_missing(reason))}</p>')

    # Perturbation
    h.append("<h2>Perturbation (protected vs clean instance images)</h2>")
    pert = results.get("perturbation")
    if isinstance(pert, dict) and pert.get("per_image"):
        if pert.get("attack") is not None:
            h.append(f"<p>Attack: <code>{_e(_plain(pert['attack']))}</code></p>")
        prow = []
        for item in pert["per_image"]:
            prow.append([str(item.get("name", "?")), _fmt_db(item.get("psnr_db")),
                         f"{item['ssim']:.4f}" if _is_number(item.get("ssim")) else "n/a",
                         f"{item['linf_levels']:g}" if _is_number(item.get("linf_levels")) else "n/a",
                         f"{item['l2_levels']:.1f}" if _is_number(item.get("l2_levels")) else "n/a"])
        mean = pert.get("mean") or {}
        if mean:
            prow.append(["mean", _fmt_db(mean.get("psnr_db")),
                         f"{mean['ssim']:.4f}" if _is_number(mean.get("ssim")) else "n/a",
                         f"{mean['linf_levels']:g}" if _is_number(mean.get("linf_levels")) else "n/a",
                         f"{mean['l2_levels']:.1f}" if _is_number(mean.get("l2_levels")) else "n/a"])
        h += _html_table(["image", "PSNR", "SSIM", "L∞ (levels)", "L2 (levels)"], prow)
    else:
        h.append("<p>No perturbation statistics in this run.</p>")

    # Grids
    h.append("<h2>Samples</h2>")
    if "grid_all.png" in written:
        h.append('<p><img src="grid_all.png" alt="First samples of every method, one row per method"></p>')
    for mid, m in _ordered_methods(results):
        label = str(m.get("label", mid))
        h.append(f"<h3>{_e(label)}</h3>")
        name = grids.get(mid)
        if name and name in written:
            h.append(f'<p><img src="{_e(name)}" alt="{_e(label)} samples"></p>')
        else:
            h.append("<p>No samples.</p>")

    # Provenance
    prov = results.get("provenance") or {}
    h.append("<h2>Provenance</h2>")
    items = []
    ck = prov.get("checkpoint") or {}
    items.append(f"checkpoint: {ck.get('path', 'not recorded')} (sha256 {ck.get('sha256', 'unknown')})")
    items.append(f"attack preset: {_attack_preset(results) or 'not recorded'}")
    for mid in _metric_ids(results):
        meta = results["metrics"][mid]
        label = _metric_label(mid, meta)
        if not meta.get("available", False):
            items.append(f"{label}: {_missing(meta.get('missing'))}")
        else:
            w = meta.get("weights") or {}
            extra = f", backbone {meta['backbone']}" if meta.get("backbone") else ""
            items.append(f"{label} weights: {w.get('path', 'not recorded')} "
                         f"(sha256 {w.get('sha256', 'unknown')}){extra}")
    seeds = prov.get("seeds")
    items.append("seeds: " + (", ".join(f"{k}={_plain(seeds[k])}" for k in sorted(seeds))
                              if isinstance(seeds, dict) else _plain(seeds) if seeds is not None else "not recorded"))
    versions = prov.get("versions")
    items.append("versions: " + (", ".join(f"{k} {_plain(versions[k])}" for k in sorted(versions))
                                 if isinstance(versions, dict) else _plain(versions) if versions else "not recorded"))
    h += _html_list(items)
    rest = {k: prov[k] for k in sorted(prov) if k not in ("checkpoint", "seeds", "versions")}
    if rest:
        h.append("<details><summary>Full provenance (config, Stage 1, ...)</summary>")
        h.append(f"<pre>{_e(json.dumps(rest, indent=2, sort_keys=True, ensure_ascii=False))}</pre></details>")
    h += ["</body>", "</html>"]
    return "\n".join(h) + "\n"


# --------------------------------------------------------------------------------------- main
def _check(results: dict) -> None:
    if not isinstance(results, dict):
        raise TypeError(f"write_report: results must be a dict, got {type(results).__name__}")
    for key in ("metrics", "methods"):
        if not isinstance(results.get(key), dict):
            raise ValueError(f"write_report: results[{key!r}] must be a dict (see training/report.py's schema)")
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
        _atomic_write_bytes(path, data)
        written[name] = path

    put("results.json", (json.dumps(results, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    put("table1.md", _table1_md(results).encode("utf-8"))
    if results.get("sweep"):
        put("fig7.png", _fig7(results))
    det = results.get("detection")
    if isinstance(det, dict) and det.get("available") and isinstance(det.get("summary"), dict):
        put("roc.png", _roc(results))
    grids = _grid_names(results)
    missing_files: list[str] = []
    entries = []
    for mid, m in _ordered_methods(results):
        if mid not in grids:
            continue
        label = str(m.get("label", mid))
        put(grids[mid], _grid_method(out_dir, label, list(m["samples"]), missing_files))
        entries.append((label, list(m["samples"])))
    if entries:
        put("grid_all.png", _grid_all(out_dir, entries))
    put("index.html", _index_html(results, written, grids, missing_files).encode("utf-8"))

    for pattern in _STALE_PATTERNS:  # files of an earlier report that this one does not produce
        for old in out_dir.glob(pattern):
            if old.name not in written and old.is_file():
                old.unlink()
    return written


def main(argv=None) -> int:
    """``python -m training.report RESULTS_JSON [--out DIR]``: re-render a report from its results.json."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
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


if __name__ == "__main__":
    sys.exit(main())
