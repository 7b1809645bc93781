"""The matplotlib figures (Agg canvas, no pyplot): ``fig7.png`` (quality vs the protected share, like
the paper's Fig. 7) and ``roc.png`` (detection), as PNG bytes without a software stamp.
"""
from __future__ import annotations

from training.report.common import is_number, metric_header, metric_label, metric_value, missing_text

__all__ = ["fig7_png", "roc_png"]

_SERIES_LABELS = {"plain": "LoRA (plain)", "lord": "LoRD"}
_SERIES_ORDER = ("plain", "lord")


def _png_bytes_figure(fig) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


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


def fig7_png(results: dict) -> bytes:
    from matplotlib.figure import Figure

    sweep = results["sweep"]
    series = sweep.get("series") or {}
    metrics = results.get("metrics") or {}
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for ax, mid in zip(axes, _fig7_metrics(metrics)):
        meta = metrics.get(mid)
        title = metric_header(mid, meta) if meta else {"clip_iqa": "CLIP-IQA ↑", "fid": "FID ↓"}[mid]
        ax.set_title(title)
        ax.set_xlabel("protected images in the training set (%)")
        if meta is None or not meta.get("available", False):
            reason = missing_text(meta.get("missing") if meta else "this run has no such metric")
            _panel_message(ax, reason)
            continue
        plotted, reasons = 0, []
        for key in _series_order(series):
            xs, ys, es = [], [], []
            for point in sorted(series[key] or [], key=lambda p: p.get("share", 0)):
                value, std, missing = metric_value(results, mid, _point_entry(results, point, mid))
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
            ax.set_ylabel(metric_label(mid, meta))
            ax.set_xlim(-5, 105)
            ax.grid(True, alpha=0.3)
            ax.legend()
            if reasons:
                ax.text(0.01, 0.01, "\n".join(reasons[:3]), transform=ax.transAxes, fontsize=7, va="bottom",
                        color="firebrick")
        else:
            _panel_message(ax, reasons[0] if reasons else missing_text("no sweep points"))
    fig.suptitle("Quality vs share of protected images (cf. the paper's Fig. 7)")
    fig.tight_layout()
    return _png_bytes_figure(fig)


def _panel_message(ax, text: str) -> None:
    import textwrap

    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, textwrap.fill(text, 40), transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="firebrick")


def roc_png(results: dict) -> bytes:
    from matplotlib.figure import Figure

    det = results["detection"]
    summary = det.get("summary") or {}
    roc = summary.get("roc") or {}
    fig = Figure(figsize=(5.2, 5))
    ax = fig.subplots()
    auroc = summary.get("auroc")
    auroc_text = f"{auroc:.3f}" if is_number(auroc) else "n/a"
    ax.plot(roc.get("fpr", []), roc.get("tpr", []), color="tab:blue", label=f"LoRD Detect (AUROC {auroc_text})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    at = summary.get("at_fpr") or {}
    if is_number(at.get("fpr")) and is_number(at.get("tpr")):
        target = det.get("fpr_target", 0.05)
        thr = at.get("threshold")
        thr_text = f"{thr:.3g}" if is_number(thr) else str(thr)
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
