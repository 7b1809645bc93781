"""The experiment runner's configuration (``exp.toml``): schema, defaults and validation.

Everything is checked before any work starts; a problem raises :class:`ConfigError` naming the
field as ``[section] key``. Relative paths are relative to the config file's folder. No ComfyUI
import here (sampler names are checked by the runner once ComfyUI is importable).

Units: ``attack`` budgets are the presets' (pixel levels 0..255); ``purification.diffpure_strength``
is the img2img denoise (0..1 = share of the noise schedule); ``sweep.shares`` are shares of the
instance images that are protected (0..1).
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Optional

from lord_ops.diffusion import HELDOUT_TIMESTEPS

MODES = ("protocol", "artist")
# method id -> (label, Stage-2 mode, training images); the rows of Table I, in this order
METHODS = {
    "clean": ("Clean", "plain", "clean"),
    "attacking": ("Attacking", "plain", "protected"),
    "pgd2_defense": ("PGD-2 defense", "pgd2_defense", "protected"),
    "jpeg": ("JPEG", "plain", "jpeg"),
    "diffpure": ("DiffPure-style", "plain", "diffpure"),
    "noise": ("Gaussian noise", "plain", "noise"),
    # a purifier's cost when nothing was attacked: the clean images purified (same settings and seeds), plain LoRA
    "jpeg_clean": ("JPEG, clean images", "plain", "jpeg_clean"),
    "diffpure_clean": ("DiffPure-style, clean images", "plain", "diffpure_clean"),
    "noise_clean": ("Gaussian noise, clean images", "plain", "noise_clean"),
    "lord": ("LoRD", "lord", "protected"),
    "lord_clean": ("LoRD, clean images", "lord", "clean"),
    "onebranch": ("One-branch control", "onebranch", "protected"),
    "onebranch_clean": ("One-branch control, clean images", "onebranch", "clean"),
}
# the oracle gate factorial: lord_g<t><s> = gate t during Stage-2 training, s at sampling (l learned, 0, 1)
_GATE_WORDS = {"l": "learned", "0": "0", "1": "1"}
for _t in "l01":
    for _s in "l01":
        if _t + _s != "ll":
            METHODS[f"lord_g{_t}{_s}"] = (f"LoRD, gate {_GATE_WORDS[_t]} in training / {_GATE_WORDS[_s]} at sampling",
                                          f"lord_g{_t}{_s}", "protected")
            METHODS[f"lord_clean_g{_t}{_s}"] = (f"LoRD, clean images, gate {_GATE_WORDS[_t]} in training / "
                                                f"{_GATE_WORDS[_s]} at sampling", f"lord_g{_t}{_s}", "clean")
# the B'-strength sweep: lord_b<k> = the learned LoRD with B' scaled by k at sampling and in the held-out loss
# (Stage-2 training as ``lord``, shared); k = 0 is lord_gl0 (gate forced to 0 at sampling)
DEFENSE_STRENGTH_CODES = {"05": 0.5, "2": 2.0}
for _k, _v in DEFENSE_STRENGTH_CODES.items():
    METHODS[f"lord_b{_k}"] = (f"LoRD, B' x{_v:g} at sampling", f"lord_b{_k}", "protected")
    METHODS[f"lord_clean_b{_k}"] = (f"LoRD, clean images, B' x{_v:g} at sampling", f"lord_b{_k}", "clean")
# the paper's Fig. 7 as methods (paired analysis): plain_mix<k> / lord_mix<k> = a plain LoRA / LoRD run on the
# instance images with k of them protected (a seeded, nested choice: the k of mix<k> are among those of mix<k+1>)
# lord_gl0_mix<k>: lord_mix<k>'s Stage-2 LoRA (shared) sampled with the gate forced to 0, B' off
for _k in range(1, 8):
    METHODS[f"plain_mix{_k}"] = (f"Plain LoRA, {_k} image(s) protected", "plain", f"mix{_k}")
    METHODS[f"lord_mix{_k}"] = (f"LoRD, {_k} image(s) protected", "lord", f"mix{_k}")
    METHODS[f"lord_gl0_mix{_k}"] = (f"LoRD, {_k} image(s) protected, B' off at sampling", "lord_gl0", f"mix{_k}")
DEFAULT_METHODS = ("clean", "attacking", "pgd2_defense", "jpeg", "diffpure", "lord")
ARTIST_METHODS = ("clean", "attacking", "jpeg", "diffpure", "lord")
SWEEP_SERIES = {"plain": "LoRA (plain)", "lord": "LoRD"}
PAPER_DATASETS = ("CelebA-HQ", "VGGFace2", "Landscape")
# Stage-2 defaults: the paper follows mist-v2's DreamBooth-LoRA (rank 4, lr 1e-4)
STAGE2_DEFAULTS = {"steps": 1000, "learning_rate": 1e-4, "rank": 4, "batch_size": 1, "targets": "attn"}
STAGE1_DEFAULTS = {"steps": 1000, "learning_rate": 1e-4, "rank": 4, "batch_size": 1, "targets": "attn"}


class ConfigError(ValueError):
    """A config problem: names the file, the field and the fix."""


@dataclasses.dataclass
class Sampling:
    images: int = 100  # generated per method (the paper: 100)
    steps: int = 30
    cfg: float = 7.5
    sampler: str = "euler"
    scheduler: str = "normal"
    batch_size: int = 4
    negative: str = ""
    seed: int = 0  # image i of every method uses seed + i


@dataclasses.dataclass
class Metrics:
    clip_iqa_model: str = "RN50-quickgelu"  # open_clip model name (OpenAI RN50 weights need QuickGELU)
    clip_iqa_weights: Optional[Path] = None  # the open_clip weights file for that model
    inception_weights: Optional[Path] = None  # pytorch-fid / torch-fidelity Inception-v3 FID weights
    fid_features: int = 2048  # Inception layer; only 2048 is reported as FID
    extractor: Optional[str] = None  # another named feature extractor -> "FD (<name>)"
    extractor_weights: Optional[Path] = None
    subject_class: Optional[str] = None  # a class the extractor predicts -> "subject accuracy" (share of samples in it)
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set
    reference: Optional[Path] = None  # FID reference images (default: the clean instance images)
    fd_bootstrap: int = 10  # resamples of the generated set for the FID/FD spread (0: none)
    fd_pca_dims: int = 8  # the extractor's FD also on the reference's first N principal axes (0: not)
    hf_low_cut: float = 0.25  # the HF spectrum distance uses radii >= this share of Nyquist
    batch_size: int = 16
    heldout_images: Optional[Path] = None  # clean subject images never trained on -> held-out denoising loss
    heldout_timesteps: tuple = HELDOUT_TIMESTEPS  # its fixed timestep grid
    heldout_draws: int = 4  # noise draws per image and timestep
    heldout_seed: int = 0  # seeds the draws (the same for every method: paired)


@dataclasses.dataclass
class Experiment:
    config_path: Path
    output: Path
    mode: str = "protocol"
    seed: int = 0
    checkpoint: Path = Path()
    class_name: str = "person"
    token: str = "sks"
    instance_prompt: str = ""  # default "a photo of {token} {class_name}"
    class_prompt: str = ""  # default "a photo of a {class_name}"
    instance_images: Optional[Path] = None  # clean few-shot images (protocol: required; artist: originals, optional)
    protected_images: Optional[Path] = None  # artist mode: the protected images as published (same file names)
    class_images: Optional[Path] = None  # Stage-2 prior preservation (optional)
    resolution: int = 512
    paper_dataset: Optional[str] = None
    attack_preset: str = "mist_v2"
    attack_target: Optional[Path] = None
    attack_steps: Optional[int] = None  # override the preset's PGD steps (per round for surrogate presets)
    attack_rounds: Optional[int] = None  # surrogate presets: override the number of rounds
    attack_epsilon: Optional[float] = None  # override the preset's L-inf budget (pixel levels 0..255)
    attack_step_size: Optional[float] = None  # override the preset's PGD step (pixel levels)
    attack_seed: int = 0
    # the adaptive attacker (issue 20): protect against the base model with the Stage-1 LoRD live (learned gate),
    # so a surrogate preset (mist-v2, ASPL) fine-tunes its LoRA on the defended model
    attack_defense_aware: bool = False
    attack_gate_evasion: float = 0.0  # weight of the gate-evasion term (defense_aware attacker only; 0: off)
    stage1_lord: Optional[Path] = None  # a trained LoRD: skip Stage-1
    stage1_data: Optional[Path] = None  # images + .txt captions
    stage1_caption: Optional[str] = None
    stage1: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields
    stage2: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    methods: tuple = DEFAULT_METHODS
    jpeg_quality: int = 75
    diffpure_strength: float = 0.2
    noise_sigma: float = 0.05  # Gaussian-noise purification, share of the [0, 1] pixel range (Hönig et al. 2025)
    diffpure_steps: int = 20
    sweep_shares: tuple = ()
    sweep_series: tuple = ("plain", "lord")
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    detection_timestep: int = 200
    detection_seed: int = 0
    defense_strength: float = 1.0  # LoRD methods at sampling / held-out loss: B' scaled alone (lord_b<k>: k)

    @property
    def prompt(self) -> str:
        return self.instance_prompt or f"a photo of {self.token} {self.class_name}"

    @property
    def class_text(self) -> str:
        return self.class_prompt or f"a photo of a {self.class_name}"

    @property
    def has_originals(self) -> bool:
        return self.instance_images is not None


# section -> {key: (field name, type)}; types: path, dir, file, str, int, float, bool, list
SCHEMA = {
    "experiment": {"output": ("output", "path"), "mode": ("mode", "str"), "seed": ("seed", "int")},
    "model": {"checkpoint": ("checkpoint", "file")},
    "subject": {"class_name": ("class_name", "str"), "token": ("token", "str"),
                "instance_prompt": ("instance_prompt", "str"), "class_prompt": ("class_prompt", "str"),
                "instance_images": ("instance_images", "dir"), "protected_images": ("protected_images", "dir"),
                "class_images": ("class_images", "dir"), "resolution": ("resolution", "int"),
                "paper_dataset": ("paper_dataset", "str")},
    "attack": {"preset": ("attack_preset", "str"), "target": ("attack_target", "file"),
               "steps": ("attack_steps", "int"), "rounds": ("attack_rounds", "int"), "seed": ("attack_seed", "int"),
               "epsilon": ("attack_epsilon", "float"), "step_size": ("attack_step_size", "float"),
               "defense_aware": ("attack_defense_aware", "bool"), "gate_evasion": ("attack_gate_evasion", "float")},
    "stage1": {"lord": ("stage1_lord", "file"), "data": ("stage1_data", "dir"), "caption": ("stage1_caption", "str")},
    "stage2": {},
    "sampling": {f.name: ("sampling." + f.name, {int: "int", float: "float", str: "str"}[type(f.default)])
                 for f in dataclasses.fields(Sampling)},
    "methods": {"run": ("methods", "list")},
    "purification": {"jpeg_quality": ("jpeg_quality", "int"), "diffpure_strength": ("diffpure_strength", "float"),
                     "noise_sigma": ("noise_sigma", "float"),
                     "diffpure_steps": ("diffpure_steps", "int")},
    "sweep": {"shares": ("sweep_shares", "list"), "series": ("sweep_series", "list")},
    "metrics": {"clip_iqa_model": ("metrics.clip_iqa_model", "str"), "clip_iqa_weights": ("metrics.clip_iqa_weights", "file"),
                "inception_weights": ("metrics.inception_weights", "file"), "fid_features": ("metrics.fid_features", "int"),
                "extractor": ("metrics.extractor", "str"), "extractor_weights": ("metrics.extractor_weights", "file"),
                "subject_class": ("metrics.subject_class", "str"),
                "kid_subsets": ("metrics.kid_subsets", "int"), "kid_subset_size": ("metrics.kid_subset_size", "int"),
                "reference": ("metrics.reference", "dir"), "batch_size": ("metrics.batch_size", "int"),
                "fd_bootstrap": ("metrics.fd_bootstrap", "int"), "fd_pca_dims": ("metrics.fd_pca_dims", "int"),
                "hf_low_cut": ("metrics.hf_low_cut", "float"),
                "heldout_images": ("metrics.heldout_images", "dir"),
                "heldout_timesteps": ("metrics.heldout_timesteps", "list"), "heldout_draws": ("metrics.heldout_draws", "int"),
                "heldout_seed": ("metrics.heldout_seed", "int")},
    "detection": {"timestep": ("detection_timestep", "int"), "seed": ("detection_seed", "int")},
    "lord": {"defense_strength": ("defense_strength", "float")},
}
TRAIN_SECTIONS = ("stage1", "stage2")  # besides their own keys, any TrainConfig field but RUNNER_FIELDS
RUNNER_FIELDS = ("stage", "mode")  # TrainConfig fields the runner sets (per stage and method)
# docs/experiment.md's generated reference of those keys (train_fields_markdown), between these markers
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "experiment.md"
DOC_START, DOC_END = "<!-- train-config:start -->", "<!-- train-config:end -->"
DOC_COMMAND = "python -m training.experiment_config --write-doc"


def _fail(path: Path, where: str, message: str):
    raise ConfigError(f"{path}: {where}: {message}")


def _convert(path: Path, where: str, kind: str, value, base: Path):
    if kind in ("path", "dir", "file"):
        if not isinstance(value, str) or not value:
            _fail(path, where, f"expected a path (a non-empty string), got {value!r}")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (base / p)
        if kind == "dir" and not p.is_dir():
            _fail(path, where, f"folder not found: {p}")
        if kind == "file" and not p.is_file():
            _fail(path, where, f"file not found: {p}")
        return p.resolve() if kind != "path" else p
    if kind == "str":
        if not isinstance(value, str):
            _fail(path, where, f"expected a string, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, where, f"expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, where, f"expected a number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(path, where, f"expected true or false, got {value!r}")
        return value
    if kind == "list":
        if not isinstance(value, list):
            _fail(path, where, f"expected a list, e.g. [\"a\", \"b\"], got {value!r}")
        return tuple(value)
    raise AssertionError(kind)


def load_config(path, output: Optional[str] = None) -> Experiment:
    """Read and validate ``path`` (TOML). ``output`` overrides ``[experiment] output``."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML file: {e}") from e
    return parse_config(raw, path, output)


