"""The results dict read as text, shared by the tables, the figures, the grids and the page: the
methods in row order, the metric columns with their labels, kinds and value cells, ``missing: <reason>``
for anything that was not measured, and a few provenance values (attack preset, plain one-line values).
"""
from __future__ import annotations

import json
import math

__all__ = ["is_number", "missing_text", "ordered_methods", "metric_ids", "hidden_metrics", "metric_kind",
           "metric_label", "metric_header", "metric_value", "metric_cell", "fmt_db", "plain", "attack_preset"]

_METRIC_ORDER = ("clip_iqa", "fid", "kid")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def missing_text(reason) -> str:
    reason = str(reason).strip() if reason else ""
    return f"missing: {reason or 'no reason given'}"


def ordered_methods(results: dict) -> list[tuple[str, dict]]:
    methods = results.get("methods") or {}
    return sorted(methods.items(), key=lambda kv: (kv[1].get("row", 1 << 30), str(kv[0])))


def metric_ids(results: dict) -> list[str]:
    """The metrics shown as columns: the paper's (CLIP-IQA, FID, KID) first, then the others. A
    paper metric without weights is a "missing: ..." column, unless the run measures with another
    extractor instead (the lab model): then it is listed once in the notes (:func:`hidden_metrics`)."""
    metrics = results.get("metrics") or {}
    hidden = hidden_metrics(results)
    known = [m for m in _METRIC_ORDER if m in metrics and m not in hidden]
    return known + sorted(m for m in metrics if m not in _METRIC_ORDER)


def hidden_metrics(results: dict) -> list[str]:
    metrics = results.get("metrics") or {}
    if not any((meta or {}).get("available") for m, meta in metrics.items() if m not in _METRIC_ORDER):
        return []
    return [m for m in _METRIC_ORDER if m in metrics and not (metrics[m] or {}).get("available")]


def metric_kind(metric_id: str, meta: dict) -> str:
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


def metric_label(metric_id: str, meta: dict) -> str:
    return str(meta.get("label") or metric_id)


def metric_header(metric_id: str, meta: dict) -> str:
    label = metric_label(metric_id, meta)
    if metric_kind(metric_id, meta) == "kd":
        label += " ×10³"
    arrow = _arrow(meta)
    return f"{label} {arrow}" if arrow else label


def _fmt_value(metric_id: str, meta: dict, value: float, std=None) -> str:
    kind = metric_kind(metric_id, meta)
    scale, decimals = (1e3, 2) if kind == "kd" else (1.0, 2) if kind == "fd" else (1.0, 3)
    text = f"{value * scale:.{decimals}f}"
    if is_number(std) and math.isfinite(std):
        text += f" ± {std * scale:.{decimals}f}"
    return text


def metric_value(results: dict, metric_id: str, entry) -> tuple[float | None, float | None, str | None]:
    """(value, std, None) or (None, None, "missing: <reason>") for one method's / point's metric entry."""
    meta = (results.get("metrics") or {}).get(metric_id) or {}
    if not meta.get("available", False):
        return None, None, missing_text(meta.get("missing"))
    if not isinstance(entry, dict):
        return None, None, missing_text("not computed for this method")
    if entry.get("missing"):
        return None, None, missing_text(entry["missing"])
    value = entry.get("mean", entry.get("value"))
    if not is_number(value):
        return None, None, missing_text("no value recorded")
    if not math.isfinite(value):
        return None, None, missing_text(f"not a finite number ({value})")
    std = entry.get("std")
    return float(value), (float(std) if is_number(std) else None), None


def metric_cell(results: dict, metric_id: str, entry) -> str:
    value, std, missing = metric_value(results, metric_id, entry)
    if missing:
        return missing
    meta = results["metrics"][metric_id]
    return _fmt_value(metric_id, meta, value, std)


def fmt_db(v) -> str:
    if not is_number(v):
        return "n/a"
    if math.isinf(v):
        return "∞ dB (identical)"
    return f"{v:.2f} dB"


def plain(v) -> str:
    """A provenance value as one line of text (deterministic)."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, ensure_ascii=False)
    return str(v)


def attack_preset(results: dict) -> str | None:
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
