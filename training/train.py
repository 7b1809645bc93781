"""Train LoRD (Stage 1) or a Stage-2 LoRA from the command line; runs data-parallel under torchrun.

    python -m training.train stage1 --checkpoint CKPT --data DIR --output RUN_DIR [--config FILE] [--set key=value ...]
    python -m training.train stage2 --checkpoint CKPT --data DIR --output RUN_DIR --mode lord --lord LORD.safetensors \
        --instance-prompt "a photo of sks person" [--class-data DIR --class-prompt "a photo of a person"]
    torchrun --nproc_per_node 4 -m training.train stage1 ...      # PyTorch DDP (NCCL on GPUs, gloo on CPU)

``CKPT`` is a ComfyUI checkpoint (read with ComfyUI's own loader). ``DIR`` holds images with
same-name ``.txt`` captions (Stage-2: ``--instance-prompt`` replaces them). Options come from
``lord_ops.train_config.TrainConfig``: defaults, then ``--config`` (JSON or TOML, flat keys), then
``--set key=value`` (JSON values; bare words are strings); ``--help`` lists the keys with their help
text (``lord_ops.train_config.help_table``). ``--batch-size`` is per process.

``RUN_DIR`` receives ``checkpoint.pt`` (weights + optimizer + RNG + step, written atomically every
``checkpoint_every`` steps), ``log.jsonl`` (one JSON object per event/step), ``pgd_cache/`` (Stage-1
perturbations as float32 safetensors, unless ``--cache-dir``; bounded by ``--cache-max-gb``, least
recently used entries of other runs deleted first) and the result (``--save``, default ``RUN_DIR/lord.safetensors``
or ``RUN_DIR/lora.safetensors``; point it into ComfyUI's ``models/lord`` / ``models/loras``). A killed
run started again with the same command resumes from its last checkpoint and ends with the same
weights as an uninterrupted run. Exit status: 0 done, 1 training failed, 2 bad arguments or data.

Stage-1 data presets (``--stage1-data``, config key ``attack_preset``): ``pgd_2`` (the paper's, default),
``pgd_full``, ``ace_fixed``, ``mixed``, ``aspl`` (Anti-DreamBooth's ASPL with its surrogate loop, on sets of images
sharing a caption; ``attack_rounds`` sets its rounds), ``aspl_ace``. ``--heldout DIR``: images not trained on (captions optional: ``--caption``
or the first training caption); after training they are protected with mist-v2's ACE and
Anti-DreamBooth's PGD and the gate's AUROC on them goes into the report and the file's provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lord_ops.datasets import DatasetError, load_caption_folder
from lord_ops.train_config import STAGE2_MODES, TrainConfig, field_help, help_table
from lord_ops.comfy.bootstrap import (ComfyUINotFound, Refused, ensure_comfyui_importable, find_comfyui,
                                     load_checkpoint_models)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_config(stage: str, config_file, overrides: list[str], extra: dict) -> TrainConfig:
    values: dict = {}
    if config_file:
        path = Path(config_file)
        try:
            if path.suffix.lower() == ".toml":
                import tomllib

                values.update(tomllib.loads(path.read_text(encoding="utf-8")))
            else:
                values.update(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise Refused(f"cannot read config file {path}: {e}") from e
        if not isinstance(values, dict) or any(isinstance(v, dict) for v in values.values()):
            raise Refused(f"config file {path} must hold flat key = value pairs (TrainConfig fields)")
    values.update({k: v for k, v in extra.items() if v is not None})
    for item in overrides:
        if "=" not in item:
            raise Refused(f"--set expects key=value, got {item!r}")
        key, _, text = item.partition("=")
        values[key.strip()] = _parse_value(text.strip())
    values["stage"] = stage
    if stage == "stage1":
        values.setdefault("mode", "lord")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise Refused(str(e)) from e


def _sets(key: str) -> str:
    """Help of an option that sets config key ``key`` (its help text is in the key list below)."""
    field_help(key)  # a config key
    return f"sets the config key {key} (see below)"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config keys (--config FILE, --set KEY=VALUE; defaults after '='; stage is the "
                                        "positional argument):\n" + help_table(exclude=("stage",)))
    ap.add_argument("stage", choices=["stage1", "stage2"])
    ap.add_argument("--checkpoint", required=True, help="ComfyUI checkpoint (.safetensors) with UNet, CLIP and VAE")
    ap.add_argument("--data", required=True, help="folder of images with same-name .txt captions")
    ap.add_argument("--output", required=True, help="run folder (checkpoint.pt, log.jsonl, result)")
    ap.add_argument("--config", help="JSON or TOML file of TrainConfig fields (flat keys, listed below)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (keys listed below; JSON values, bare words are strings)")
    ap.add_argument("--save", help="where to write the result (.safetensors)")
    ap.add_argument("--resolution", type=int, help="resize + centre-crop every image to this square size")
    ap.add_argument("--caption", help="use this caption for every image (no .txt files needed)")
    ap.add_argument("--instance-prompt", help="stage2: DreamBooth instance prompt, e.g. 'a photo of sks person'")
    ap.add_argument("--class-data", help="stage2: class images for prior preservation")
    ap.add_argument("--class-prompt", help="stage2: class prompt, e.g. 'a photo of a person'")
    ap.add_argument("--mode", choices=list(STAGE2_MODES), help=_sets("mode"))
    ap.add_argument("--lord", help="stage2 mode lord: the Stage-1 LoRD file (kept frozen and live)")
    ap.add_argument("--lord-gate", choices=("learned", "clean", "defense"), default="learned",
                    help="stage2 mode lord: the LoRD's gate during training: learned (default), clean (0: B' off), "
                         "defense (1: B' always on); sampling sets its own gate in Load LoRD")
    ap.add_argument("--defense-strength", type=float, default=1.0,
                    help="stage2 mode lord: scales the LoRD's defense branch B' alone during training (default 1)")
    ap.add_argument("--cache-dir", help="Stage-1 perturbation cache (default RUN_DIR/pgd_cache)")
    ap.add_argument("--cache-max-gb", type=float, default=4.0,
                    help="stage1: bound of the perturbation cache folder in GiB (least recently used entries of other "
                         "runs are deleted first; default 4; stage2 pgd2_defense uses the default)")
    ap.add_argument("--stage1-data", help=_sets("attack_preset"))
    ap.add_argument("--heldout", help="stage1: folder of held-out images (not trained on) for the held-out gate AUROC")
    ap.add_argument("--heldout-attack-steps", type=int,
                    help="stage1: iterations of each held-out protection (default: the presets': ACE 150, PGD 50)")
    ap.add_argument("--steps", type=int, help=_sets("steps"))
    ap.add_argument("--batch-size", type=int, help=_sets("batch_size"))
    ap.add_argument("--learning-rate", type=float, help=_sets("learning_rate"))
    ap.add_argument("--seed", type=int, help=_sets("seed"))
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, parent custom_nodes, pinned copy)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stdout (log.jsonl is still written)")
    return ap.parse_args(argv)


class JsonLog:
    """``log.jsonl``: one JSON object per line, flushed; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def __call__(self, event: str, **fields) -> None:
        if self.f:
            self.f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def setup_distributed(cpu: bool):
    """Initialise DDP from torchrun's environment; returns (rank, world, local_rank)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(local)  # ComfyUI picks torch.cuda.current_device()
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return torch.distributed.get_rank(), world, local


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        extra = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                 "seed": args.seed, "mode": args.mode, "attack_preset": args.stage1_data}
        config = build_config(args.stage, args.config, args.set, extra)
        ckpt, out = Path(args.checkpoint), Path(args.output)
        if not ckpt.is_file():
            raise Refused(f"checkpoint not found: {ckpt}")
        if config.stage == "stage2" and config.mode == "lord" and not args.lord:
            raise Refused("stage2 mode lord needs --lord LORD.safetensors (or --mode plain / pgd2_defense for the baselines)")
        if (args.lord_gate != "learned" or args.defense_strength != 1.0) and not args.lord:
            raise Refused("--lord-gate / --defense-strength set the live LoRD of stage2 mode lord: give --lord")
        if args.lord and not Path(args.lord).is_file():
            raise Refused(f"LoRD file not found: {args.lord}")
        caption = args.instance_prompt if args.stage == "stage2" and args.instance_prompt else args.caption
        items = load_caption_folder(args.data, args.resolution, caption)
        class_items = []
        if args.class_data:
            if not args.class_prompt:
                raise Refused("--class-data needs --class-prompt (e.g. 'a photo of a person')")
            class_items = load_caption_folder(args.class_data, args.resolution or items[0].image.shape[-1], args.class_prompt)
        heldout_items = []
        if args.heldout:
            if args.stage != "stage1":
                raise Refused("--heldout is a Stage-1 option (held-out gate evaluation)")
            heldout_items = load_caption_folder(args.heldout, args.resolution, args.caption, require_captions=False)
            want = tuple(items[0].image.shape[-2:])
            if {tuple(it.image.shape[-2:]) for it in heldout_items} != {want}:
                raise Refused(f"--heldout {args.heldout}: held-out images must have the training size {want[1]}x{want[0]} "
                              f"px (use --resolution to resize both sets)")
        if args.cache_max_gb is not None and args.cache_max_gb <= 0:
            raise Refused(f"--cache-max-gb must be > 0, got {args.cache_max_gb}")
        find_comfyui(args.comfyui)
    except (Refused, DatasetError, ComfyUINotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ensure_comfyui_importable(args.comfyui, cpu=True if args.cpu else None)
    import torch

    rank, world, _local = setup_distributed(args.cpu)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        torch.distributed.barrier()
    log = JsonLog(out / "log.jsonl", rank == 0)
    show = rank == 0 and not args.quiet
    try:
        return run(args, config, items, class_items, out, log, show, world, heldout_items)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        log("error", message=str(e))
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        print("interrupted: the last checkpoint is kept; run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- one line for the user, the traceback in the log
        import traceback

        log("error", message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"error: training failed: {type(e).__name__}: {e} (the last checkpoint in {out} is kept)", file=sys.stderr)
        return 1
    finally:
        log.close()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, config: TrainConfig, items, class_items, out: Path, log, show: bool, world: int, heldout_items=()) -> int:
    import torch

    from lord_ops import tool_version
    from lord_ops.comfy.data import TrainingData
    from lord_ops.comfy.generate import cached_encoder
    from lord_ops.comfy.heldout import HeldOut
    from lord_ops.comfy.kohya import kohya_metadata
    from lord_ops.comfy.patch import apply_lord, model_family
    from lord_ops.comfy.stages import train_stage1, train_stage2
    from lord_ops.format import load_lord_file, save_kohya_lora, save_lord_file
    from lord_ops.memory import NotEnoughMemory
    from lord_ops.safetensors_file import LoRDFileError

    t0 = time.time()
    model, clip, vae = load_checkpoint_models(Path(args.checkpoint))
    encode = cached_encoder(clip)  # once per caption: a DreamBooth class set repeats one caption hundreds of times
    data = TrainingData([it.image for it in items], [encode(it.caption) for it in items], [it.caption for it in items],
                        [it.image for it in class_items], [encode(it.caption) for it in class_items])
    global_batch = config.batch_size * config.grad_accumulation * world
    log("start", stage=config.stage, tool=f"ComfyUI-LoRD {tool_version()}", config=config.to_dict(), world_size=world,
        global_batch=global_batch, images=len(items), class_images=len(class_items), size_hw=list(data.image_hw),
        checkpoint=str(args.checkpoint), load_s=round(time.time() - t0, 2))
    if show:
        print(f"[{config.stage}] {len(items)} image(s) {data.image_hw[1]}x{data.image_hw[0]}, {config.steps} steps, "
              f"global batch {global_batch} ({world} process(es)) -> {out}")
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "pgd_cache"
    done_items = [0]

    def on_data(index, cached):
        done_items[0] += 1
        log("perturbation", index=index, cached=cached)
        if show and done_items[0] % max(1, len(items) // 10) == 0:
            print(f"[{config.stage}] perturbations {done_items[0]}/{len(items)}")

    def on_step(rec):
        rate = rec.samples / rec.elapsed_s if rec.elapsed_s > 0 else 0.0
        log("step", step=rec.step, steps=rec.steps, loss=rec.loss, **rec.parts, elapsed_s=round(rec.elapsed_s, 3),
            samples_per_s=round(rate, 4))
        if show and (rec.step % max(1, rec.steps // 100) == 0 or rec.step == rec.steps):
            parts = " ".join(f"{k} {v:.4f}" for k, v in rec.parts.items())
            print(f"[{config.stage}] step {rec.step}/{rec.steps} loss {rec.loss:.5f} {parts} ({rate:.2f} samples/s)", flush=True)

    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists():
        log("resume", checkpoint=str(checkpoint_path))
        if show:
            print(f"[{config.stage}] resuming from {checkpoint_path}")
    rank = torch.distributed.get_rank() if world > 1 else 0
    max_cache = int(args.cache_max_gb * 1024 ** 3) if args.cache_max_gb is not None else None
    if config.stage == "stage1":
        heldout = None
        if heldout_items:
            heldout = HeldOut([it.image for it in heldout_items],
                              [encode(it.caption or items[0].caption) for it in heldout_items],
                              attack_steps=args.heldout_attack_steps)
            log("heldout", images=len(heldout_items), attacks=list(heldout.attacks))
        try:
            result = train_stage1(model, vae, data, config, cache_dir, checkpoint_path, on_step=on_step, on_data=on_data,
                                  heldout=heldout, max_cache_bytes=max_cache)
        except NotEnoughMemory as e:  # the memory check: a user-fixable refusal (exit 2)
            raise Refused(str(e)) from e
        save = Path(args.save) if args.save else out / "lord.safetensors"
        if rank == 0:
            save.parent.mkdir(parents=True, exist_ok=True)
            save_lord_file(save, result.lord)
    else:
        if config.mode == "lord":
            try:
                model = apply_lord(model, load_lord_file(args.lord), gate_mode=args.lord_gate,
                                   defense_strength=args.defense_strength)
            except LoRDFileError as e:
                raise Refused(str(e)) from e
        try:
            result = train_stage2(model, vae, data, config, cache_dir, checkpoint_path, on_step=on_step, on_data=on_data)
        except NotEnoughMemory as e:
            raise Refused(str(e)) from e
        save = Path(args.save) if args.save else out / "lora.safetensors"
        if rank == 0:
            save.parent.mkdir(parents=True, exist_ok=True)
            save_kohya_lora(save, result.lora, kohya_metadata(config, model_family(model), result.report))
    report = {k: v for k, v in result.report.items() if k != "provenance"}
    log("done", saved=str(save), seconds=round(time.time() - t0, 2), resumed_from=result.result.resumed_from, **report)
    if rank == 0 and not args.quiet:
        print(f"[{config.stage}] saved {save}; {json.dumps(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
