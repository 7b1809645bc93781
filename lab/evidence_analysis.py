"""Reading the replicates' results and analysing them (EVIDENCE.md): where a finished run's ``results.json`` is
(the output folder, else the archive ``docs/evidence/runs``), the values per metric, method and replicate, the paired
analysis (``lord_ops.analysis``), the Stage-1 gate and the perturbation sizes per attack setting, the held-out
images as a sample (``heldout``), the sample grid. ``lab.evidence`` runs the replicates and writes the reports;
``lab.evidence_report`` renders them. Reads files, runs nothing."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lab.declared import METRICS, PRIMARY, REMAINING_PAIRS, Declared, family_question
from lab.evidence_report import established, png_bytes
from lab.experiment import LABS

# finished replicates' results.json, kept in the repository (``<folder>/rNNN.json``): an output folder is
# scratch (hours of cached stages), the archive is what a later session's report and run read back
ARCHIVE = Path(__file__).resolve().parent.parent / "docs" / "evidence" / "runs"


_PARSED: dict = {}  # (path, mtime_ns, size) -> content: status and report ask about each file many times


def read_results(results: Path) -> dict | None:
    """A results.json's content (``None``: missing or unreadable); each file version parsed once (every
    results.json is replaced atomically, so a new version has a new mtime)."""
    try:
        st = Path(results).stat()
        key = (str(results), st.st_mtime_ns, st.st_size)
        if key not in _PARSED:
            _PARSED[key] = json.loads(Path(results).read_text(encoding="utf-8"))
        return _PARSED[key]
    except (OSError, ValueError):
        return None


def listed_methods(results: Path) -> set | None:
    """The method names a results.json lists (``None``: missing or unreadable)."""
    data = read_results(results)
    return None if data is None else set(data.get("methods") or {})


def archived(results: Path, out: Path, archive: Path | None = None) -> Path:
    """Where the archive keeps a replicate's ``results.json`` (``<out>/<folder>/rNNN/run/report/results.json``
    -> ``<archive>/<folder>/rNNN.json``)."""
    rel = Path(results).relative_to(out)  # <folder...>/rNNN/run/report/results.json
    return Path(archive or ARCHIVE) / rel.parent.parent.parent.parent / f"{rel.parts[-4]}.json"


def kept_results(results: Path, out: Path, archive: Path | None = None) -> Path:
    """``results`` if the output folder still has it, else its archived copy (which may not exist either)."""
    return results if Path(results).is_file() else archived(results, out, archive)


def results_for(results: Path, name: str, out: Path, archive: Path | None = None) -> Path:
    """Where method ``name`` of a run is read: the output folder's results.json if it lists ``name``, else the
    archived copy if that does (a replicate rerun on another machine may have archived more methods than an
    older output folder holds), else :func:`kept_results`."""
    for path in (Path(results), archived(results, out, archive)):
        listed = listed_methods(path) if path.is_file() else None
        if listed is not None and name in listed:
            return path
    return kept_results(results, out, archive)


def stage1_gate(results: dict) -> dict | None:
    """A results.json's Stage-1 in-sample gate statistics (``provenance.stage1.gate_separation_train``)."""
    return ((results.get("provenance") or {}).get("stage1") or {}).get("gate_separation_train")


