"""Smaller defects from review (issue 8, section 4): the trainers' seed widget, save-name checks."""
import json
from pathlib import Path

import pytest

from comfyui_lord.nodes import train as train_nodes
from training import workflow_api

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"LoRDTrainStage1": train_nodes.LoRDTrainStage1, "LoRDTrainStage2": train_nodes.LoRDTrainStage2}


@pytest.mark.parametrize("node_id", sorted(TRAINERS))
def test_trainer_seed_has_no_control_after_generate(node_id):
    """The frontend adds a control widget (default "randomize") to an INT named ``seed`` unless the
    spec says ``control_after_generate: false``; a randomized seed makes a re-queued run (after
    Cancel) a different run instead of a resume."""
    info = TRAINERS[node_id].GET_NODE_INFO_V1()
    spec = info["input"]["required"]["seed"]
    assert spec[1].get("control_after_generate") is False
    assert workflow_api.control_values_after("seed", spec) == 0


@pytest.mark.parametrize("workflow", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_shipped_trainer_widget_values_match_the_nodes(workflow):
    """Every trainer node in a shipped workflow has exactly one saved value per widget (no control
    value after ``seed``), and the values land on the right widgets."""
    nodes = [n for n in json.loads(workflow.read_text())["nodes"] if n["type"] in TRAINERS]
    for node in nodes:
        info = TRAINERS[node["type"]].GET_NODE_INFO_V1()
        widgets = workflow_api.widget_inputs(info)
        assert len(node["widgets_values"]) == sum(1 + extra for _, _, extra in widgets)
        values = workflow_api._widget_values(node, info)
        assert isinstance(values["seed"], int) and isinstance(values["checkpoint_every"], int)
        assert values["run_name"].startswith("lord_stage")
        assert "fixed" not in node["widgets_values"]


@pytest.mark.parametrize("prefix", ["C:foo", "C:\\x\\lord", "c:/x", "D:", "sub/C:evil", "x:stream", "..", "a/../b",
                                    "..\\b", "", "  "])
def test_free_name_refuses_names_outside_the_folder(tmp_path, prefix):
    with pytest.raises(ValueError, match="not a usable file name"):
        train_nodes._free_name(str(tmp_path), prefix, False)


def test_free_name_keeps_plain_names_and_numbers_existing_ones(tmp_path):
    assert train_nodes._free_name(str(tmp_path), "lord_stage1", False) == str(tmp_path / "lord_stage1.safetensors")
    assert train_nodes._free_name(str(tmp_path), "\\mine\\x.safetensors", False) == str(tmp_path / "mine" / "x.safetensors")
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert train_nodes._free_name(str(tmp_path), "a", False) == str(tmp_path / "a_00001.safetensors")
    assert train_nodes._free_name(str(tmp_path), "a", True) == str(tmp_path / "a.safetensors")
