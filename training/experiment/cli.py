"""``python -m training.experiment --config exp.toml [--only PATTERN] [--list] [--report]``.

Exit status: 0 done, 1 a stage failed, 2 bad config or arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from lord_ops.atomic import atomic_write_json
from lord_ops.comfy.bootstrap import ComfyUINotFound, Refused, ensure_comfyui_importable, find_comfyui
from training.experiment_config import ConfigError, load_config
from training.experiment.context import sampling_config
from training.experiment.runner import ExperimentRunner
from training.pipeline import StageFailed
from training.report import write_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Measure the defense end to end (the paper's Table I / Fig. 7 protocol, "
                                             "or artist mode); see docs/experiment.md.")
    ap.add_argument("--config", required=True, help="the experiment's TOML file (see docs/experiment.md)")
    ap.add_argument("--output", help="override [experiment] output")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only the stages matching these glob patterns (and what they need), e.g. 'train/lord-*'; "
                         "comma-separated or repeated. Without --report the report is not written")
    ap.add_argument("--report", action="store_true", help="with --only: also write the report (all stages must be done)")
    ap.add_argument("--list", action="store_true", help="print the stages and their state, then exit")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, parent custom_nodes, pinned copy)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    args = ap.parse_args(argv)

    log = lambda text: print(f"[experiment] {text}", flush=True)  # noqa: E731
    try:
        exp = load_config(args.config, args.output)
        find_comfyui(args.comfyui)
        ensure_comfyui_importable(args.comfyui, cpu=True if args.cpu else None)
        sampling_config(exp)
        runner = ExperimentRunner(exp, log)
        runner.check_inputs(metric_weights=not args.list)
        runner.build()
        patterns = [p for item in args.only for p in item.split(",") if p]
        only = runner.stage_names(patterns) if patterns else None
    except (ConfigError, Refused, ComfyUINotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = runner.plan
    if args.list:
        for name, state in plan.status():
            needs = plan.stages[name].needs
            print(f"{state:8s} {name}" + (f"  (needs {', '.join(needs)})" if needs else ""))
        return 0
    t0 = time.time()
    log(f"{len(plan.stages)} stage(s) -> {exp.output}")
    try:
        plan.run(only)
        if only is None or args.report:
            report_dir = exp.output / "report"
            files = write_report(runner.results(report_dir), report_dir)
            log(f"report: {report_dir / 'index.html'} ({len(files)} file(s))")
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command to continue", file=sys.stderr)
        return 130
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (finished stages are kept; fix it and run the same command)",
              file=sys.stderr)
        return 1
    atomic_write_json(exp.output / "timings.json", {"ran": plan.ran, "seconds": plan.timings,
                                                    "total_s": round(time.time() - t0, 2)})
    total = len(plan.closure(only if only is not None else list(plan.stages)))
    log(f"done in {time.time() - t0:.1f} s ({len(plan.ran)} stage(s) computed, {total - len(plan.ran)} cached)")
    return 0
