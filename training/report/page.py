"""``index.html``: one static page with all of the report (relative links, no scripts, no external
assets): Table I and the paper's, Fig. 7, detection, perturbation, the sample grids and the provenance.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from training.report.common import (attack_preset, fmt_db, is_number, metric_ids, metric_label, missing_text,
                                    ordered_methods, plain)
from training.report.tables import paper_compare, setting_lines, subject_line, table1, table_notes

__all__ = ["index_html"]

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


def index_html(results: dict, written: dict[str, Path], grids: dict[str, str],
                missing_files: list[str]) -> str:
    s = results.get("subject") or {}
    title = f"LoRD experiment report: {s.get('class_name', 'subject')} ({results.get('mode', 'protocol')} mode)"
    h = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
         f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>", f"<p>{_e(subject_line(results))}</p>",
         '<p>Files: <a href="results.json">results.json</a> (every number and its provenance) · '
         '<a href="table1.md">table1.md</a></p>']
    if missing_files:
        h.append("<p class=\"missing\">Sample files that could not be read (grey tiles in the grids):</p>")
        h += _html_list(sorted(set(missing_files)))

    # Table I
    header, rows = table1(results)
    h += ["<h2>Table I: image quality per method</h2>"] + _html_table(header, rows)
    h += _html_list(table_notes(results), "note")
    h += ["<h3>Setting</h3>"] + _html_list(setting_lines(results))
    paper = paper_compare(results)
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
                 f"AUROC: {summary['auroc']:.4f}" if is_number(summary.get("auroc")) else "AUROC: n/a",
                 f"images: {summary.get('negatives', len(det.get('scores_clean') or []))} clean, "
                 f"{summary.get('positives', len(det.get('scores_protected') or []))} protected"]
        if is_number(at.get("tpr")):
            thr = at.get("threshold")
            thr_text = f"{thr:.4g}" if is_number(thr) else str(thr)
            fpr_text = f"{at['fpr']:.3f}" if is_number(at.get("fpr")) else "n/a"
            items.append(f"threshold at FPR ≤ {100 * target:g}%: {thr_text} (actual FPR {fpr_text}, "
                         f"TPR {at['tpr']:.3f})")
        h += _html_list(items)
        if "roc.png" in written:
            h.append('<p><img src="roc.png" alt="Detection ROC curve"></p>')
    else:
        reason = det.get("missing") if isinstance(det, dict) else "no detection in this run"
        h.append(f'<p class="missing">{_e(missing_text(reason))}</p>')

    # Stage-1 gate by timestep
    sep = ((results.get("provenance") or {}).get("stage1") or {}).get("gate_separation_train")
    if isinstance(sep, dict) and isinstance(sep.get("by_timestep"), dict) and sep["by_timestep"]:
        h.append("<h2>Stage-1 gate by timestep (training pairs, in-sample)</h2>")
        h.append("<p>Mean gate on clean and perturbed latents and their AUROC at each evaluation timestep: "
                 "where noise hides the perturbation the gate cannot separate them, and a BCE over all "
                 "timesteps pulls it towards 0.5 there.</p>")
        rows = [[str(t), f"{v['mean_gate_clean']:.3f}", f"{v['mean_gate_perturbed']:.3f}", f"{v['auroc']:.3f}"]
                for t, v in sorted(sep["by_timestep"].items(), key=lambda kv: int(kv[0]))
                if all(is_number(v.get(k)) for k in ("mean_gate_clean", "mean_gate_perturbed", "auroc"))]
        h += _html_table(["timestep", "mean gate, clean", "mean gate, perturbed", "AUROC"], rows)

    # Perturbation
    h.append("<h2>Perturbation (protected vs clean instance images)</h2>")
    pert = results.get("perturbation")
    if isinstance(pert, dict) and pert.get("per_image"):
        if pert.get("attack") is not None:
            h.append(f"<p>Attack: <code>{_e(plain(pert['attack']))}</code></p>")
        prow = []
        for item in pert["per_image"]:
            prow.append([str(item.get("name", "?")), fmt_db(item.get("psnr_db")),
                         f"{item['ssim']:.4f}" if is_number(item.get("ssim")) else "n/a",
                         f"{item['linf_levels']:g}" if is_number(item.get("linf_levels")) else "n/a",
                         f"{item['l2_levels']:.1f}" if is_number(item.get("l2_levels")) else "n/a"])
        mean = pert.get("mean") or {}
        if mean:
            prow.append(["mean", fmt_db(mean.get("psnr_db")),
                         f"{mean['ssim']:.4f}" if is_number(mean.get("ssim")) else "n/a",
                         f"{mean['linf_levels']:g}" if is_number(mean.get("linf_levels")) else "n/a",
                         f"{mean['l2_levels']:.1f}" if is_number(mean.get("l2_levels")) else "n/a"])
        h += _html_table(["image", "PSNR", "SSIM", "L∞ (levels)", "L2 (levels)"], prow)
    else:
        h.append("<p>No perturbation statistics in this run.</p>")

    # Grids
    h.append("<h2>Samples</h2>")
    if "grid_all.png" in written:
        h.append('<p><img src="grid_all.png" alt="First samples of every method, one row per method"></p>')
    for mid, m in ordered_methods(results):
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
    items.append(f"attack preset: {attack_preset(results) or 'not recorded'}")
    for mid in metric_ids(results):
        meta = results["metrics"][mid]
        label = metric_label(mid, meta)
        if not meta.get("available", False):
            items.append(f"{label}: {missing_text(meta.get('missing'))}")
        else:
            w = meta.get("weights") or {}
            extra = f", backbone {meta['backbone']}" if meta.get("backbone") else ""
            items.append(f"{label} weights: {w.get('path', 'not recorded')} "
                         f"(sha256 {w.get('sha256', 'unknown')}){extra}")
    seeds = prov.get("seeds")
    items.append("seeds: " + (", ".join(f"{k}={plain(seeds[k])}" for k in sorted(seeds))
                              if isinstance(seeds, dict) else plain(seeds) if seeds is not None else "not recorded"))
    versions = prov.get("versions")
    items.append("versions: " + (", ".join(f"{k} {plain(versions[k])}" for k in sorted(versions))
                                 if isinstance(versions, dict) else plain(versions) if versions else "not recorded"))
    h += _html_list(items)
    rest = {k: prov[k] for k in sorted(prov) if k not in ("checkpoint", "seeds", "versions")}
    if rest:
        h.append("<details><summary>Full provenance (config, Stage 1, ...)</summary>")
        h.append(f"<pre>{_e(json.dumps(rest, indent=2, sort_keys=True, ensure_ascii=False))}</pre></details>")
    h += ["</body>", "</html>"]
    return "\n".join(h) + "\n"
