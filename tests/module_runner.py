"""Run several ``python -m MODULE ARGS`` commands one after another in ONE fresh process.

A test that drives a chain of command-line entry points (train, ship, train again) pays Python's,
torch's and torch._dynamo's import (5-10 s on a CI core) once instead of once per command, and still
runs them outside the test process (their environment variables, e.g. ``LAB_UFOAI_PK3``, are read at
import). Each command runs as ``runpy.run_module(MODULE, run_name="__main__")`` with ``sys.argv`` set,
its stdout and stderr captured; a ``SystemExit`` gives the return code (its message goes to stderr,
as Python prints it), any other exception returncode 1 and its traceback. The commands run in order;
the chain goes on after a failing one, so that a test can check an expected refusal.

    results = run_modules([["lab.train_vae", "--steps", "2"], ...], env=env, cwd=root)
    results[i].returncode, results[i].stdout, results[i].stderr
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    args: list
    returncode: int
    stdout: str
    stderr: str


def run_modules(commands: list[list], env: dict | None = None, cwd=None, timeout: float = 1800) -> list[Result]:
    """Run ``commands`` (each ``[module, *args]``) in one child process; one :class:`Result` each."""
    commands = [[str(a) for a in c] for c in commands]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(commands), cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"module runner failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [Result(c, **r) for c, r in zip(commands, json.loads(proc.stdout.splitlines()[-1]))]


def _run_one(module: str, args: list) -> dict:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [module, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # SystemExit("message"): Python prints the message and exits with 1
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:  # noqa: BLE001 - reported like an uncaught exception in its own process
            traceback.print_exc()
            code = 1
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> int:
    commands = json.loads(sys.stdin.read())
    sys.path.insert(0, os.getcwd())
    results = [_run_one(c[0], c[1:]) for c in commands]
    sys.stdout.flush()
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
