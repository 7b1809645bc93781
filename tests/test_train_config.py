"""TrainConfig (``lord_ops/train_config.py``): the checkpoint-relevant shape of the config stays put,
and its per-field help text is the one source of the trainer nodes' tooltips, the command line's key
list and docs/experiment.md's ``[stage1]``/``[stage2]`` reference."""
from __future__ import annotations

import dataclasses

import pytest

from lord_ops import train_config as TC
from lord_ops import trainer as T
from lord_ops.train_config import FIELD_HELP, RESUMABLE_FIELDS, TrainConfig, field_help
from training import experiment_config as EC

# Checkpoints store to_dict() and hash it (trajectory_digest): renaming, reordering or re-defaulting a
# field makes every existing checkpoint unresumable. Change these only with CHECKPOINT_VERSION.
FIELD_ORDER = ["stage", "mode", "steps", "batch_size", "grad_accumulation", "learning_rate", "weight_decay", "rank",
               "alpha", "gate_hidden", "gate_activation", "targets", "lambda_adv", "lambda_gate", "defense_branch",
               "prior_weight",
               "t_min", "t_max", "seed", "dtype", "gradient_checkpointing", "checkpoint_every", "attack_preset",
               "attack_epsilon", "attack_step_size", "attack_steps", "online_perturbations", "attack_rounds"]


def test_fields_defaults_and_digests_are_unchanged():
    assert list(TrainConfig().to_dict()) == FIELD_ORDER
    assert TrainConfig(stage="stage2", mode="plain").to_dict() == {
        "stage": "stage2", "mode": "plain", "steps": 1000, "batch_size": 1, "grad_accumulation": 1,
        "learning_rate": 1e-4, "weight_decay": 1e-2, "rank": 4, "alpha": None, "gate_hidden": 32,
        "gate_activation": "silu", "targets": "attn", "lambda_adv": 1.0, "lambda_gate": 1.0, "defense_branch": True,
        "prior_weight": 1.0,
        "t_min": 0, "t_max": 999, "seed": 0, "dtype": "fp32", "gradient_checkpointing": False,
        "checkpoint_every": 100, "attack_preset": "pgd_2", "attack_epsilon": None, "attack_step_size": None,
        "attack_steps": None, "online_perturbations": False, "attack_rounds": None}
    assert TrainConfig().trajectory_digest() == "2483e489746ecb01"
    assert TrainConfig(stage="stage2", mode="plain").trajectory_digest() == "2994d6b7448a1617"
    assert TrainConfig(stage="stage2", mode="pgd2_defense", alpha=2.0, attack_epsilon=4.0,
                       dtype="bf16").trajectory_digest() == "581eaa87886991e1"
    assert RESUMABLE_FIELDS == {"steps", "checkpoint_every"}
    # a field added later (defense_branch, attack_rounds) leaves the digests of its default unchanged, not of
    # other values
    assert TrainConfig(attack_preset="aspl", attack_rounds=2).trajectory_digest() != TrainConfig(
        attack_preset="aspl").trajectory_digest()
    assert TrainConfig(defense_branch=False).trajectory_digest() != TrainConfig().trajectory_digest()


def test_config_names_have_one_owner():
    """trainer.py imports the config; it forwards none of the config names (nor metrics.auroc)."""
    for name in ("STAGES", "STAGE2_MODES", "DTYPES", "STAGE1_DATA_PRESETS", "STAGE1_METHODS", "_RESUMABLE_FIELDS",
                 "auroc"):
        assert not hasattr(T, name), f"lord_ops.trainer.{name}: import it from its owner"


def test_every_field_has_help():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(FIELD_HELP) == names
    for name in names:
        text = field_help(name)
        assert text.strip() and text.rstrip().endswith("."), name
    with pytest.raises(KeyError, match="no field 'nope'"):
        field_help("nope")
    for name in ("attack_epsilon", "attack_step_size"):
        assert "pixel levels 0..255" in field_help(name)
    for preset in TC.STAGE1_DATA_PRESETS:
        assert preset in field_help("attack_preset")
    for mode in TC.STAGE2_MODES:
        assert f"{mode} = " in field_help("mode")
    for dtype in TC.DTYPES:
        assert dtype in field_help("dtype")
    listing = TC.help_table()
    assert all(f"  {n} = " in listing for n in names)


def test_trainer_node_tooltips_come_from_the_field_help():
    from comfyui_lord.nodes import train as train_nodes

    seen = set()
    for node in (train_nodes.LoRDTrainStage1, train_nodes.LoRDTrainStage2):
        info = node.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for widget, spec in info["input"].get(section, {}).items():
                field = train_nodes.WIDGET_FIELDS.get(widget, widget)
                if field not in FIELD_HELP:
                    continue
                seen.add(field)
                assert spec[1]["tooltip"].startswith(field_help(field)), f"{info['name']}.{widget}"
    # every field a trainer node sets through a widget
    assert seen == {"mode", "steps", "batch_size", "grad_accumulation", "learning_rate", "rank", "targets", "dtype",
                    "gradient_checkpointing", "seed", "checkpoint_every", "gate_hidden", "lambda_adv", "lambda_gate",
                    "attack_epsilon", "attack_step_size", "attack_steps", "online_perturbations", "attack_preset", "attack_rounds",
                    "prior_weight"}


def test_cli_lists_the_config_keys_with_their_help(capsys):
    from training import train as cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in FIELD_HELP:
        if name != "stage":
            assert f"{name} = " in out and " ".join(field_help(name).split()) in out, name


def test_experiment_doc_reference_is_generated_from_the_help():
    text = EC.DOC_PATH.read_text(encoding="utf-8")
    generated = EC.train_fields_markdown()
    assert EC.doc_block(text) == generated, (
        f"docs/experiment.md's [stage1]/[stage2] key table differs from the TrainConfig help text "
        f"(lord_ops/train_config.py); regenerate it with `{EC.DOC_COMMAND}`")
    keys = {line.split("`")[1] for line in generated.splitlines()[2:]}
    assert keys == set(FIELD_HELP) - set(EC.RUNNER_FIELDS)
    assert EC.with_doc_block(text, generated) == text
