"""Rendering of a replicate analysis (:func:`lab.evidence_analysis.analyse`'s result dict): the markdown report, the
forest plot, the paper's Fig. 7 share curve and a dose-response experiment's budget curve. Reads no file:
``lab.evidence_analysis`` collects the values, ``lab.evidence`` writes the files."""
from __future__ import annotations

from lab.declared import EXPERIMENTS, SHARE_POINTS, SHARE_SERIES, family_of

ATTACK_LABELS = {"ace_fixed": "ACE (fixed model)", "mist_v2": "mist-v2 (ACE + surrogate loop)",
                 "anti_dreambooth_aspl": "ASPL (Anti-DreamBooth)"}

GATE_QUANTITIES = {  # the Stage-1 LoRD's gate, read from each replicate's results.json (the run holding 'lord')
    "detect_auroc": "Detect AUROC: the gate ranks the subject's protected copies above its clean images",
    "detect_clean": "Detect: mean gate on the subject's clean images",
    "detect_protected": "Detect: mean gate on the subject's protected copies",
    "stage1_clean": "Stage 1, in-sample: mean gate on clean training images (t = 50, 200, 400)",
    "stage1_perturbed": "Stage 1, in-sample: mean gate on their perturbed copies",
}


def established(row: dict) -> bool:
    """The declared decision rule: Holm-adjusted p < 0.05 and the 95% interval excludes 0."""
    excludes = row["ci_low"] > 0 or row["ci_high"] < 0
    return excludes and row.get("p_holm") is not None and row["p_holm"] < 0.05


def verdict(row: dict, confirmatory: bool) -> str:
    low, high = row["ci_low"], row["ci_high"]
    excludes = low > 0 or high < 0
    if confirmatory:
        return ("established: " + ("> 0" if low > 0 else "< 0")) if established(row) else "not established"
    return "interval excludes 0 (exploratory)" if excludes else "interval includes 0"


