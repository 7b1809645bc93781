"""Table I: the rows and notes of our table, the setting lines, the paper's Table I (beside ours for
the matching dataset, else whole and marked not comparable) and ``table1.md``.
"""
from __future__ import annotations

import re
from pathlib import Path

from training.report.common import (attack_preset, fmt_db, hidden_metrics, is_number, metric_cell, metric_header,
                                    metric_ids, metric_kind, metric_label, missing_text, ordered_methods, plain)

__all__ = ["PAPER_TABLE1", "PAPER_ROWS", "PAPER_DATASETS", "PAPER_SETTING", "table1", "table_notes", "setting_lines",
           "paper_compare", "subject_line", "table1_md"]

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
    ordered = ordered_methods(results)
    for mid, m in ordered:
        if str(m.get("paper_row", "")).lower() == row.lower():
            return mid, m
    for mid, m in ordered:
        if "paper_row" not in m and str(m.get("label", "")).lower() == row.lower():
            return mid, m
    return None


def _short_hash(h) -> str:
    return str(h)[:12] if h else "unknown"


def _samples_count_text(results: dict) -> str:
    counts = sorted({len(m.get("samples") or []) for _, m in ordered_methods(results)})
    if not counts:
        return "no methods"
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def setting_lines(results: dict) -> list[str]:
    prov = results.get("provenance") or {}
    subject = results.get("subject") or {}
    lines = []
    ck = prov.get("checkpoint") or {}
    if ck:
        lines.append(f"checkpoint: {Path(str(ck.get('path', '?'))).name} (sha256 {_short_hash(ck.get('sha256'))})")
    else:
        lines.append("checkpoint: not recorded")
    lines.append(f"attack preset: {attack_preset(results) or 'not recorded'}")
    lines.append(f"images per method: {_samples_count_text(results)}")
    if subject:
        lines.append(f"subject: {subject.get('class_name', '?')}, prompt \"{subject.get('instance_prompt', '?')}\", "
                     f"{subject.get('instance_images', '?')} instance images")
    seeds = prov.get("seeds")
    if isinstance(seeds, dict) and seeds:
        lines.append("seeds: " + ", ".join(f"{k}={plain(seeds[k])}" for k in sorted(seeds)))
    elif seeds is not None:
        lines.append(f"seeds: {plain(seeds)}")
    else:
        lines.append("seeds: not recorded")
    for mid in metric_ids(results):
        meta = results["metrics"][mid]
        label = metric_label(mid, meta)
        if not meta.get("available", False):
            lines.append(f"{label}: {missing_text(meta.get('missing'))}")
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
        if is_number(mean.get("psnr_db")):
            bits.append(f"PSNR {fmt_db(mean['psnr_db'])}")
        if is_number(mean.get("ssim")):
            bits.append(f"SSIM {mean['ssim']:.4f}")
        if is_number(mean.get("linf_levels")):
            bits.append(f"L∞ {mean['linf_levels']:g} levels")
        if bits:
            lines.append("perturbation (mean over the protected images): " + ", ".join(bits))
    return lines


def table1(results: dict) -> tuple[list[str], list[list[str]]]:
    mids = metric_ids(results)
    header = ["Method", "Trained on"] + [metric_header(m, results["metrics"][m]) for m in mids]
    rows = []
    for _mid, m in ordered_methods(results):
        label = str(m.get("label", _mid))
        trained = str(m.get("trained_on", "—"))
        if m.get("lord"):
            trained += " (LoRD live)"
        cells = [label, trained]
        for metric_id in mids:
            cells.append(metric_cell(results, metric_id, (m.get("metrics") or {}).get(metric_id)))
        rows.append(cells)
    return header, rows


def table_notes(results: dict) -> list[str]:
    notes = []
    mids = metric_ids(results)
    for mid in mids:
        meta = results["metrics"][mid]
        if metric_kind(mid, meta) == "kd":
            notes.append(f"{metric_label(mid, meta)} values are multiplied by 1000 (×10³); mean ± std over "
                         "the KID subsets.")
    if "clip_iqa" in mids and results["metrics"]["clip_iqa"].get("available"):
        notes.append("CLIP-IQA: mean ± std over the generated images of P(good) for "
                     "'A good photo of a {class}.' vs 'A bad photo of a {class}.'.")
    for mid in mids:
        meta = results["metrics"][mid]
        if meta.get("available") and meta.get("definition"):
            notes.append(f"{metric_label(mid, meta)}: {meta['definition']}; mean ± std over the generated images.")
    hidden = hidden_metrics(results)
    if hidden:
        notes.append("Not measured in this run: " + "; ".join(
            f"{metric_label(m, results['metrics'][m])} ({missing_text(results['metrics'][m].get('missing'))})"
            for m in hidden) + ".")
    for mid in mids:
        meta = results["metrics"][mid]
        label = metric_label(mid, meta)
        if mid == "fid" and label != "FID" and meta.get("available"):
            notes.append(f"{label} is a Fréchet distance on another feature extractor, not FID: "
                         "its values are not comparable with the paper's FID.")
    if results.get("single_run_note"):
        notes.append(f"Reading the rows: {results['single_run_note']}.")
    return notes


def paper_compare(results: dict) -> dict:
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
        header.append(f"{metric_header('clip_iqa', metrics['clip_iqa'])} (ours)")
    header.append("FID ↓ (paper)")
    if has_fd:
        header.append(f"{metric_header('fid', metrics['fid'])} (ours)")
    rows = []
    for r in PAPER_ROWS:
        match = _paper_row_method(results, r)
        p = PAPER_TABLE1[ds][r]
        ours = (match[1].get("metrics") or {}) if match else {}
        no_row = missing_text("no matching method in this run")
        cells = [r, str(match[1].get("label", match[0])) if match else "—", f"{p['clip_iqa']:.3f}"]
        if has_iqa:
            cells.append(metric_cell(results, "clip_iqa", ours.get("clip_iqa")) if match else no_row)
        cells.append(f"{p['fid']:.3f}")
        if has_fd:
            cells.append(metric_cell(results, "fid", ours.get("fid")) if match else no_row)
        rows.append(cells)
    notes = [f"Paper setting: {PAPER_SETTING}. Numbers are comparable only where our setting matches."]
    if has_fd and metric_label("fid", metrics["fid"]) != "FID":
        notes.append(f"Our {metric_label('fid', metrics['fid'])} is not FID: do not compare it with the paper's FID.")
    return {"title": f"The paper's Table I ({ds}) beside ours", "header": header, "rows": rows, "notes": notes}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def subject_line(results: dict) -> str:
    s = results.get("subject") or {}
    mode = results.get("mode", "protocol")
    paper = s.get("paper_dataset")
    return (f"Mode: {mode}. Subject: {s.get('class_name', '?')} (prompt \"{s.get('instance_prompt', '?')}\", "
            f"{s.get('instance_images', '?')} instance images). Paper dataset: {paper or 'none'}.")


def table1_md(results: dict) -> str:
    header, rows = table1(results)
    lines = ["# Table I: image quality of the personalised model per method", "", subject_line(results), ""]
    lines += _md_table(header, rows)
    lines.append("")
    lines += [f"- {n}" for n in table_notes(results)]
    lines += ["", "Setting:", ""]
    lines += [f"- {s}" for s in setting_lines(results)]
    paper = paper_compare(results)
    lines += ["", f"## {paper['title']}", ""]
    lines += _md_table(paper["header"], paper["rows"])
    lines.append("")
    lines += [f"- {n}" for n in paper["notes"]]
    return "\n".join(lines) + "\n"
