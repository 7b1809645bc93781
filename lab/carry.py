"""Carry unfinished evidence replicates across machines through the repository.

A lab-2 replicate takes hours on 2 cores, longer than one working session, and an output folder
(``lab.evidence --out``) is scratch: a fresh machine starts without it. ``save`` copies the stages
of each *unfinished* replicate (no ``run/report/results.json`` yet) into ``docs/evidence/carry/``,
mirroring the output folder's layout (``<folder>/rNNN/run/stages/<stage>/...``); ``restore`` copies
them back into an output folder, and ``lab.evidence run`` restores a replicate's stages before it
runs it. Stage keys are content digests (``training.pipeline``), so a restored stage is reused only
where it still matches the config, whatever the output folder's path.

What is kept of a stage:

- a **finished** stage (``stage.json``): its outputs, without the trainer's ``checkpoint.pt`` and the
  perturbation cache ``pgd_cache/`` -- except ``stage1/pgd_cache`` while ``stage1_onebranch`` (which
  trains on the same perturbed copies) is not finished;
- a **started** stage (``key.json`` only): everything, so that it resumes (``checkpoint.pt``, the
  cached copies, the samples written so far);
- never the ``lock`` file nor hidden files (the temp files of writes in progress).

Every file a stage writes is written atomically (``lord_ops.atomic``: a hidden temp file, then a
rename), so ``save`` may run while the workers compute (``lab.evidence carry --every S`` saves
every S seconds): it copies whole files only, and a file that a stage replaces meanwhile is copied
again by the next save.

Files are plain copies (not an archive), so a finished stage saved again is the same git blob and
the repository grows only by what changed. A finished replicate's carry folder is removed by
``save`` (its results are in ``docs/evidence/runs``).
"""
from __future__ import annotations

import filecmp
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

CARRY = Path(__file__).resolve().parent.parent / "docs" / "evidence" / "carry"
NEVER = ("lock",)
UNLESS_STARTED = ("checkpoint.pt", "pgd_cache")


@dataclass
class CarryReport:
    """What one ``save`` or ``restore`` did, stage by stage (paths relative to the output folder)."""
    copied: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (stage, why)
    removed: list = field(default_factory=list)
    bytes: int = 0

    def lines(self) -> list[str]:
        out = [f"copied {s}" for s in self.copied] + [f"removed {s}" for s in self.removed]
        out += [f"skipped {s}: {why}" for s, why in self.skipped]
        out.append(f"{len(self.copied)} stage(s) copied, {len(self.unchanged)} unchanged, "
                   f"{len(self.removed)} removed, {self.bytes / 1e6:.1f} MB in the copied stages")
        return out


def _lock_alive(stage: Path) -> bool:
    """Whether a process on this host that is still running holds ``stage/lock`` (pid@host, as
    ``training.pipeline.Plan`` writes it)."""
    from training.pipeline import Plan, _alive

    pid, _, host = Plan._lock_owner(stage).partition("@")
    return host == socket.gethostname() and pid.isdigit() and _alive(int(pid))


def _finished(stage: Path) -> bool:
    return (stage / "stage.json").is_file()


def kept_files(stage: Path) -> list[Path]:
    """The files of one stage folder that ``save`` keeps (relative paths), see the module docstring."""
    drop = set(NEVER)
    if _finished(stage):
        drop |= set(UNLESS_STARTED)
        if stage.name == "stage1" and not _finished(stage.parent / "stage1_onebranch") \
                and (stage.parent / "stage1_onebranch").exists():
            drop.discard("pgd_cache")  # the one-branch control still trains on these copies
    out = []
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage)
        if path.is_file() and rel.parts[0] not in drop and not path.name.startswith("."):
            out.append(rel)
    return out


def _mirror(source: Path, target: Path, files: list[Path]) -> tuple[bool, int]:
    """Make ``target`` hold exactly ``files`` of ``source``; returns (changed, bytes of the files)."""
    changed, size, copied = False, 0, []
    for rel in files:
        src, dst = source / rel, target / rel
        try:
            size += src.stat().st_size
            if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
                copied.append(rel)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(src, tmp)
        except FileNotFoundError:
            continue  # the running stage removed it since it was listed
        os.replace(tmp, dst)
        copied.append(rel)
        changed = True
    wanted = {target / rel for rel in copied}
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            if path.is_file() and path not in wanted:
                path.unlink()
                changed = True
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return changed, size


def replicate_runs(root: Path, folder: str) -> list[Path]:
    """The replicate folders ``<root>/<folder>/rNNN`` (sorted)."""
    base = Path(root) / folder
    return sorted(p for p in base.glob("r[0-9][0-9][0-9]") if p.is_dir()) if base.is_dir() else []


def save(out: Path, folder: str, carry: Path = CARRY) -> CarryReport:
    """Copy the stages of ``folder``'s unfinished replicates from the output folder ``out`` into ``carry``
    (and drop the carry folders of replicates that have finished)."""
    report = CarryReport()
    for replicate in replicate_runs(out, folder):
        rel = replicate.relative_to(out)
        kept = Path(carry) / rel
        if (replicate / "run" / "report" / "results.json").is_file():
            if kept.exists():
                shutil.rmtree(kept)
                report.removed.append(str(rel))
            continue
        stages = replicate / "run" / "stages"
        if not stages.is_dir():
            continue
        names = []
        for stage in sorted(p for p in stages.iterdir() if p.is_dir() and (p / "key.json").is_file()):
            name = f"{rel}/{stage.name}"
            changed, size = _mirror(stage, kept / "run" / "stages" / stage.name, kept_files(stage))
            (report.copied if changed else report.unchanged).append(name)
            report.bytes += size if changed else 0
            names.append(stage.name)
        carried = kept / "run" / "stages"
        if carried.is_dir():
            for old in sorted(p for p in carried.iterdir() if p.is_dir() and p.name not in names):
                shutil.rmtree(old)  # the output folder no longer has it (its config changed)
                report.removed.append(f"{rel}/{old.name}")
    return report


def restore(out: Path, folder: str, carry: Path = CARRY, replicate: str | None = None) -> CarryReport:
    """Copy carried stages of ``folder`` (of one replicate ``rNNN`` if given) into the output folder ``out``:
    a stage the output folder lacks, or has only started where the carried one is finished. Each stage
    lands whole (copied beside it, then renamed)."""
    report = CarryReport()
    runs = replicate_runs(carry, folder)
    for kept in runs if replicate is None else [r for r in runs if r.name == replicate]:
        rel = kept.relative_to(carry)
        stages = kept / "run" / "stages"
        if not stages.is_dir():
            continue
        for stage in sorted(p for p in stages.iterdir() if p.is_dir()):
            name = f"{rel}/{stage.name}"
            target = Path(out) / rel / "run" / "stages" / stage.name
            if target.exists() and (_finished(target) or not _finished(stage)):
                report.skipped.append((name, "the output folder has it" + ("" if _finished(target) else " (started)")))
                continue
            if target.exists() and _lock_alive(target):
                report.skipped.append((name, "a running process is computing it"))
                continue
            partial = target.with_name(f".{stage.name}.restoring")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(stage, partial)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
            report.copied.append(name)
            report.bytes += sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return report