def replicate_values(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{metric: {method: {replicate: value}}}`` of every finished replicate run (its report written),
    each method read where ``declared.source`` says: from the output folder, else from the archive
    (:func:`results_for`: whichever copy lists it)."""
    values: dict = {m: {meth: {} for meth in declared.methods} for m in METRICS}
    for r, meth, found, name in _read_runs(out, declared, archive):
        for metric, (_, read, _) in METRICS.items():
            try:
                values[metric][meth][r] = float(read((read_results(found) or {})["methods"][name]["metrics"]))
            except (KeyError, TypeError):
                pass
    return values


def _read_runs(out: Path, declared: Declared, archive: Path | None = None):
    """``(replicate, method, results.json, name in it)`` of every declared run, where the report reads it."""
    for r in declared.replicates:
        for meth in declared.methods:
            results, name = declared.source(out, meth, r)
            yield r, meth, results_for(results, name, out, archive), name


def off_scale_runs(out: Path, declared: Declared, archive: Path | None = None, scale: str = "demo") -> list[str]:
    """The finished runs the report would read that were not made at ``scale`` (lab/experiment.py's
    :func:`~lab.experiment.scale_of` of their provenance), as ``"<replicate> <method> (<file>: <scale>)"``:
    a published report is made of demo-scale runs only, never of a ci-scale run left in the output folder."""
    from lab.experiment import scale_of

    off = []
    for r, meth, found, name in _read_runs(out, declared, archive):
        data = read_results(found) or {}
        if name not in (data.get("methods") or {}):
            continue  # not finished: the stopping rule's business
        seen = scale_of(data.get("provenance", {}).get("config"))
        if seen != scale:
            off.append(f"{r} {meth} ({found}: {seen or 'no known scale'})")
    return off


def gate_values(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{quantity: {replicate: value}}`` of the Stage-1 gate (:data:`lab.evidence_report.GATE_QUANTITIES`, plus
    ``stage1_clean_t<T>`` / ``stage1_perturbed_t<T>`` per timestep band) for every finished replicate whose
    run trained the LoRD (the experiment's 'lord' method); empty when none did."""
    values: dict = {}
    if "lord" not in declared.methods:
        return values
    for r in declared.replicates:
        results, _ = declared.source(out, "lord", r)
        data = read_results(kept_results(results, out, archive))
        if data is None:
            continue
        got = {}
        det = data.get("detection") or {}
        if det.get("available") and det.get("scores_clean") and det.get("scores_protected"):
            got["detect_auroc"] = det["summary"]["auroc"]
            got["detect_clean"] = sum(det["scores_clean"]) / len(det["scores_clean"])
            got["detect_protected"] = sum(det["scores_protected"]) / len(det["scores_protected"])
        sep = stage1_gate(data) or {}
        if "mean_gate_clean" in sep:
            got["stage1_clean"], got["stage1_perturbed"] = sep["mean_gate_clean"], sep["mean_gate_perturbed"]
            for t, band in sorted((sep.get("by_timestep") or {}).items(), key=lambda kv: int(kv[0])):
                got[f"stage1_clean_t{t}"], got[f"stage1_perturbed_t{t}"] = band["mean_gate_clean"], band["mean_gate_perturbed"]
        for k, v in got.items():
            values.setdefault(k, {})[r] = float(v)
    return values


PERTURBATION_QUANTITIES = ("psnr_db", "ssim", "linf_levels", "l2_levels")  # training/report's perturbation mean


def perturbed_methods(declared: Declared) -> tuple:
    """The methods that train on an attack's copies, one per attack setting: a dose-response experiment's arms
    and reference arms, otherwise ``attacking`` (the experiment's own attack) and any alias of the paired
    experiment's ``attacking``."""
    if declared.arms or declared.reference_arms:
        return tuple(a.name for a in declared.arms + declared.reference_arms)
    # an alias of the paired experiment's 'attacking' (e.g. the unaware attacker beside the aware one) too
    aliases = tuple(alias for alias, method in declared.aliases if method == "attacking" and alias in declared.methods)
    return (("attacking",) if "attacking" in declared.methods else ()) + aliases


def perturbation_values(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{method: {quantity: {replicate: value}}}``: the size of each attack setting's perturbation per finished
    replicate -- the mean over the replicate's images of PSNR (dB) and SSIM against the clean image and the L-inf
    and L2 norms in pixel levels (0..255), as the run's report recorded them (``perturbation.mean``)."""
    values: dict = {}
    perturbed = perturbed_methods(declared)
    for r, meth, found, name in _read_runs(out, declared, archive):
        if meth not in perturbed:
            continue
        data = read_results(found) or {}
        mean = (data.get("perturbation") or {}).get("mean") or {}
        if name not in (data.get("methods") or {}):
            continue  # not finished
        for q in PERTURBATION_QUANTITIES:  # an untouched image's PSNR is infinite: left out of the mean
            if isinstance(mean.get(q), (int, float)) and math.isfinite(mean[q]):
                values.setdefault(meth, {}).setdefault(q, {})[r] = float(mean[q])
    return values


def summarise_replicates(values: dict) -> dict:
    """Mean and 95% t interval over replicates of each quantity of ``{quantity: {replicate: value}}`` (the gate's,
    :func:`gate_values`; one attack setting's perturbation, :func:`perturbation_values`)."""
    from lord_ops import analysis as an

    out = {}
    for k, per in values.items():
        if len(per) >= 2:
            mean, _, low, high = an.mean_interval(list(per.values()))
            out[k] = {"n": len(per), "mean": mean, "ci_low": low, "ci_high": high,
                      "per_replicate": {str(r): v for r, v in sorted(per.items())}}
    return out


def equivalence_reading(low: float, high: float, margin: float) -> str:
    """A declared equivalence reading of a 90% interval against +-``margin`` (two one-sided tests at 5%)."""
    return ("equivalent" if -margin < low and high < margin else "below the margin" if high < -margin
            else "above the margin" if low > margin else "not shown equivalent")


def analyse(values: dict, declared: Declared, seed: int = 0) -> dict:
    """Every contrast whose methods were run, per metric: paired summary over the replicates every
    method of the contrast has; the declared family (primary-metric questions and any ``metric:contrast``
    co-primary ones) Holm-adjusted together; LoRD's share of A."""
    from lord_ops import analysis as an

    out = {"experiment": declared.name, "purpose": declared.purpose, "methods": list(declared.methods),
           "primary": PRIMARY, "family": list(declared.family), "metrics": {}}
    summaries = {}  # (metric, contrast) -> its summary, for the family's Holm correction
    arm_contrasts = {a.contrast.name for a in declared.arms}
    for metric, (label, _, lower_better) in METRICS.items():
        per = values.get(metric, {})
        rows = {}
        for c in declared.contrasts:
            if not all(m in declared.methods for m in c.methods):
                continue
            reps, series = an.aligned(*(per.get(m, {}) for m in c.methods))
            if len(reps) < 2:
                continue
            if c.name in arm_contrasts and len(reps) < len(declared.replicates):
                # the declared stopping rule: an arm is analysed only when all its replicates finished
                out.setdefault("unfinished_arms", {})[c.name] = len(reps)
                continue
            d = [sum(w * series[i][j] for i, (_, w) in enumerate(c.weights)) for j in range(len(reps))]
            summary = an.describe(d, seed=seed)
            rows[c.name] = {"question": c.question, "replicates": reps, **summary.to_dict(), "_summary": summary}
        for name, row in rows.items():
            summaries[metric, name] = row.pop("_summary")
        shares = {}  # per defended pair (protected, clean): the share of A that remains under it
        for prot, clean in REMAINING_PAIRS:
            if "A" not in rows or prot not in declared.methods or clean not in declared.methods:
                continue
            reps, (lp, lc, at, cl) = an.aligned(*(per.get(m, {}) for m in (prot, clean, "attacking", "clean")))
            if len(reps) >= 2:
                shares[prot] = an.ratio_of_means([a - b for a, b in zip(lp, lc)], [a - b for a, b in zip(at, cl)],
                                                 seed=seed)
                shares[prot]["definition"] = (f"mean({prot} - {clean}) / mean(A): the share of the attack's effect "
                                              f"that remains under {prot} (1: none removed, 0: all removed)")
        share = shares.get("lord")
        means = {m: an.mean_interval(list(per.get(m, {}).values()))[0] if len(per.get(m, {})) >= 2 else None
                 for m in declared.methods}
        out["metrics"][metric] = {"label": label, "lower_is_better": lower_better, "contrasts": rows,
                                  "method_means": means, "remaining_share_under_lord": share,
                                  "remaining_shares": shares,
                                  "replicates": {m: sorted(per.get(m, {})) for m in declared.methods}}
    asked = [(q, family_question(q)) for q in declared.family]
    family = {q: summaries[key] for q, key in asked if key in summaries}
    out["family_analysed"] = list(family)
    if family:
        an.apply_holm(family)
        for q, (metric, name) in asked:
            if q in family:
                out["metrics"][metric]["contrasts"][name]["p_holm"] = family[q].p_holm
    primary = out["metrics"][PRIMARY]["contrasts"]
    for name, margin in declared.equivalence:  # the declared equivalence readings (two one-sided tests at 5%)
        if name in primary:
            _, _, low, high = an.mean_interval(primary[name]["values"], 0.90)
            reading = equivalence_reading(low, high, margin)
            primary[name]["equivalence"] = {
                "margin": margin, "ci90_low": low, "ci90_high": high, "equivalent": reading == "equivalent",
                "reading": reading,
                "rule": f"equivalent to 0 within +-{margin:g} when the 90% interval lies inside the margin (two "
                        "one-sided tests at 5%)"}
    a = primary.get("A")
    out["threat_gate"] = None if a is None else {
        "d_z": a["d_z"], "rule": "if |d_z(A)| < 0.3 the attack does no measurable damage at this budget",
        "measurable": abs(a["d_z"]) >= 0.3}
    # a dose-response: the same rule per attack setting
    out["threat_gates"] = {c.name: {"d_z": primary[c.name]["d_z"], "measurable": abs(primary[c.name]["d_z"]) >= 0.3}
                           for c in (arm.contrast for arm in declared.arms + declared.reference_arms)
                           if c.name in primary}
    return out


def heldout_per_image(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{method: {replicate: (image names, per-image held-out loss)}}`` of every finished run: the runner's
    ``heldout_loss.per_image`` (each image's loss, mean over its noise draws and timesteps), whose mean is the
    value :func:`replicate_values` reads."""
    per: dict = {}
    for r, meth, found, name in _read_runs(out, declared, archive):
        try:
            loss = (read_results(found) or {})["methods"][name]["metrics"]["heldout_loss"]
            per.setdefault(meth, {})[r] = (tuple(loss["names"]), [float(v) for v in loss["per_image"]])
        except (KeyError, TypeError):
            pass
    return per


def reference_sources(lab: str) -> dict | None:
    """``{reference image name: its source}`` where the lab model's reference images are crops of fewer source
    images (lab 2: ``texture_data/SOURCES.tsv``, 120 crops of 17 wood textures; the 32 held-out ones, the first by
    name, come from 15); None where every reference image is its own (lab 1's bags)."""
    table = LABS[lab].data / "SOURCES.tsv"
    if not table.is_file():
        return None
    rows = [line.split("\t") for line in table.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return {Path(r[0]).stem: r[1] for r in rows if r[0].startswith("reference/")}


def _per_image_contrast(per: dict, contrast) -> tuple[list, tuple, str | None]:
    """``(replicates, image names, None)`` on which ``contrast`` can be taken per held-out image (every method
    scored the same images), or ``([], (), why not)``."""
    missing = [m for m in contrast.methods if m not in per]
    if missing:
        return [], (), f"no per-image held-out loss for {', '.join(missing)}"
    reps = sorted(set.intersection(*(set(per[m]) for m in contrast.methods)))
    names = {per[m][r][0] for m in contrast.methods for r in reps}
    if len(names) > 1:
        return [], (), "its runs scored different held-out images"
    if len(reps) < 4:
        return [], (), f"{len(reps)} replicates with per-image losses (the crossed interval is used from 4)"
    return reps, next(iter(names)), None


def heldout_sensitivity(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """Each declared question on the held-out loss, with the held-out images treated as a sample too
    (:func:`lord_ops.analysis.crossed_interval` over replicates x images): would the answer hold on another set
    of held-out images of the subject? Exploratory, post hoc. Returns ``{"questions": {contrast: {question,
    replicates, images, mean, ci_low, ci_high (as published: images fixed), published_established, crossed,
    by_source}}, "holm_with": {family entry: published p}, "skipped": {contrast: why}, "equivalence": {contrast:
    the declared equivalence reading at 90%, both ways}}``.

    ``by_source`` (where the held-out images are crops of fewer sources, :func:`reference_sources`): each source's
    crops averaged first, the sources the sample -- **equal weight per source**, so its ``mean`` is the mean over
    sources, not the published mean over crops. ``p_holm`` inside ``crossed`` / ``by_source``: Holm over the
    declared family -- these t tests' p, and the published sign-flip p of every other entry (co-primary questions,
    a question that could not be taken per image), listed in ``holm_with``."""
    import numpy as np

    from lord_ops import analysis as an

    per = heldout_per_image(out, declared, archive)
    published = analyse(replicate_values(out, declared, archive), declared)
    primary = published["metrics"][PRIMARY]["contrasts"]
    contrasts = {c.name: c for c in declared.contrasts}
    sources = reference_sources(declared.lab)
    rows, skipped, others = {}, {}, {}

    def differences(c, reps, names):
        return np.array([[sum(w * per[m][r][1][i] for m, w in c.weights) for i in range(len(names))] for r in reps])

    for q in declared.family:
        metric, name = family_question(q)
        row = published["metrics"].get(metric, {}).get("contrasts", {}).get(name)
        if row is None:
            skipped[q] = "not in the published analysis"
            continue
        reps, names, why = ([], (), "not the held-out loss") if metric != PRIMARY else _per_image_contrast(
            per, contrasts[name])
        if why:
            others[q] = row["p"]
            if metric == PRIMARY:
                skipped[name] = why + " (in Holm's family with its published p)"
            continue
        d = differences(contrasts[name], reps, names)
        entry = {"question": contrasts[name].question, "replicates": reps, "images": len(names), "mean": row["mean"],
                 "ci_low": row["ci_low"], "ci_high": row["ci_high"], "published_established": established(row),
                 "crossed": an.crossed_interval(d)}
        if sources and all(n in sources for n in names):
            keys = sorted({sources[n] for n in names})
            grouped = np.stack([d[:, [i for i, n in enumerate(names) if sources[n] == k]].mean(axis=1) for k in keys],
                               axis=1)
            entry["by_source"] = {**an.crossed_interval(grouped), "sources": len(keys)}
        elif sources:
            skipped[f"{name} (by source)"] = "a held-out image missing from the lab's SOURCES.tsv"
        rows[name] = entry
    for key in ("crossed", "by_source"):
        tested = {n: r[key]["p"] for n, r in rows.items() if key in r}
        if tested:
            adjusted = an.holm({**tested, **others})
            for n in tested:
                rows[n][key]["p_holm"] = adjusted[n]
    equivalence = {}
    for name, margin in declared.equivalence:
        reps, names, why = _per_image_contrast(per, contrasts[name])
        fixed = (primary.get(name) or {}).get("equivalence")
        if why or not fixed:
            skipped[f"{name} (equivalence)"] = why or "no equivalence reading in the published analysis"
            continue
        c90 = an.crossed_interval(differences(contrasts[name], reps, names), level=0.90)
        low, high = c90["ci_low"], c90["ci_high"]
        equivalence[name] = {"margin": margin, "ci90_low": fixed["ci90_low"], "ci90_high": fixed["ci90_high"],
                             "reading": fixed["reading"], "crossed_ci90_low": low, "crossed_ci90_high": high,
                             "crossed_reading": equivalence_reading(low, high, margin)}
    return {"questions": rows, "holm_with": others, "skipped": skipped, "equivalence": equivalence}


def sample_grid_png(out: Path, declared: Declared, per_method: int = 8) -> tuple[bytes, int] | None:
    """``(PNG bytes, replicate)``: the first ``per_method`` samples of every method of ``declared`` (one row each,
    labelled) from its first replicate whose runs still have their samples in ``out`` (the archive keeps only
    results.json). When no replicate has them all but one has every method the experiment runs itself (the
    paired experiment's output folder is gone), the grid shows those rows and names the missing ones in its
    title; None when no replicate has even that."""
    import textwrap

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    chosen = None  # (replicate, rows): the first with every method, else the first with the experiment's own
    for replicate in declared.replicates:
        rows = []
        for method in declared.methods:
            results, name = declared.source(out, method, replicate)
            try:
                paths = (read_results(results) or {})["methods"][name]["samples"][:per_method]
                images = [np.asarray(Image.open(Path(results).parent / p).convert("RGB")) for p in paths]
            except (OSError, KeyError, ValueError):
                continue
            if images:
                rows.append((method, np.concatenate(images, axis=1)))
        if len(rows) == len(declared.methods):
            chosen = (replicate, rows)
            break
        if chosen is None and rows and set(declared.own_methods) <= {m for m, _ in rows}:
            chosen = (replicate, rows)
    if chosen is None:
        return None
    replicate, rows = chosen
    missing = [m for m in declared.methods if m not in {m for m, _ in rows}]
    height, width = rows[0][1].shape[:2]
    fig = Figure(figsize=(max(4.0, width / 40 + 1.6), len(rows) * max(0.55, height / 40 + 0.15)))
    FigureCanvasAgg(fig)
    for i, (method, strip) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(method, rotation=0, ha="right", va="center", fontsize=8)
    title = f"{declared.name}: replicate {replicate}, the first {per_method} samples per method"
    if missing:  # the paired experiment's samples are not in this output folder (only its results.json is kept)
        title += "\n" + textwrap.fill(f"(not in this output folder: {', '.join(missing)})",
                                      width=int(fig.get_figwidth() * 13))  # about 13 characters an inch at 9 pt
    return png_bytes(fig, clear_of=fig.suptitle(title, fontsize=9)), replicate
