"""Replicated, paired experiments on the lab model: does LoRD defend? Runs and reports the experiments
EVIDENCE.md declares (their questions, methods, replicates and seeds: ``lab.declared``).

A *replicate* is one whole run of the lab protocol (``lab/experiment.py``'s config: protect the
subject, Stage 1, Stage 2 per method, sample, score) with **its own subject** (8 bags of the test
split, disjoint across replicates: ``lab.data.replicate_folder``) and **its own seed** (Stage 1,
Stage 2, the attack and the samples: ``lab.declared.replicate_seed``); everything else is equal. Each
replicate is an ordinary ``training.experiment`` run in ``<out>/<experiment>/rNNN/`` (resumable,
stage by stage). Replicates are independent, so several processes share the work
(``--worker k/K`` takes the replicates ``r`` with ``r % K == k``).

Seed ranges (never reuse an exploration replicate to confirm): replicates 0-9 are **exploration**
(the pilot), 10-31 **confirmatory**; replicate ``r`` uses seed ``1000 + r`` and the bags
``lab.data.replicate_bag_indices(r)``.

``python -m lab.evidence run defense --scale demo --worker 0/2``: run (or resume) replicates;
``python -m lab.evidence report defense``: the paired analysis (``lord_ops.analysis``) of every
finished replicate -> ``analysis.json``, ``analysis.md`` and ``forest.png`` in ``<out>/<experiment>/``
(rendered by ``lab.evidence_report``).

Each experiment names its lab model (``Declared.lab``, ``lab.experiment.LABS``): lab model 1 (32 px
Fashion-MNIST, subject "bag") unless it says ``textures`` (lab model 2, 64 px, subject "wood"); ``--parts``
and ``--classifier`` run it on a retrained model instead of the shipped one.

Metrics per method and replicate: the **held-out denoising loss** (primary; 32 bags never trained on,
10 timesteps x 4 seeded noise draws, the same for every method: ``lord_ops.comfy.subject_loss``),
subject accuracy and FD (lab classifier) of the samples (secondary).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from lab import carry
from lab.declared import CONFIRMATORY, EXPERIMENTS, PRIMARY, Arm, Declared, replicate_seed
from lab.evidence_analysis import (ARCHIVE, analyse, archived, gate_values, heldout_sensitivity, kept_results,
                                   listed_methods, off_scale_runs, perturbation_values, replicate_values,
                                   results_for, sample_grid_png, stage1_gate, summarise_replicates)
from lab.evidence_report import dose_curve_png, forest_png, heldout_markdown, markdown, share_curve_png
from lab.experiment import LABS
from training.pipeline import read_json

PUBLISHED = ARCHIVE.parent  # each experiment's final report: docs/evidence/<name>_analysis.md, _forest.png, ...
REPORT_FILES = ("analysis.json", "analysis.md", "forest.png", "share_curve.png", "dose_curve.png", "samples.png")

HELDOUT_IMAGES = {"ci": 8, "demo": 32}  # the first N bags of lab/demo_data/reference
HELDOUT_DRAWS = {"ci": 1, "demo": 4}


def replicate_dir(out: Path, experiment: str, replicate: int) -> Path:
    return Path(out) / experiment / f"r{int(replicate):03d}"


def heldout_folder(out: Path, scale: str, lab: str = "fashion") -> Path:
    """A copy of the first images of the lab model's ``reference/`` (lab 1: ``lab/demo_data/reference``, bags):
    the held-out subject images (never trained on)."""
    folder = Path(out) / (f"heldout_{scale}" if lab == "fashion" else f"heldout_{lab}_{scale}")
    names = sorted((LABS[lab].data / "reference").glob("*.png"))[:HELDOUT_IMAGES[scale]]
    if sorted(p.name for p in folder.glob("*.png")) != [p.name for p in names]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for p in names:
            shutil.copy(p, folder / p.name)
    return folder


def write_replicate_config(out: Path, declared: Declared, replicate: int, scale: str, checkpoint: Path,
                           classifier: Path, arm: Arm | None = None) -> Path:
    """``exp.toml`` of one replicate (of one ``arm`` of a dose-response experiment: the plain LoRA on that
    attack's copies, method ``attacking``, in ``<out>/<experiment>/<arm>/rNNN``)."""
    from lab.experiment import write_config

    lab = LABS[declared.lab]
    subject = lab.replicate_folder(replicate)
    if not subject.is_dir():
        raise SystemExit(f"no subject images for replicate {replicate}: {subject} is missing "
                         f"(python -m {lab.exporter} exports them)")
    folder = run_folder(declared, arm)
    return write_config(replicate_dir(out, folder, replicate), checkpoint, classifier, scale, lab=lab,
                        seed=replicate_seed(replicate), instance=subject,
                        attack=declared.attack if arm is None else arm.attack,
                        methods=folder_methods(folder), heldout=heldout_folder(out, scale, declared.lab),
                        overrides={"heldout_draws": HELDOUT_DRAWS[scale],
                                   **({"stage1_data": declared.stage1_data} if declared.stage1_data else {})})


def run_folder(declared: Declared, arm: Arm | None = None) -> str:
    """The folder (under ``--out``) of ``declared``'s replicate runs, or of one of its arms."""
    return declared.home if arm is None else f"{declared.home}/{arm.name}"


def folder_methods(folder: str) -> tuple:
    """Every method that any declared experiment runs in ``folder``, in declaration order: experiments that
    share a folder (defense and gates; a threat arm and mist) share its stages, and the run's results.json
    lists the methods of its config, so each one's config must name them all -- otherwise running one
    experiment again would drop the other's methods from the results its analysis reads."""
    methods: list = []
    for declared in EXPERIMENTS.values():
        if declared.arms:
            own = ("attacking",) if any(run_folder(declared, a) == folder for a in declared.arms) else ()
        else:
            own = declared.own_methods if declared.home == folder else ()
        methods += [m for m in own if m not in methods]
    return tuple(methods)


def borrow_stages(out: Path, declared: Declared, replicate: int) -> list[str]:
    """Copy ``declared.borrowed_stages`` of ``replicate`` from the ``paired_with`` run into this experiment's
    run (only where this run has no such stage folder yet); returns the names copied. A copied stage is
    reused only if its key matches this run's (``training.pipeline``), else it is recomputed."""
    copied = []
    if not declared.borrowed_stages:
        return copied
    source = replicate_dir(out, EXPERIMENTS[declared.paired_with].home, replicate) / "run" / "stages"
    target = replicate_dir(out, declared.home, replicate) / "run" / "stages"
    for name in declared.borrowed_stages:
        if (source / name / "stage.json").is_file() and not (target / name).exists():
            target.mkdir(parents=True, exist_ok=True)
            partial = target / f".{name}.copying"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source / name, partial, ignore=shutil.ignore_patterns(*carry.NEVER, *carry.UNLESS_STARTED))
            partial.rename(target / name)
            copied.append(name)
    return copied


