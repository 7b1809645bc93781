"""Cost of the trainer nodes' sample previews (``preview_every``) in training steps.

For each stage, one in-process run of ``steps`` optimizer steps with ``preview_every`` = ``every``
(``lord_ops.comfy.stages.train_stage1`` / ``train_stage2`` mode ``plain``, what the nodes run) on the
SD15-geometry test checkpoint (``tools.tiny``, random weights), 2 random images of ``--size`` px,
batch 1, fp32. Each step's end is time-stamped by the run's ``on_step`` (``StepRecord.elapsed_s``);
a preview runs right after its step's record, so it lands in the next step's interval. Reported:
the median step time over the intervals without a preview (the first step, and the first after
each preview, left out), the median preview time (the intervals holding a preview minus that
median step), and their ratio: "each preview costs about K training steps", the number the
``preview_every`` tooltips and help pages quote (``lord_ops.comfy.preview.MEASURED_COST_STEPS``).

    OMP_NUM_THREADS=1 python -m bench.bench_preview --size 32 --size 64
    python -m bench.bench_preview --quick      # CI: 32 px, 9 steps, a preview every 4 (runs, not a measurement)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


def measure(model, vae, data, stage: str, steps: int, every: int, cache: Path) -> tuple[float, float]:
    import torch

    from lord_ops.comfy import stages
    from lord_ops.train_config import TrainConfig

    stamps = []
    kwargs = dict(on_step=lambda rec: stamps.append(rec.elapsed_s), preview_every=every, on_preview=lambda s, i: None)
    with torch.inference_mode():
        if stage == "stage1":
            stages.train_stage1(model, vae, data, TrainConfig(steps=steps, checkpoint_every=10 ** 6), cache,
                                evaluate=False, **kwargs)
        else:
            stages.train_stage2(model, vae, data, TrainConfig(stage="stage2", mode="plain", steps=steps,
                                                              checkpoint_every=10 ** 6), **kwargs)
    took = [b - a for a, b in zip([0.0] + stamps, stamps)]  # took[k] = interval ending at step k + 1
    plain = [took[k] for k in range(1, steps) if k % every and (k - 1) % every]
    step_s = statistics.median(plain)
    preview_s = statistics.median(took[k] - step_s for k in range(every, steps, every))
    return step_s, preview_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, action="append", help="image size in px (repeatable; default 32 and 64)")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="32 px, 9 steps: checks the script runs (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.every = [32], 9, 4

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable()
    import comfy.sd
    import torch

    from lord_ops.comfy.data import TrainingData
    from tools import tiny

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sd15_geometry.safetensors"
        tiny.write_sd15_geometry_checkpoint(path, seed=0)
        with torch.inference_mode():
            model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path))
            caps = ["a photo of sks person, view 0", "a photo of sks person, view 1"]
            conds = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in caps]
        print("| stage | size | ms/step | ms/preview | preview / step |\n|---|---|---:|---:|---:|")
        for size in args.size or [32, 64]:
            g = torch.Generator().manual_seed(0)
            data = TrainingData([torch.round(torch.rand(3, size, size, generator=g) * 255) / 255 for _ in caps],
                                conds, caps)
            for stage in ("stage1", "stage2"):
                step_s, preview_s = measure(model, vae, data, stage, args.steps, args.every, Path(work) / "cache")
                print(f"| {stage} | {size} px | {step_s * 1e3:.0f} | {preview_s * 1e3:.0f} | {preview_s / step_s:.1f} |",
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
