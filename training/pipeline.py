"""Cached, resumable, lockable stages for the experiment runner (plain Python, no ComfyUI).

A stage has a name (``train/lord-protected``), the stages it needs, a *key* (a JSON-able dict of
everything that determines its output: its settings, the digests of its inputs and the keys of the
stages it needs) and a function that fills its folder ``<work>/stages/<name>/`` and returns a
JSON-able result.

- A finished stage (``stage.json`` with the same key digest) is never recomputed.
- A stage that was interrupted keeps its folder: its function resumes from what is there (the
  trainer's ``checkpoint.pt``, images already written). ``key.json`` is written before the function
  runs; a folder whose ``key.json`` names another key (the config changed) is emptied first.
- Several processes (separate GPUs, separate machines on a shared disk) can run one plan: a stage
  is claimed with an exclusive ``lock`` file (pid@host); another process needing it waits for its
  ``stage.json``. A lock of a process that no longer runs on this host is taken over.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from lord_ops.atomic import atomic_write_json


def digest(value) -> str:
    """sha256 (16 hex) of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class Stage:
    name: str
    key: dict
    run: Callable[[Path], dict]  # (stage folder) -> result
    needs: tuple = ()
    describe: str = ""

    @property
    def folder_name(self) -> str:
        return self.name.replace("/", "__")


class StageFailed(RuntimeError):
    pass


class Plan:
    """Stages by name, run in dependency order under ``work/stages``."""

    def __init__(self, work: Path, log: Callable[[str], None] = print, poll_s: float = 2.0):
        self.work = Path(work)
        self.stages: dict[str, Stage] = {}
        self.results: dict[str, dict] = {}
        self.log = log
        self.poll_s = poll_s
        self.ran: list[str] = []  # stages computed by this process (the rest were cached)
        self.timings: dict[str, float] = {}

    def add(self, stage: Stage) -> Stage:
        if stage.name in self.stages:
            raise ValueError(f"stage {stage.name} defined twice")
        missing = [n for n in stage.needs if n not in self.stages]
        if missing:
            raise ValueError(f"stage {stage.name} needs undefined stage(s) {missing}")
        stage.key = {**stage.key, "needs": {n: self.full_digest(n) for n in stage.needs}}
        self.stages[stage.name] = stage
        return stage

    def full_digest(self, name: str) -> str:
        return digest(self.stages[name].key)

    def folder(self, name: str) -> Path:
        return self.work / "stages" / self.stages[name].folder_name

    def is_done(self, name: str) -> bool:
        done = read_json(self.folder(name) / "stage.json")
        return bool(done) and done.get("digest") == self.full_digest(name)

    def closure(self, names) -> list[str]:
        """``names`` and everything they need, in a valid run order (definition order)."""
        want, todo = set(), list(names)
        while todo:
            n = todo.pop()
            if n not in self.stages:
                raise KeyError(n)
            if n not in want:
                want.add(n)
                todo.extend(self.stages[n].needs)
        return [n for n in self.stages if n in want]

    def status(self) -> list[tuple[str, str]]:
        out = []
        for name in self.stages:
            state = "done" if self.is_done(name) else ("started" if (self.folder(name) / "key.json").exists() else "todo")
            out.append((name, state))
        return out

    def run(self, names=None, check: Optional[Callable[[], None]] = None) -> dict[str, dict]:
        order = self.closure(names if names is not None else list(self.stages))
        for i, name in enumerate(order, 1):
            if check is not None:
                check()
            self.results[name] = self._run_one(name, f"[{i}/{len(order)}]")
        return self.results

    def result(self, name: str) -> dict:
        if name not in self.results:
            done = read_json(self.folder(name) / "stage.json")
            if not done or done.get("digest") != self.full_digest(name):
                raise StageFailed(f"stage {name} has not been run (run it first)")
            self.results[name] = done["result"]
        return self.results[name]

    # ------------------------------------------------------------------------------------------
    def _run_one(self, name: str, counter: str) -> dict:
        stage, folder = self.stages[name], self.folder(name)
        want = self.full_digest(name)
        while True:
            done = read_json(folder / "stage.json")
            if done and done.get("digest") == want:
                self.log(f"{counter} {name}: cached")
                return done["result"]
            if self._claim(folder):
                break
            self.log(f"{counter} {name}: being computed by {self._lock_owner(folder)}; waiting")
            time.sleep(self.poll_s)
        try:
            done = read_json(folder / "stage.json")  # finished while we waited for the lock
            if done and done.get("digest") == want:
                self.log(f"{counter} {name}: cached")
                return done["result"]
            started = read_json(folder / "key.json")
            if started is not None and started.get("digest") != want:
                self.log(f"{counter} {name}: settings changed since the last run: starting it again")
                for child in folder.iterdir():
                    if child.name != "lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            elif started is not None:
                self.log(f"{counter} {name}: resuming an interrupted run")
            (folder / "stage.json").unlink(missing_ok=True)
            atomic_write_json(folder / "key.json", {"digest": want, "key": stage.key})
            self.log(f"{counter} {name}: running{' -- ' + stage.describe if stage.describe else ''}")
            t0 = time.time()
            result = stage.run(folder)
            self.timings[name] = round(time.time() - t0, 2)
            json.dumps(result)  # must be JSON-able
            # seconds: this run's wall time (a resumed stage counts only its last part); lab.evidence's status
            # estimates what is left from it, nothing reads it as a result
            atomic_write_json(folder / "stage.json", {"digest": want, "name": name, "result": result,
                                                      "seconds": self.timings[name]})
            self.ran.append(name)
            self.log(f"{counter} {name}: done in {self.timings[name]:.1f} s")
            return result
        finally:
            self._release(folder)

    @staticmethod
    def _owner() -> str:
        return f"{os.getpid()}@{socket.gethostname()}"

    def _claim(self, folder: Path) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = self._lock_owner(folder)
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # its process is gone: take the stage over
                return self._claim(folder)
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._owner())
        return True

    @staticmethod
    def _lock_owner(folder: Path) -> str:
        try:
            return (folder / "lock").read_text().strip() or "?"
        except OSError:
            return "?"

    def _release(self, folder: Path) -> None:
        if self._lock_owner(folder) == self._owner():
            (folder / "lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