def parse_config(raw: dict, path: Path, output: Optional[str] = None) -> Experiment:
    from lord_ops.train_config import TrainConfig

    base = path.parent
    exp = Experiment(config_path=path, output=base / "experiment_output")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(RUNNER_FIELDS)
    for section, values in raw.items():
        if section not in SCHEMA:
            _fail(path, f"[{section}]", f"unknown section; known: {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            _fail(path, f"[{section}]", "expected a table of key = value pairs")
        for key, value in values.items():
            where = f"[{section}] {key}"
            if key in SCHEMA[section]:
                name, kind = SCHEMA[section][key]
                converted = _convert(path, where, kind, value, base)
                target = exp
                if "." in name:
                    owner, name = name.split(".")
                    target = getattr(exp, owner)
                setattr(target, name, converted)
            elif section in TRAIN_SECTIONS and key in train_fields:
                getattr(exp, section)[key] = value
            else:
                known = sorted(SCHEMA[section]) + (sorted(train_fields) if section in TRAIN_SECTIONS else [])
                _fail(path, where, f"unknown key; known keys of [{section}]: {', '.join(known)}")
    if output:
        exp.output = Path(output).expanduser().resolve()
    if exp.mode == "artist" and "run" not in raw.get("methods", {}):
        exp.methods = tuple(m for m in ARTIST_METHODS if exp.has_originals or m != "clean")
    validate(exp, raw)
    return exp


def train_config(exp: Experiment, stage: str, mode: str = "lord"):
    """The TrainConfig of Stage-1 or of one Stage-2 method (defaults, then the config's section)."""
    from lord_ops.train_config import TrainConfig

    defaults = STAGE1_DEFAULTS if stage == "stage1" else STAGE2_DEFAULTS
    values = {**defaults, "seed": exp.seed, **getattr(exp, stage), "stage": stage, "mode": mode}
    return TrainConfig.from_dict(values).validate()


def validate(exp: Experiment, raw: dict) -> None:
    from lord_ops.attacks import ALL_PRESETS

    p = exp.config_path

    def need(ok, where, message):
        if not ok:
            _fail(p, where, message)

    need("model" in raw and "checkpoint" in raw["model"], "[model] checkpoint", "required: the ComfyUI checkpoint to defend")
    need(exp.mode in MODES, "[experiment] mode", f"must be one of {MODES}, got {exp.mode!r}")
    need(exp.resolution >= 8 and exp.resolution % 8 == 0, "[subject] resolution",
         f"must be a positive multiple of 8, got {exp.resolution}")
    need(bool(exp.class_name.strip()), "[subject] class_name", "must not be empty (e.g. \"person\")")
    need(exp.paper_dataset in (None,) + PAPER_DATASETS, "[subject] paper_dataset",
         f"must be one of {PAPER_DATASETS} (the paper's Table I columns) or left out, got {exp.paper_dataset!r}")
    if exp.mode == "protocol":
        need(exp.instance_images is not None, "[subject] instance_images",
             "required in protocol mode: the clean few-shot images of the subject")
        need(exp.protected_images is None, "[subject] protected_images",
             "is for artist mode ([experiment] mode = \"artist\"); protocol mode protects the instance images itself")
        need(exp.attack_preset in ALL_PRESETS, "[attack] preset",
             f"unknown preset {exp.attack_preset!r}; known: {', '.join(ALL_PRESETS)}")
    else:
        need(exp.protected_images is not None, "[subject] protected_images",
             "required in artist mode: the protected images as published")
        need("attack" not in raw, "[attack]", "artist mode uses the given protected images; remove [attack]")
    if exp.attack_defense_aware:
        need(exp.attack_preset != "photoguard_encoder", "[attack] defense_aware",
             "photoguard_encoder attacks the VAE encoder only, which the LoRD does not touch: the setting would "
             "change nothing; use a UNet attack (mist_v2, anti_dreambooth_aspl, ace_fixed, ...)")
    need(exp.attack_gate_evasion >= 0, "[attack] gate_evasion", f"must be >= 0, got {exp.attack_gate_evasion}")
    if exp.attack_gate_evasion > 0:
        need(exp.attack_defense_aware, "[attack] gate_evasion",
             "the gate-evasion term pushes down the defender's LoRD gate: it needs [attack] defense_aware = true "
             "(the attack runs through the Stage-1 LoRD)")
    for key in ("attack_steps", "attack_rounds"):
        value = getattr(exp, key)
        need(value is None or value >= 1, f"[attack] {key.split('_')[1]}", f"must be >= 1, got {value}")
    for key in ("attack_epsilon", "attack_step_size"):
        value = getattr(exp, key)
        need(value is None or 0 < value <= 255, f"[attack] {key.split('_', 1)[1]}",
             f"pixel levels in (0, 255], got {value}")
    if exp.stage1_lord is None:
        need(exp.stage1_data is not None, "[stage1] data",
             "give the Stage-1 training images (folder with .txt captions), or a trained LoRD as [stage1] lord")
    for stage in TRAIN_SECTIONS:
        try:
            train_config(exp, stage, "lord")
        except (TypeError, ValueError) as e:
            _fail(p, f"[{stage}]", str(e))
    if any(METHODS.get(m, ("", ""))[1] == "onebranch" for m in exp.methods):
        need(exp.stage1_data is not None, "[methods] run",
             "the one-branch control trains its own Stage-1 adapter: give [stage1] data (a given LoRD is not enough)")
    need(0 <= exp.defense_strength <= 10, "[lord] defense_strength",
         f"scales the defense branch B' at sampling, 0..10 (1: as trained), got {exp.defense_strength}")
    need(exp.metrics.heldout_draws >= 1, "[metrics] heldout_draws", f"must be >= 1, got {exp.metrics.heldout_draws}")
    need(all(isinstance(t, int) and 0 <= t <= 999 for t in exp.metrics.heldout_timesteps)
         and len(exp.metrics.heldout_timesteps) > 0, "[metrics] heldout_timesteps",
         f"integer DDPM timesteps in 0..999, at least one; got {list(exp.metrics.heldout_timesteps)}")
    known = METHODS if exp.mode == "protocol" else {m: METHODS[m] for m in ARTIST_METHODS}
    need(len(exp.methods) > 0, "[methods] run", "name at least one method")
    for m in exp.methods:
        need(m in known, "[methods] run", f"unknown method {m!r}; known in {exp.mode} mode: {', '.join(known)}")
    need(len(set(exp.methods)) == len(exp.methods), "[methods] run", "a method is listed twice")
    if exp.mode == "artist" and not exp.has_originals:
        need("clean" not in exp.methods and "lord_clean" not in exp.methods, "[methods] run",
             "clean needs the original images: set [subject] instance_images, or drop clean")
    s = exp.sampling
    for key in ("images", "steps", "batch_size"):
        need(getattr(s, key) >= 1, f"[sampling] {key}", f"must be >= 1, got {getattr(s, key)}")
    need(s.cfg > 0, "[sampling] cfg", f"must be > 0, got {s.cfg}")
    need(1 <= exp.jpeg_quality <= 95, "[purification] jpeg_quality", f"must be 1..95, got {exp.jpeg_quality}")
    need(0 < exp.noise_sigma <= 1, "[purification] noise_sigma",
         f"must be in (0, 1] (a share of the [0, 1] pixel range; Hönig et al. use 0.05), got {exp.noise_sigma}")
    need(0 < exp.diffpure_strength <= 1, "[purification] diffpure_strength",
         f"must be in (0, 1] (img2img denoise), got {exp.diffpure_strength}")
    need(exp.diffpure_steps >= 1, "[purification] diffpure_steps", f"must be >= 1, got {exp.diffpure_steps}")
    for share in exp.sweep_shares:
        need(isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1,
             "[sweep] shares", f"shares are numbers in 0..1, got {share!r}")
    if exp.sweep_shares:
        need(exp.has_originals, "[sweep] shares", "the sweep mixes clean and protected images: needs [subject] instance_images")
    for series in exp.sweep_series:
        need(series in SWEEP_SERIES, "[sweep] series", f"unknown series {series!r}; known: {', '.join(SWEEP_SERIES)}")
    m = exp.metrics
    need(m.fid_features in (64, 192, 768, 2048), "[metrics] fid_features", f"must be 64, 192, 768 or 2048, got {m.fid_features}")
    need(m.kid_subsets >= 1, "[metrics] kid_subsets", f"must be >= 1, got {m.kid_subsets}")
    need(m.kid_subset_size >= 2, "[metrics] kid_subset_size", f"must be >= 2, got {m.kid_subset_size}")
    need(m.batch_size >= 1, "[metrics] batch_size", f"must be >= 1, got {m.batch_size}")
    need(m.fd_bootstrap >= 0, "[metrics] fd_bootstrap", f"must be >= 0, got {m.fd_bootstrap}")
    need(0 <= m.hf_low_cut < 1, "[metrics] hf_low_cut",
         f"must be in [0, 1) (a share of the Nyquist frequency), got {m.hf_low_cut}")
    need(m.fd_pca_dims >= 0, "[metrics] fd_pca_dims", f"must be >= 0 (0: not computed), got {m.fd_pca_dims}")
    need((m.extractor is None) == (m.extractor_weights is None), "[metrics] extractor",
         "extractor and extractor_weights go together (a named feature extractor and its weights file)")
    need(m.subject_class is None or m.extractor is not None, "[metrics] subject_class",
         "subject accuracy needs a classifier: set [metrics] extractor (e.g. \"lab-classifier\") and extractor_weights")
    need(0 <= exp.detection_timestep <= 999, "[detection] timestep", f"must be 0..999, got {exp.detection_timestep}")


# ----------------------------------------------------------------------------------------------
# The [stage1]/[stage2] key reference of docs/experiment.md, generated from TrainConfig's help text


def train_fields_markdown() -> str:
    """Markdown table of the ``[stage1]``/``[stage2]`` keys (TrainConfig fields but ``RUNNER_FIELDS``)
    with this runner's defaults and the fields' help text (``lord_ops.train_config.field_help``)."""
    from lord_ops.train_config import FIELDS, format_default, markdown_reference

    base = {f.name: f.default for f in FIELDS}
    shown = {"seed": "`[experiment] seed`"}
    for key in sorted(set(STAGE1_DEFAULTS) | set(STAGE2_DEFAULTS)):
        one, two = (f"`{format_default({**base, **d}[key])}`" for d in (STAGE1_DEFAULTS, STAGE2_DEFAULTS))
        shown[key] = one if one == two else f"stage1 {one}, stage2 {two}"
    return markdown_reference(exclude=RUNNER_FIELDS, defaults=shown)


def doc_block(text: str) -> str:
    """The text between ``DOC_START`` and ``DOC_END`` (without the markers' lines)."""
    if DOC_START not in text or DOC_END not in text:
        raise ValueError(f"{DOC_PATH.name} lacks the markers {DOC_START} / {DOC_END}")
    return text.split(DOC_START, 1)[1].split(DOC_END, 1)[0].strip("\n") + "\n"


def with_doc_block(text: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    doc_block(text)  # the markers are there
    head, rest = text.split(DOC_START, 1)
    return f"{head}{DOC_START}\n{block.rstrip()}\n{DOC_END}{rest.split(DOC_END, 1)[1]}"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.experiment_config",
                                 description="The [stage1]/[stage2] key reference of docs/experiment.md.")
    ap.add_argument("--write-doc", action="store_true", help=f"rewrite the generated block of {DOC_PATH}")
    args = ap.parse_args(argv)
    table = train_fields_markdown()
    if not args.write_doc:
        print(table, end="")
        return 0
    text = DOC_PATH.read_text(encoding="utf-8")
    new = with_doc_block(text, table)
    if new != text:
        DOC_PATH.write_text(new, encoding="utf-8")
    print(f"{DOC_PATH}: {'updated' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