def missing_pair(declared: Declared, out: Path, replicate: int, archive: Path | None = None) -> Path | None:
    """The results.json a dose-response arm's contrasts read the clean run from, if neither the output folder nor
    the archive has it (else None): the arm still runs, its contrasts wait for that run."""
    paired, _ = declared.source(out, "clean", replicate)
    return None if kept_results(paired, out, archive).is_file() else paired


def archive_results(results: Path, out: Path, archive: Path | None = None) -> Path:
    """Copy one finished replicate's ``results.json`` into the archive (atomically); returns its path."""
    from lord_ops.atomic import atomic_write

    target = archived(results, out, archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = Path(results).read_bytes()
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target


def _numbers(tree, prefix: str = "") -> dict:
    """The numeric leaves of a JSON tree, by their dotted path (lists by index)."""
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return {}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found = {}
    for key, value in items:
        found.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _compared(results: dict) -> dict:
    """What a rerun must reproduce, by name: each method's metrics and training record, the Detect stage's
    scores and the Stage-1 gate statistics (the numbers the report reads)."""
    parts = {m: {part: v.get(part) for part in ("metrics", "train")} for m, v in (results.get("methods") or {}).items()}
    parts["(detection)"] = results.get("detection")
    parts["(stage1 gate)"] = stage1_gate(results)
    return {k: v for k, v in parts.items() if v is not None}


def reproduction(before: dict, after: dict) -> dict[str, dict]:
    """For each method (and the Detect / Stage-1 gate records) two ``results.json`` trees both have:
    ``{"difference": the largest absolute difference over the numbers both have, "keys": how many numbers
    only one of them has}`` (e.g. a class histogram with a class the other lacks). ``difference`` 0.0 and
    ``keys`` 0 everywhere: the rerun reproduced the earlier run exactly."""
    old, new = _compared(before), _compared(after)
    out = {}
    for name in sorted(set(old) & set(new)):
        a, b = _numbers(old[name]), _numbers(new[name])
        shared = set(a) & set(b)
        out[name] = {"difference": max((abs(a[k] - b[k]) for k in shared), default=0.0),
                     "keys": len(set(a) ^ set(b))}
    return out


def check_reproduction(results: Path, out: Path, archive: Path | None = None) -> dict[str, dict] | None:
    """Before a finished replicate's ``results.json`` replaces its archived copy (a replicate rerun because an
    experiment sharing its folder added methods): compare what both have and print whether the rerun
    reproduced it (a free determinism check). ``None`` when nothing was archived before or a file is
    unreadable (said)."""
    target = archived(results, out, archive)
    if not target.is_file():
        return None
    try:
        before = json.loads(target.read_text(encoding="utf-8"))
        after = json.loads(Path(results).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"[evidence] reproduction not checked: {e}", flush=True)
        return None
    differences = reproduction(before, after)
    differ = {m: d for m, d in differences.items() if d["difference"] or d["keys"]}
    if differ:
        print(f"[evidence] NOT reproduced: {target} (archived before) and the rerun differ in {len(differ)} of "
              f"{len(differences)} shared record(s): "
              + ", ".join(f"{m} (largest difference {d['difference']:.3g}"
                          + (f", {d['keys']} number(s) in one only" if d["keys"] else "") + ")"
                          for m, d in differ.items())
              + f"; the earlier file stays in git history (git log -- {target})", flush=True)
    elif differences:
        print(f"[evidence] reproduced: the rerun's {len(differences)} record(s) shared with {target} are "
              f"identical", flush=True)
    return differences


def parse_replicates(text: str | None, default: range) -> list[int]:
    """``"10-17"`` or ``"10,12"`` -> replicate indices (default: the experiment's declared range)."""
    if not text:
        return list(default)
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--replicates {text!r}: {part!r} is not a number or a range like 10-17") from None
        if last < first:
            raise ValueError(f"--replicates {text!r}: the range {part!r} is empty (write it low-high)")
        out += list(range(first, last + 1))
    return out


def parse_worker(text: str | None) -> tuple[int, int]:
    """``"k/K"`` -> ``(k, K)``: this process runs the replicates ``r`` with ``r % K == k``, so workers are
    numbered ``0 .. K-1`` (``0/2`` and ``1/2`` share the work; ``2/2`` would select nothing and is refused)."""
    if not text:
        return 0, 1
    k, sep, workers = text.partition("/")
    try:
        k, workers = int(k), int(workers)
    except ValueError:
        raise ValueError(f"--worker {text!r}: write k/K, e.g. 0/2 and 1/2 for two processes") from None
    if not sep or workers < 1:
        raise ValueError(f"--worker {text!r}: write k/K with K >= 1 processes, e.g. 0/2 and 1/2")
    if not 0 <= k < workers:
        raise ValueError(f"--worker {text!r}: workers are numbered 0 to K-1 (r % K == k), e.g. "
                         f"{' and '.join(f'{i}/{workers}' for i in range(workers))}")
    return k, workers


def label_of(declared: Declared, arm: Arm | None = None) -> str:
    return declared.name + (f" arm {arm.name}" if arm else "")


def methods_missing(results: Path, declared: Declared, arm: Arm | None = None) -> list[str]:
    """The methods ``declared`` runs itself (one arm: ``attacking``) that a replicate's ``results`` lacks: it shares
    its folder with an experiment whose replicate ran before it was declared, so that archived copy does not
    answer it."""
    listed = listed_methods(results)
    own = ("attacking",) if arm is not None else declared.own_methods
    return [] if listed is None else [m for m in own if m not in listed]


def methods_dropped(results: Path, folder: str) -> list[str]:
    """The methods a replicate's existing ``results`` (results.json, in the output folder or the archive) lists
    that this code's config for ``folder`` would not name (:func:`folder_methods`): an experiment declared in a
    newer commit shares the folder, so a run from this (older) code would rewrite the report without them."""
    listed = listed_methods(results) or set()
    runs = set(folder_methods(folder))
    return sorted(m for m in listed if m not in runs)


def prepare_replicate(out: Path, declared: Declared, replicate: int, scale: str, checkpoint: Path, classifier: Path,
                      arm: Arm | None = None, carried: Path | None = None) -> Path:
    """Before a replicate runs: write its ``exp.toml``, restore its stages carried in the repository (demo scale:
    :mod:`lab.carry`, from ``carried`` or the default folder) and borrow its paired run's stages; returns the
    config's path."""
    config = write_replicate_config(out, declared, replicate, scale, checkpoint, classifier, arm)
    if scale == "demo":
        restored = carry.restore(out, run_folder(declared, arm), carried or carry.CARRY, f"r{replicate:03d}")
        if restored.copied:
            print(f"[evidence] {label_of(declared, arm)} replicate {replicate}: {len(restored.copied)} stage(s) "
                  f"restored from {carried or carry.CARRY}", flush=True)
    borrow_stages(out, declared, replicate)
    return config


def run(args) -> int:
    """``run``: each named experiment in turn (a queue: ``run textures_share textures_purify --worker 0/2`` runs
    this worker's share of the first, then of the second); 1 if any replicate of any of them failed."""
    failed = [name for name in args.experiment if run_experiment_replicates(args, name)]
    if failed and len(args.experiment) > 1:
        print(f"[evidence] experiments with failed replicates: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def run_experiment_replicates(args, name: str) -> int:
    """Run (or resume) this worker's replicates of experiment ``name``; 1 if any failed."""
    from lab.ship import ensure_checkpoint
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable
    from training.experiment.cli import main as run_experiment

    declared = EXPERIMENTS[name]
    try:
        replicates = parse_replicates(args.replicates, declared.replicates)
        k, workers = parse_worker(args.worker)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    mine = [r for r in replicates if r % workers == k]
    if not mine:
        print(f"[evidence] {name}: worker {k}/{workers} has none of replicates {replicates}: "
              f"nothing to run", flush=True)
        return 0
    ensure_comfyui_importable(cpu=True if args.cpu else None)
    out = Path(args.out)
    lab = LABS[declared.lab]
    parts = Path(args.parts) if args.parts else lab.parts
    classifier = Path(args.classifier) if args.classifier else lab.classifier
    for path, what in ((parts, "parts"), (classifier, "classifier")):
        if not path.is_file():
            raise SystemExit(f"lab model {lab.name!r}: its {what} file {path} is missing ({lab.retrain} trains it; "
                             f"--{what} takes another)")
    checkpoint = ensure_checkpoint(out / "checkpoint" / lab.checkpoint_name, parts)
    failed = []
    jobs = [(arm, r) for arm in declared.arms for r in mine] if declared.arms else [(None, r) for r in mine]
    for arm, r in jobs:  # a dose-response runs arm by arm, so that whole arms finish first
        t0 = time.time()
        job = r if arm is None else f"{arm.name}/{r}"
        paired = missing_pair(declared, out, r, args.archive) if arm is not None else None
        if paired is not None:
            print(f"[evidence] note: {paired} is missing, in the output folder and in the archive: the arm's "
                  f"contrasts need the '{declared.paired_with}' run of replicate {r} (python -m lab.evidence run "
                  f"{declared.paired_with} --replicates {r})", flush=True)
        results = replicate_dir(out, run_folder(declared, arm), r) / "run" / "report" / "results.json"
        kept = archived(results, out, args.archive)
        if args.scale == "demo" and kept.is_file() and not results.is_file() and not args.rerun_archived:
            missing = methods_missing(kept, declared, arm)
            if not missing:
                print(f"[evidence] {label_of(declared, arm)} replicate {r}: archived in {kept}, skipped "
                      f"(--rerun-archived runs it again)", flush=True)
                continue
            print(f"[evidence] {label_of(declared, arm)} replicate {r}: archived in {kept} without "
                  f"{', '.join(missing)} (an experiment sharing its folder): running it (stages missing from "
                  f"{out} are recomputed)", flush=True)
        dropped = methods_dropped(kept_results(results, out, args.archive), run_folder(declared, arm))
        if dropped:
            print(f"[evidence] {label_of(declared, arm)} replicate {r}: its results.json has method(s) "
                  f"{', '.join(dropped)} that no experiment declared in this code runs in its folder: running it "
                  f"would write a report without them. Run it from a commit that declares them; skipped",
                  file=sys.stderr, flush=True)
            failed.append(job)
            continue
        recomputed = not results.is_file()  # else the run reuses its cached stages: nothing to compare
        config = prepare_replicate(out, declared, r, args.scale, checkpoint, classifier, arm, args.carry)
        label = label_of(declared, arm)
        print(f"[evidence] {label} replicate {r} (seed {replicate_seed(r)}) -> {config.parent}", flush=True)
        code = run_experiment(["--config", str(config)] + (["--cpu"] if args.cpu else [])
                              + (["--only", args.only] if getattr(args, "only", None) else []))
        print(f"[evidence] replicate {r}: exit {code} in {time.time() - t0:.0f} s", flush=True)
        if not code and args.scale == "demo" and results.is_file():
            if recomputed:
                check_reproduction(results, out, args.archive)
            print(f"[evidence] archived: {archive_results(results, out, args.archive)}", flush=True)
        if code:
            failed.append(job)
    if failed:
        print(f"[evidence] {name}: replicates {failed} failed (finished stages are kept; run the same command)",
              file=sys.stderr, flush=True)
    return 1 if failed else 0


def missing_values(out: Path, declared: Declared, replicate: int, arm: Arm | None = None,
                   archive: Path | None = None) -> list[str]:
    """The methods whose value for ``replicate`` (of one arm: the arm and the paired ``clean``) the report would
    not find: its own runs and those read from ``paired_with`` or through aliases (:meth:`Declared.source`),
    each in the output folder or the archive. Reads only the method lists; an unreadable file lists none."""
    missing = []
    for method in ([arm.name, "clean"] if arm is not None else declared.methods):
        path, name = declared.source(out, method, replicate)
        listed = listed_methods(results_for(path, name, out, archive))
        if listed is None or name not in listed:
            missing.append(method)
    return missing


def replicate_state(out: Path, declared: Declared, replicate: int, arm: Arm | None = None,
                    archive: Path | None = None, carried: Path | None = None) -> tuple[str, int, bool, list]:
    """Where one replicate (of one arm) stands, without reading any result: ``(state, finished stages, running,
    missing methods)``. "finished": every value its report reads is there (:func:`missing_values`);
    "waiting": its own runs finished (its results.json lists them) but a paired experiment's are missing;
    "started": finished stages in the output folder or the carry (whichever has more), ``running`` when a live
    process holds one of its stage locks; else "not started"."""
    folder = run_folder(declared, arm)
    missing = missing_values(out, declared, replicate, arm, archive)
    if not missing:
        return "finished", 0, False, []
    results = replicate_dir(out, folder, replicate) / "run" / "report" / "results.json"
    own = ("attacking",) if arm is not None else declared.own_methods
    if all(m in (listed_methods(results_for(results, m, out, archive)) or ()) for m in own):
        return "waiting", 0, False, missing
    counts, running = [], False
    for root in (out, carried or carry.CARRY):
        stages = replicate_dir(root, folder, replicate) / "run" / "stages"
        found = sorted(p for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []
        counts.append(sum(carry._finished(p) for p in found))
        running = running or (root == out and any(carry._lock_alive(p) for p in found if (p / "lock").exists()))
    return ("started" if max(counts) or running else "not started"), max(counts), running, missing


def _stage_name(stage: Path, done: dict | None) -> str:
    """A stage folder's stage name: its stage.json's ``name``, else the folder name read back
    (``training.pipeline.Stage`` writes ``a/b`` as ``a__b``)."""
    return (done or {}).get("name") or stage.name.replace("__", "/")


def stage_times(out: Path, folder: str) -> dict[str, list[float]]:
    """``{stage name: [seconds, ...]}`` over the replicates of ``<out>/<folder>``: every stage finished or started
    in one of them (an empty list when none was timed); the times are each finished stage's ``stage.json``
    ``seconds`` (training.pipeline writes it), else that replicate's ``timings.json`` (the last invocation's
    stages). A resumed stage counts only its last part."""
    times: dict[str, list[float]] = {}
    for run in sorted((Path(out) / folder).glob("r[0-9][0-9][0-9]/run")):
        last = (read_json(run / "timings.json") or {}).get("seconds") or {}
        for stage in sorted(p for p in run.glob("stages/*") if p.is_dir()):
            done = read_json(stage / "stage.json") or {}
            name = _stage_name(stage, done)
            times.setdefault(name, [])  # a stage never timed (or only started) still counts as one to run
            seconds = done.get("seconds", last.get(name)) if done else None
            if isinstance(seconds, (int, float)):
                times[name].append(float(seconds))
    return times


def _done_stages(root: Path, folder: str, replicate: int) -> set[str]:
    stages = replicate_dir(root, folder, replicate) / "run" / "stages"
    return {_stage_name(p.parent, read_json(p)) for p in stages.glob("*/stage.json")} if stages.is_dir() else set()


def time_left(out: Path, folder: str, replicate: int, times: dict[str, list[float]], plan: set[str],
              carried: Path | None = None) -> tuple[float, int]:
    """``(seconds, unmeasured)``: the median stage times (:func:`stage_times`) of the stages of ``plan`` that
    replicate ``replicate`` of ``folder`` has finished neither in ``out`` nor in the carry, and how many of those
    have no measured time. A stage in progress counts whole."""
    done = _done_stages(out, folder, replicate) | _done_stages(carried or carry.CARRY, folder, replicate)
    left = [n for n in plan if n not in done]
    measured = [statistics.median(times[n]) for n in left if times.get(n)]
    return sum(measured), len(left) - len(measured)


def replicate_states(out: Path, declared: Declared, archive: Path | None = None,
                     carried: Path | None = None) -> list[tuple]:
    """``[(arm or None, replicate, replicate_state(...))]`` over every declared replicate of every arm."""
    return [(arm, r, replicate_state(out, declared, r, arm, archive, carried))
            for arm in declared.arms or (None,) for r in declared.replicates]


def status_lines(declared: Declared, states: list[tuple], estimates: dict | None = None) -> list[str]:
    """One line per experiment (per arm for a dose-response) from :func:`replicate_states`: finished, waiting
    (for a paired experiment's runs), started (finished stages; running) and not-started replicates; with
    ``estimates`` (``{(arm name or None, replicate): (seconds, unmeasured stages, lower bound)}``: :func:`time_left`,
    and whether no replicate of the folder has finished, so stages none has reached are missing) the stage time
    left in all. Arms of a dose-response that no replicate has reached share one line."""
    lines, estimates, untouched = [], estimates or {}, []
    for arm in declared.arms or (None,):
        by_state: dict = {"finished": [], "waiting": [], "started": [], "not started": []}
        total, unmeasured, lower = 0.0, 0, False
        for (state, stages, running, missing), r in ((st, r) for a, r, st in states if a is arm):
            label = {"started": f"{r} ({stages} stages done{', running' if running else ''})",
                     "waiting": f"{r} (needs {', '.join(missing)})"}.get(state, str(r))
            by_state[state].append(label)
            if state in ("started", "not started") and (arm and arm.name, r) in estimates:
                seconds, unknown, bound = estimates[arm and arm.name, r]
                total, unmeasured, lower = total + seconds, unmeasured + unknown, lower or bound
        if arm is not None and not (by_state["finished"] or by_state["waiting"] or by_state["started"]
                                    or total or unmeasured):
            untouched.append(arm.name)
            continue
        parts = [f"{len(v)} {k}" + (f": {', '.join(v)}" if v else "") for k, v in by_state.items()
                 if v or k != "waiting"]
        line = (f"{label_of(declared, arm)} (replicates {declared.replicates.start}-"
                f"{declared.replicates.stop - 1}): " + "; ".join(parts))
        if unmeasured and not total:  # nothing timed in this folder yet (e.g. its only finished replicate is archived)
            line += "; stage time left not known yet: none of the stages left has a recorded time in this folder"
        elif total:
            line += (f"; {'at least' if lower else 'about'} {total / 3600:.1f} hours of one worker's stage time left "
                     f"(median stage times of this folder's replicates, at the load they ran under"
                     + (f"; {unmeasured} stage run(s) never timed, not counted" if unmeasured else "")
                     + ("; no replicate in this folder has finished, so stages none has reached are not counted"
                        if lower else "")
                     + ")")
        lines.append(line)
    if untouched:
        lines.append(f"{declared.name}: {len(untouched)} arm(s) not started (replicates {declared.replicates.start}-"
                     f"{declared.replicates.stop - 1} each): {', '.join(untouched)}")
    return lines


def status(args) -> int:
    for name in args.experiment:
        declared = EXPERIMENTS[name]
        states = replicate_states(Path(args.out), declared, args.archive, args.carry)
        estimates = {}
        for arm in declared.arms or (None,):
            folder = run_folder(declared, arm)
            times = stage_times(Path(args.out), folder)
            lower = not any((Path(args.out) / folder).glob("r[0-9][0-9][0-9]/run/report/results.json"))
            for a, r, (state, *_rest) in states:
                if a is arm and state in ("started", "not started") and times:
                    estimates[arm and arm.name, r] = (*time_left(Path(args.out), folder, r, times, set(times),
                                                                 args.carry), lower)
        for line in status_lines(declared, states, estimates):
            print(line, flush=True)
        published = PUBLISHED / f"{name}_analysis.md"
        if published.is_file():
            early = not any(state[0] == "finished" for _, _, state in states)  # reported before the archive
            print(f"  reported: {published.relative_to(PUBLISHED.parent.parent)}" + (
                " (its replicates ran before finished results were archived: their values are in that report's "
                ".json)" if early else ""), flush=True)
    return 0


def unfinished(out: Path, declared: Declared, archive: Path | None = None, carried: Path | None = None) -> list[str]:
    """The declared replicates (``r`` or ``arm/r``) that have not finished (:func:`replicate_states`)."""
    return [str(r) if arm is None else f"{arm.name}/{r}"
            for arm, r, state in replicate_states(out, declared, archive, carried) if state[0] != "finished"]


def figures(result: dict) -> dict[str, bytes]:
    """The report's figures drawn from an analysis alone (PNG bytes by file name): the forest plot, the share
    curve (the paper's Fig. 7) and a dose-response experiment's budget curve, each where the result has it."""
    files = {}
    if result["metrics"][PRIMARY]["contrasts"]:
        files["forest.png"] = forest_png(result)
    curve = share_curve_png(result)
    if curve is not None:
        files["share_curve.png"] = curve
    dose = dose_curve_png(result)
    if dose is not None:  # a dose-response experiment: each attack's A against its budget
        files["dose_curve.png"] = dose
    return files


def in_declared_order(result: dict, declared: Declared) -> dict:
    """``result`` read back from an analysis.json (written with sorted keys) with each metric's contrasts in the
    order :func:`analyse` gives them (the declared contrasts' order), so the figures draw their rows as
    ``report`` did."""
    order = {c.name: i for i, c in enumerate(declared.contrasts)}
    metrics = {m: {**block, "contrasts": dict(sorted(block["contrasts"].items(),
                                                     key=lambda kv: (order.get(kv[0], len(order)), kv[0])))}
               for m, block in result["metrics"].items()}
    return {**result, "metrics": metrics}


def redraw(args) -> int:
    """``redraw``: the figures of each named experiment's published report, drawn again from its published
    ``<name>_analysis.json`` alone (no run is read; for reports whose runs predate the archive, and figures added
    since); writes the figures the analysis yields, leaves the analysis and the sample grid as they are."""
    from lord_ops.atomic import atomic_write

    for name in args.experiment:
        source = PUBLISHED / f"{name}_analysis.json"
        if not source.is_file():
            raise SystemExit(f"redraw {name}: no published analysis {source}; publish one first (python -m "
                             f"lab.evidence report {name} --publish once all its replicates have finished)")
        result = in_declared_order(json.loads(source.read_text(encoding="utf-8")), EXPERIMENTS[name])
        for file, data in figures(result).items():
            target = PUBLISHED / f"{name}_{file}"
            atomic_write(target, lambda tmp, data=data: Path(tmp).write_bytes(data))
            print(f"[evidence] drew {target}", file=sys.stderr, flush=True)
    return 0


def report(args) -> int:
    from lord_ops.atomic import atomic_write

    declared = EXPERIMENTS[args.experiment]
    left = unfinished(Path(args.out), declared, args.archive, args.carry)
    confirmatory = set(declared.replicates) <= set(CONFIRMATORY)
    # "per_arm" / "per_question" rules analyse what finished and say so; "all" waits for every replicate
    early = bool(left) and declared.stopping == "all"
    if early and confirmatory and not args.interim:
        raise SystemExit(f"report {declared.name}: {len(left)} declared replicate(s) have not finished "
                         f"({', '.join(left)}); EVIDENCE.md's stopping rule is one report when all have finished, "
                         f"so nothing is analysed "
                         f"(python -m lab.evidence status {declared.name} says where each stands; --interim analyses "
                         f"the finished ones and labels the report INTERIM)")
    if early and args.publish:
        raise SystemExit(f"report {declared.name} --publish: {len(left)} replicate(s) unfinished ({', '.join(left)}); "
                         f"only a complete report is published into {PUBLISHED}")
    if args.publish:
        off = off_scale_runs(Path(args.out), declared, args.archive)
        if off:
            raise SystemExit(f"report {declared.name} --publish: {len(off)} run(s) were not made at demo scale, "
                             f"the scale EVIDENCE.md declares: {'; '.join(off[:5])}{' ...' if len(off) > 5 else ''}; "
                             f"rerun them with --scale demo (or report without --publish)")
    values = replicate_values(Path(args.out), declared, args.archive)
    result = analyse(values, declared)
    if early:
        result["interim"] = {"unfinished": left, "note": "not every declared replicate has finished" + (
            ": an interim look, not the declared report" if confirmatory else " (an exploration)")}
    elif left:  # the declared rule analyses what finished (stated with the result)
        result["unfinished"] = {"replicates": left, "stopping": declared.stopping}
    result["values"] = values
    result["gates"] = summarise_replicates(gate_values(Path(args.out), declared, args.archive))
    result["perturbations"] = {m: summary for m, v in perturbation_values(Path(args.out), declared, args.archive).items()
                               if (summary := summarise_replicates(v))}  # a setting with one replicate: no row
    folder = Path(args.out) / declared.home / (declared.name if declared.home != declared.name else "")
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    files = {"analysis.json": (json.dumps(result, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"),
             "analysis.md": text.encode("utf-8")}
    files.update(figures(result))
    grid = sample_grid_png(Path(args.out), declared)
    if grid is not None:  # where a reader sees the painted target (or its absence) per method
        files["samples.png"] = grid[0]
    for name, data in files.items():
        atomic_write(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    if args.publish:  # the committed copy EVIDENCE.md and RESULTS.md link: docs/evidence/<name>_<file>
        for name in REPORT_FILES:  # exactly this call's files: an earlier report's extra file goes
            target = PUBLISHED / f"{declared.name}_{name}"
            if name in files:
                atomic_write(target, lambda tmp, data=files[name]: Path(tmp).write_bytes(data))
                print(f"[evidence] published {target}", file=sys.stderr, flush=True)
            elif target.is_file():
                target.unlink()
                print(f"[evidence] removed {target} (this report has no {name})", file=sys.stderr, flush=True)
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Replicated paired experiments on the lab model (EVIDENCE.md).")
    ap.add_argument("command", choices=("run", "report", "redraw", "heldout", "carry", "restore", "status"),
                    help="run or resume replicates; report: the analysis; redraw: a published report's figures "
                         "drawn again from its published analysis.json alone; heldout: the declared held-out-loss "
                         "questions with the held-out images treated as a sample too (exploratory; --publish writes "
                         "docs/evidence/heldout_sensitivity.md); carry: copy the unfinished replicates' stages "
                         "into the repository (lab/carry.py; safe beside running workers); restore: copy them back into --out "
                         "(run does it per replicate); status: which replicates are finished, started (stages done, "
                         "running) or not started, reading no result")
    ap.add_argument("experiment", nargs="+", choices=sorted(EXPERIMENTS),
                    help="the declared experiment (report takes one; run takes several and runs them one after "
                         "the other; redraw, heldout, carry, restore and status take several)")
    ap.add_argument("--out", default="evidence_output", help="output folder (one subfolder per experiment)")
    ap.add_argument("--scale", default="demo", choices=sorted(HELDOUT_IMAGES),
                    help="lab/experiment.py's scale of every replicate (ci: the structure in minutes)")
    ap.add_argument("--replicates", help="which replicates, e.g. 10-17 (default: the experiment's declared ones)")
    ap.add_argument("--worker", help="k/K: run the replicates r with r %% K == k, k from 0 to K-1 (0/2 and 1/2: two processes "
                         "share the work)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    ap.add_argument("--archive", type=Path, default=None,
                    help=f"where finished demo-scale replicates' results.json are kept and read back (default "
                         f"{ARCHIVE.relative_to(ARCHIVE.parent.parent.parent)}: in the repository)")
    ap.add_argument("--parts", help="the lab model's parts file (default: the shipped one of the experiment's lab model)")
    ap.add_argument("--classifier", help="its lab classifier (default: the shipped one)")
    ap.add_argument("--rerun-archived", action="store_true",
                    help="run archived replicates again (default: an archived replicate missing from --out is skipped)")
    ap.add_argument("--only", metavar="PATTERN",
                    help="run only these stages of each replicate and what they need (the runner's --only, e.g. "
                         "'detect'); no report is written, so nothing is archived: for explorations")
    ap.add_argument("--carry", type=Path, default=None,
                    help="where carry keeps unfinished replicates' stages and restore/run read them (default "
                         "docs/evidence/carry: in the repository)")
    ap.add_argument("--interim", action="store_true",
                    help="report: analyse a confirmatory experiment before all its replicates have finished (labelled "
                         "INTERIM; EVIDENCE.md's stopping rules forbid reading it as the result)")
    ap.add_argument("--publish", action="store_true",
                    help=f"report: also copy the report's files into "
                         f"{PUBLISHED.relative_to(PUBLISHED.parent.parent)}/ as <experiment>_analysis.md etc. (the "
                         f"copies EVIDENCE.md links; only a complete report)")
    ap.add_argument("--every", type=float, default=None, metavar="S",
                    help="carry: save again every S seconds until interrupted (beside running workers)")
    args = ap.parse_args(argv)
    if args.command == "report":
        if len(args.experiment) > 1:
            ap.error(f"report takes one experiment (got {' '.join(args.experiment)}); report each in turn")
        args.experiment = args.experiment[0]
    if args.command == "run" and len(args.experiment) > 1 and args.replicates:
        ap.error(f"run {' '.join(args.experiment)}: --replicates names one experiment's replicates; give it with one "
                 f"experiment, or use --worker k/K to share several experiments between processes")
    return {"run": run, "report": report, "redraw": redraw, "heldout": heldout, "carry": carry_stages,
            "restore": carry_stages, "status": status}[args.command](args)


def heldout(args) -> int:
    """``heldout``: :func:`heldout_sensitivity` of each experiment given. An experiment whose declared replicates
    have not all finished (or, with ``--publish``, that has runs at another scale than demo) is named and not
    analysed, and ``--publish`` then refuses: it writes ``heldout_sensitivity.md`` / ``.json`` into docs/evidence/
    only when every experiment given was analysed, from demo-scale runs."""
    from lord_ops.atomic import atomic_write

    results, skipped = {}, {}
    for name in args.experiment:
        declared = EXPERIMENTS[name]
        states = replicate_states(Path(args.out), declared, args.archive, args.carry)
        left = [s for s in states if s[2][0] != "finished"]
        if not declared.family:
            skipped[name] = "it declares no questions"
        elif left:
            skipped[name] = ("none of its runs is in the output folder or the archive"
                             if all(s[2][0] == "not started" for s in states)
                             else f"{len(left)} of its {len(states)} declared replicate runs have not finished")
        elif args.publish and off_scale_runs(Path(args.out), declared, args.archive):
            skipped[name] = "some of its runs were not made at demo scale (only demo-scale runs are published)"
        else:
            result = heldout_sensitivity(Path(args.out), declared, args.archive)
            if result["questions"]:
                results[name] = result
            else:
                skipped[name] = "; ".join(f"{q}: {why}" for q, why in result["skipped"].items()) or "no questions"
    text = heldout_markdown(results, skipped)
    print(text)
    if args.publish:
        if skipped or not results:
            raise SystemExit(f"heldout --publish: not analysed: {'; '.join(f'{n} ({w})' for n, w in skipped.items())}"
                             f"; nothing published (give only experiments that have finished, at demo scale)")
        data = (json.dumps(results, indent=2, sort_keys=True) + "\n").encode("utf-8")
        for target, payload in ((PUBLISHED / "heldout_sensitivity.json", data),
                                (PUBLISHED / "heldout_sensitivity.md", text.encode("utf-8"))):
            atomic_write(target, lambda tmp, payload=payload: Path(tmp).write_bytes(payload))
            print(f"[evidence] published {target}", file=sys.stderr, flush=True)
    return 0


def carry_stages(args) -> int:
    """``carry`` / ``restore``: :mod:`lab.carry` over every folder of the experiments (their arms' too; a folder
    two experiments share, once)."""
    action = carry.save if args.command == "carry" else carry.restore
    folders = []
    for name in args.experiment:
        declared = EXPERIMENTS[name]
        folders += [f for f in (run_folder(declared, arm) for arm in declared.arms or (None,)) if f not in folders]
    every = args.every if args.command == "carry" else None
    while True:
        for folder in folders:
            done = action(Path(args.out), folder, args.carry or carry.CARRY)
            if every is None or done.copied or done.removed:
                stamp = time.strftime("%H:%M:%S ") if every else ""
                for line in done.lines():
                    print(f"[evidence] {stamp}{args.command} {folder}: {line}", flush=True)
        if every is None:
            return 0
        time.sleep(every)


if __name__ == "__main__":
    sys.exit(main())