def markdown(result: dict) -> str:
    interim = result.get("interim")
    lines = [f"# Replicate analysis: {result['experiment']}", ""]
    if interim:
        lines += [f"**INTERIM**: {len(interim['unfinished'])} declared replicate(s) not finished "
                  f"({', '.join(interim['unfinished'])}); {interim['note']}.", ""]
    if result.get("unfinished"):
        left = result["unfinished"]
        lines += [f"Not finished: {', '.join(left['replicates'])}; the declared stopping rule ({left['stopping']}) "
                  f"analyses what finished, with each contrast's n below.", ""]
    lines += [result["purpose"], "",
             "Each row: paired differences over independent replicates (own subject bags and seeds); mean, "
             "95% t interval, effect size d_z = mean/sd, two-sided sign-flip permutation p (exact), and for the "
             "declared family (primary-metric questions and any co-primary ones) Holm's adjusted p. "
             "Decision rule (declared in EVIDENCE.md): a confirmatory question is answered when its Holm-adjusted "
             "p < 0.05 and its interval excludes 0.", ""]
    for metric, block in result["metrics"].items():
        primary = metric == result["primary"]
        asked = family_of(result, metric)
        if not block["contrasts"] and not any(v is not None for v in block["method_means"].values()):
            continue  # not measured by these runs (e.g. a metric added after they were scored)
        kind = " (primary)" if primary else " (co-primary: declared questions)" if asked else " (secondary, exploratory)"
        lines += [f"## {block['label']}" + kind,
                  "", "lower is better" if block["lower_is_better"] else "higher is better", ""]
        means = ", ".join(f"{m} {v:.5g}" for m, v in block["method_means"].items() if v is not None)
        lines += [f"Method means over replicates: {means}.", ""]
        lines += ["| contrast | n | mean | 95% interval | d_z | p | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
        for name, row in block["contrasts"].items():
            conf = name in asked
            holm = f"{row['p_holm']:.4g}" if row.get("p_holm") is not None else ""
            lines.append(f"| {name}{' *' if conf else ''} | {row['n']} | {row['mean']:+.4g} | "
                         f"{row['ci_low']:+.4g} to {row['ci_high']:+.4g} | {row['d_z']:+.2f} | {row['p']:.4g} | {holm} | "
                         f"{verdict(row, conf)} |")
        for name, row in block["contrasts"].items():
            eq = row.get("equivalence")
            if eq:
                lines += ["", f"Equivalence (declared): {name}'s 90% interval {eq['ci90_low']:+.4g} to "
                              f"{eq['ci90_high']:+.4g} against the margin +-{eq['margin']:g}: "
                              + {"equivalent": "**equivalent** to 0 within the margin",
                                 "below the margin": "**below the margin**: lower than 0 by more than the margin",
                                 "above the margin": "**above the margin**: higher than 0 by more than the margin",
                                 }.get(eq.get("reading"), "not shown equivalent") + f" ({eq['rule']})."]
        shares = block.get("remaining_shares") or ({"lord": block["remaining_share_under_lord"]}
                                                   if block.get("remaining_share_under_lord") else {})
        for prot, share in shares.items():
            lines += ["", f"Share of A remaining under {'LoRD' if prot == 'lord' else prot}: {share['value']:.3g} "
                          f"(95% bootstrap {share['ci_low']:.3g} to {share['ci_high']:.3g}); {share['definition']}."]
        lines += ["", "Contrasts: " + "; ".join(f"{name} = {row['question']}"
                                                for name, row in block["contrasts"].items()) + ".", ""]
    gates = result.get("gates") or {}
    if gates:
        lines += ["## The Stage-1 gate (exploratory)", "", "| quantity | n | mean | 95% interval |", "|---|---|---|---|"]
        for k, row in gates.items():
            label = GATE_QUANTITIES.get(k) or (f"Stage 1, in-sample, t = {k.rsplit('_t', 1)[1]}: mean gate on "
                                               + ("clean images" if "_clean_" in k else "perturbed copies"))
            lines.append(f"| {label} | {row['n']} | {row['mean']:.4f} | {row['ci_low']:.4f} to {row['ci_high']:.4f} |")
        lines.append("")
    lines += perturbation_lines(result.get("perturbations") or {})
    gate = result.get("threat_gate")
    if gate:
        lines += [f"Threat gate (declared): d_z(A) = {gate['d_z']:+.2f}: "
                  + ("measurable threat." if gate["measurable"] else "no measurable threat at this budget."), ""]
    for name, n in (result.get("unfinished_arms") or {}).items():
        lines += [f"Not analysed (declared stopping rule): {name} has {n} of its replicates finished.", ""]
    for name, gate in (result.get("threat_gates") or {}).items():
        verdict_text = ("no measurable threat at this budget." if not gate["measurable"] else "measurable threat."
                        if gate["d_z"] > 0 else "|d_z| >= 0.3 but in the other direction: the protected copies did "
                        "not damage the LoRA (no threat).")
        lines += [f"Threat gate (declared), {name}: d_z = {gate['d_z']:+.2f}: {verdict_text}", ""]
    analysed = result.get("family_analysed")
    if analysed is not None and len(analysed) < len(result["family"]):
        lines += [f"Holm's correction is over the {len(analysed)} analysed of the {len(result['family'])} declared "
                  f"questions (EVIDENCE.md's stopping rule); with all {len(result['family'])} the adjusted p values "
                  f"would be larger.", ""]
    lines.append("`*`: the declared confirmatory family (Holm-adjusted together).")
    return "\n".join(lines) + "\n"


def perturbation_lines(perturbations: dict) -> list[str]:
    """The markdown table of each attack setting's perturbation size (:func:`lab.evidence_analysis.perturbation_values`
    summarised): mean over replicates (each replicate: its images' mean) with the smallest and largest replicate."""
    if not perturbations:
        return []
    lines = ["## Perturbation size per attack setting (exploratory)", "",
             "Each replicate's mean over its protected images, against the clean image; mean over replicates "
             "(smallest to largest replicate). L-inf and L2 in pixel levels (0..255).", "",
             "| attack setting | n | PSNR (dB) | SSIM | L-inf (levels) | L2 (levels) |", "|---|---|---|---|---|---|"]
    formats = {"psnr_db": ".2f", "ssim": ".4f", "linf_levels": ".2f", "l2_levels": ".1f"}
    for method, rows in perturbations.items():
        cells = []
        for q, f in formats.items():
            row = rows.get(q)
            if row is None:
                cells.append("")
                continue
            per = list(row["per_replicate"].values())
            cells.append(f"{row['mean']:{f}} ({min(per):{f}} to {max(per):{f}})")
        n = max((row["n"] for row in rows.values()), default=0)
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _significant(test: dict | None, sign: float) -> bool:
    """The crossed test passes the decision rule (:func:`established`) on the side of ``sign``."""
    return bool(test) and established(test) and (test["ci_low"] > 0) == (sign > 0)


def heldout_reading(row: dict) -> str:
    """One question's reading: its published decision against the crossed tests -- the images a sample, and where
    they are crops of fewer sources, the sources a sample too (all must agree, on the published sign, for
    "holds")."""
    if row.get("published_established") is None:
        return "not in the published analysis"
    by_image = _significant(row["crossed"], row["mean"])
    by_source = "by_source" not in row or _significant(row["by_source"], row["mean"])
    if row["published_established"]:
        return ("holds with the images a sample" if by_image and by_source else "depends on these images"
                if not by_image else "depends on these source textures")
    return "established only with the images a sample" if by_image and by_source else "not established either way"


def heldout_markdown(results: dict, skipped: dict | None = None) -> str:
    """The held-out-image sensitivity analysis (:func:`lab.evidence_analysis.heldout_sensitivity` per experiment) as
    markdown: each declared held-out-loss question's interval with the images fixed (as published) beside the
    one that treats them as a sample too (and, for crops of fewer sources, the sources)."""
    lines = ["# The held-out images as a sample (exploratory, post hoc)", "",
             "Each declared question on the held-out denoising loss, computed per replicate **and per held-out "
             "image** (every run scores the same images, each with its own fixed noise draws). \"as published\": the "
             "95% Student-t interval over the replicates, the images held fixed, and the experiment's decision. "
             "\"images a sample\": a two-way random-effects interval over replicates x images (Satterthwaite df; "
             "lord_ops.analysis.crossed_interval) -- would the answer hold on another set of held-out images like "
             "these? \"image share\": the share of the mean's variance that comes from which images were drawn. "
             "Where the held-out images are crops of fewer source images (lab model 2), \"sources a sample\" "
             "averages each source's crops first (equal weight per source, so its mean differs from the published "
             "mean over crops) and treats the sources as the sample. \"Holm p\": that t test, Holm-adjusted over "
             "the experiment's declared family (its other entries -- co-primary questions -- with their published "
             "sign-flip p). The held-out images are the reference set's first 32 by name, not a random draw. A "
             "reading aid for the published decisions, post hoc, not a new decision.", ""]
    for name, result in results.items():
        rows = result["questions"]
        grouped = any("by_source" in r for r in rows.values())
        head = ("| question | replicates x images | mean | 95% interval, as published | decision | 95% interval, "
                "images a sample | df | image share | Holm p |")
        rule = "|---|---|---|---|---|---|---|---|---|"
        if grouped:
            head += " sources | mean over sources | 95% interval, sources a sample | source share | Holm p |"
            rule += "---|---|---|---|---|"
        lines += [f"## {name}", "", head + " reading |", rule + "---|"]
        for contrast, row in rows.items():
            c = row["crossed"]
            decision = {True: "established", False: "not established", None: "--"}[row.get("published_established")]
            cells = (f"| {contrast} | {len(row['replicates'])} x {row['images']} | {row['mean']:+.5f} | "
                     f"{row['ci_low']:+.5f} to {row['ci_high']:+.5f} | {decision} | {c['ci_low']:+.5f} to "
                     f"{c['ci_high']:+.5f} | {c['df']:.1f} | {c['item_share']:.2f} | {c.get('p_holm', float('nan')):.2g} |")
            if grouped:
                g = row.get("by_source")
                cells += (f" {g['sources']} | {g['mean']:+.5f} | {g['ci_low']:+.5f} to {g['ci_high']:+.5f} | "
                          f"{g['item_share']:.2f} | {g.get('p_holm', float('nan')):.2g} |" if g else " -- | -- | -- | -- | -- |")
            lines.append(cells + f" {heldout_reading(row)} |")
        lines.append("")
        if result.get("holm_with"):
            lines += ["Holm's family also holds " + ", ".join(f"{q} (published p {p:.2g})"
                                                              for q, p in result["holm_with"].items()) + ".", ""]
        for contrast, eq in (result.get("equivalence") or {}).items():
            lines += [f"Equivalence (declared, margin +-{eq['margin']:g}): {contrast}'s 90% interval "
                      f"{eq['ci90_low']:+.5f} to {eq['ci90_high']:+.5f} as published ({eq['reading']}); with the images "
                      f"a sample {eq['crossed_ci90_low']:+.5f} to {eq['crossed_ci90_high']:+.5f} "
                      f"({eq['crossed_reading']}).", ""]
        for contrast, why in (result.get("skipped") or {}).items():
            lines += [f"Not analysed: {contrast} ({why}).", ""]
    for name, why in (skipped or {}).items():
        lines += [f"Not analysed: {name} ({why}).", ""]
    return "\n".join(lines) + "\n"


def png_bytes(fig, clear_of=None) -> bytes:
    """A matplotlib Figure as PNG bytes (no software tag: the same figure gives the same bytes). ``clear_of``: a
    text artist at the top (the figure's suptitle) whose rendered height, plus a small gap, is kept free above the
    axes -- tight_layout alone lets a tall figure's title run into its first row."""
    import io

    rect = None
    if clear_of is not None:
        height = clear_of.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi + 0.15  # inches
        rect = (0, 0, 1, 1 - height / fig.get_figheight())
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def forest_png(result: dict) -> bytes:
    """Each contrast of the primary metric with its 95% interval (a forest plot), as PNG bytes."""
    return png_bytes(forest_figure(result))


def forest_figure(result: dict):
    """The forest plot's matplotlib Figure: per contrast of the primary metric its mean and 95% interval (black:
    the declared family); a contrast with a declared equivalence reading also shows its margin (a shaded band
    around 0, on that row) and its 90% interval (a thick bar), the two things the reading compares."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    block = result["metrics"][result["primary"]]
    rows = list(block["contrasts"].items())
    fig = Figure(figsize=(7, 0.45 * max(len(rows), 1) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    asked = family_of(result, result["primary"])
    for i, (name, row) in enumerate(reversed(rows)):
        conf = name in asked
        colour = "black" if conf else "grey"
        eq = row.get("equivalence")
        if eq:
            ax.fill_betweenx([i - 0.3, i + 0.3], -eq["margin"], eq["margin"], color="tab:blue", alpha=0.15,
                             linewidth=0, label="equivalence margin (declared)")
            ax.plot([eq["ci90_low"], eq["ci90_high"]], [i, i], color=colour, linewidth=4, alpha=0.45,
                    solid_capstyle="butt", label="90% interval (equivalence reading)")
        ax.plot([row["ci_low"], row["ci_high"]], [i, i], color=colour)
        ax.plot([row["mean"]], [i], "o", color=colour)
    ax.axvline(0, color="red", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n + (" *" if n in asked else "") for n, _ in reversed(rows)])
    ax.set_xlabel(f"difference in {block['label']} (95% interval over replicates)")
    ax.set_title(f"{result['experiment']}: paired contrasts (* confirmatory)")
    if ax.get_legend_handles_labels()[0]:  # only the equivalence rows carry labels
        ax.legend(loc="best", fontsize="small")
    return fig


def share_curve_png(result: dict) -> bytes | None:
    """The paper's Fig. 7 from the replicates: the primary metric's mean (95% t interval over replicates) at 0, 2,
    4, 6 and 8 of 8 images protected, per series; None when the experiment has no share points."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lord_ops import analysis as an

    values = result.get("values", {}).get(result["primary"], {})
    present = {label: series for label, series in SHARE_SERIES.items()
               if all(len(values.get(m, {})) >= 2 for m in series)}
    if "plain LoRA" not in present or len(present) < 2:
        return None
    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shifts = [0.16 * (i - (len(present) - 1) / 2) for i in range(len(present))]
    for (label, series), shift in zip(present.items(), shifts):
        stats = [an.mean_interval(list(values[m].values())) for m in series]
        x = [k + shift for k in SHARE_POINTS]
        ax.errorbar(x, [st[0] for st in stats], yerr=[[st[0] - st[2] for st in stats], [st[3] - st[0] for st in stats]],
                    marker="o", capsize=3, label=label)
    ax.set_xticks([0, 2, 4, 6, 8])
    ax.set_xlabel("protected images of 8")
    ax.set_ylabel(f"{result['metrics'][result['primary']]['label']} (lower is better)")
    ax.set_title(f"{result['experiment']}: mean over {len(next(iter(values.values())))} replicates (95% t)")
    ax.legend()
    return png_bytes(fig)


def dose_series(result: dict, metric: str) -> dict[str, list[tuple[float, str, dict]]]:
    """A dose-response experiment's attack effects on ``metric`` per attack: ``{preset: [(budget in pixel levels
    of 0..255, contrast name, contrast row), ...]}`` by budget, from the declared arms (and reference arms) whose
    ``A_<arm>`` contrast the result holds (an arm not analysed, e.g. unfinished under a per-arm stopping rule, is
    absent; a preset left with one budget is a single point)."""
    declared = EXPERIMENTS.get(result.get("experiment"))
    contrasts = result["metrics"].get(metric, {}).get("contrasts", {})
    series: dict[str, list[tuple[float, str, dict]]] = {}
    for arm in (declared.arms + declared.reference_arms) if declared else ():
        row = contrasts.get(arm.contrast.name)
        if row is not None:
            series.setdefault(arm.attack["preset"], []).append((float(arm.attack["epsilon"]), arm.contrast.name, row))
    return {preset: sorted(points, key=lambda p: p[0]) for preset, points in series.items()}


def dose_curve_figure(result: dict):
    """The threat's dose-response: per attack, the attack effect A (protected minus clean, mean and 95% interval
    over replicates) against the budget (L-inf, pixel levels of 0..255, log scale). Marker: filled where this
    experiment's declared question is established (Holm), hollow where it is not; a reference arm (the paired
    experiment's A, judged there, not here) is a half-filled square. Panels: the primary metric, and the target
    correlation (the ACE target's own success signal) where measured. None when the primary metric has no arm's
    effect (not a dose-response experiment, or no arm analysed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(m, dose_series(result, m)) for m in (result["primary"], "target_corr")]
    panels = [(m, s) for m, s in panels if s]
    if not panels or panels[0][0] != result["primary"]:
        return None
    declared = EXPERIMENTS[result["experiment"]]
    reference = {arm.contrast.name for arm in declared.reference_arms}
    fig = Figure(figsize=(5.2 * len(panels), 4.3))
    FigureCanvasAgg(fig)
    for k, (metric, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        asked = family_of(result, metric)
        ratios = [2 ** (0.06 * (i - (len(series) - 1) / 2)) for i in range(len(series))]  # side by side
        for (preset, points), ratio in zip(series.items(), ratios):
            x = [b * ratio for b, _, _ in points]
            rows = [row for _, _, row in points]
            line = ax.errorbar(x, [r["mean"] for r in rows], capsize=3,
                               yerr=[[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]],
                               label=ATTACK_LABELS.get(preset, preset))
            colour = line[0].get_color()
            for xi, (_, name, row) in zip(x, points):
                if name in reference:
                    ax.plot([xi], [row["mean"]], "s", color=colour, fillstyle="left", markerfacecoloralt="white",
                            markersize=8)
                    continue
                filled = name in asked and established(row)
                ax.plot([xi], [row["mean"]], "o", color=colour, markerfacecolor=colour if filled else "white")
        ax.axhline(0, color="red", linewidth=0.8)
        ax.set_xscale("log", base=2)
        budgets = sorted({b for points in series.values() for b, _, _ in points})
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        ax.set_xlabel("budget (L-inf, pixel levels of 0..255)")
        ax.set_ylabel("A = protected - clean (95% interval)")
        kind = ("primary" if metric == result["primary"] else "co-primary: declared questions" if asked
                else "exploratory")
        ax.set_title(f"{result['metrics'][metric]['label']} ({kind})", fontsize="medium", wrap=True)
        ax.legend(fontsize="small")
    counts = sorted({row["n"] for _, series in panels for points in series.values() for _, _, row in points})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(f"{result['experiment']}: attack effect by budget, n = {n} replicates\nfilled: this experiment's "
                 f"question established (Holm)" + (f"; half-filled square: reference arm ({declared.paired_with}'s A)"
                                                  if reference else ""), fontsize="medium")
    return fig


def dose_curve_png(result: dict) -> bytes | None:
    """:func:`dose_curve_figure` as PNG bytes, or None."""
    fig = dose_curve_figure(result)
    return None if fig is None else png_bytes(fig)
