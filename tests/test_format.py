"""LoRD file format v1 and the kohya writer: round trip, validation, atomic writes."""
import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch

from comfyui_lord.lord_ops import format as fmt
from comfyui_lord.lord_ops.keys import select_targets, unet_name_map
from comfyui_lord.lord_ops.layer import init_lord_weights

NAMES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         "lora_unet_down_blocks_0_attentions_0_proj_in"]


def make_lord(seed=0) -> fmt.LoRDFile:
    g = torch.Generator().manual_seed(seed)
    return fmt.LoRDFile({
        NAMES[0]: init_lord_weights(16, 16, 4, gate_hidden=8, generator=g, random_up=0.1),
        NAMES[1]: init_lord_weights(8, 16, 4, gate_hidden=8, kernel_size=(1, 1), generator=g, random_up=0.1),
    }, provenance={"tool": "test", "seed": seed})


def test_round_trip(tmp_path):
    lord = make_lord()
    path = fmt.save_lord_file(tmp_path / "a.safetensors", lord)
    back = fmt.load_lord_file(path)
    assert back.targets.keys() == lord.targets.keys()
    for name in NAMES:
        for field, t in lord.targets[name].tensors().items():
            assert torch.equal(getattr(back.targets[name], field), t), (name, field)
    assert back.provenance == {"tool": "test", "seed": 0} and back.base_family == "sd1"
    meta = safetensors.safe_open(str(path), "pt").metadata()
    assert meta["format"] == "lord" and meta["format_version"] == "1" and meta["rank"] == "4"
    assert json.loads(meta["targets"]) == sorted(NAMES)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_stock_safetensors_reads_keys(tmp_path):
    path = fmt.save_lord_file(tmp_path / "a.safetensors", make_lord())
    keys = set(safetensors.torch.load_file(str(path)))
    assert f"{NAMES[0]}.lord_down.weight" in keys and f"{NAMES[0]}.lord_up_defense.weight" in keys
    assert f"{NAMES[1]}.lord_gate.2.bias" in keys and f"{NAMES[1]}.alpha" in keys


def _rewrite(path, mutate_sd=None, mutate_meta=None):
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_sd:
        mutate_sd(sd)
    if mutate_meta:
        mutate_meta(meta)
    safetensors.torch.save_file(sd, str(path), metadata=meta)


@pytest.fixture()
def good_file(tmp_path):
    return fmt.save_lord_file(tmp_path / "lord.safetensors", make_lord())


def expect_error(path, *fragments):
    with pytest.raises(fmt.LoRDFileError) as info:
        fmt.load_lord_file(path)
    msg = str(info.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    expect_error(p, "empty")


def test_truncated_file(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) // 2])
    expect_error(good_file, "truncated")


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Payload()))
    expect_error(p, "pickle")
    assert not marker.exists()
    torch.save({"a": torch.zeros(1)}, p)  # a zip-based torch checkpoint renamed
    expect_error(p, "pickle")


def test_garbage_header(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    expect_error(p, "not a valid safetensors")


def test_nan_and_inf(good_file):
    _rewrite(good_file, lambda sd: sd[f"{NAMES[0]}.lord_up.weight"].__setitem__((0, 0), float("nan")))
    expect_error(good_file, "NaN or Inf", f"{NAMES[0]}.lord_up.weight")


def test_wrong_shape(good_file):
    _rewrite(good_file, lambda sd: sd.__setitem__(f"{NAMES[0]}.lord_up_defense.weight", torch.zeros(16, 3)))
    expect_error(good_file, f"{NAMES[0]}.lord_up_defense.weight", "shape")


def test_missing_and_unexpected_keys(good_file, tmp_path):
    _rewrite(good_file, lambda sd: sd.pop(f"{NAMES[1]}.lord_gate.0.bias"))
    expect_error(good_file, "missing key", f"{NAMES[1]}.lord_gate.0.bias")
    other = fmt.save_lord_file(tmp_path / "b.safetensors", make_lord())
    _rewrite(other, lambda sd: sd.__setitem__("lora_unet_extra.lord_down.weight", torch.zeros(4, 4)))
    expect_error(other, "unexpected key", "lora_unet_extra.lord_down.weight")


def test_integer_dtype_refused(good_file):
    _rewrite(good_file, lambda sd: sd.__setitem__(f"{NAMES[0]}.lord_gate.2.bias", torch.zeros(1, dtype=torch.int32)))
    expect_error(good_file, "dtype", f"{NAMES[0]}.lord_gate.2.bias")


def test_version_form_and_plain_lora(good_file, tmp_path):
    _rewrite(good_file, mutate_meta=lambda m: m.__setitem__("format_version", "2"))
    expect_error(good_file, "format_version", "Update ComfyUI-LoRD")
    lora = fmt.save_kohya_lora(tmp_path / "lora.safetensors", {NAMES[0]: (torch.zeros(4, 16), torch.zeros(16, 4), 4.0)})
    expect_error(lora, "not a LoRD file", "LoraLoader")


def test_check_against_model_family_and_shapes():
    lord = make_lord()
    shapes = {NAMES[0]: (16, 16), NAMES[1]: (16, 8, 1, 1)}
    fmt.check_against_model(lord, "sd1", shapes)
    with pytest.raises(fmt.LoRDFileError, match="made for a 'sd1' model, but the MODEL is 'sdxl'"):
        fmt.check_against_model(lord, "sdxl", shapes)
    with pytest.raises(fmt.LoRDFileError, match="has no layer"):
        fmt.check_against_model(lord, "sd1", {NAMES[0]: (16, 16)})
    with pytest.raises(fmt.LoRDFileError, match=r"\(16, 16\).*\(32, 16\)"):
        fmt.check_against_model(lord, "sd1", {NAMES[0]: (32, 16), NAMES[1]: (16, 8, 1, 1)})


def test_failed_write_leaves_old_file_and_no_temp(good_file, monkeypatch):
    before = good_file.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        fmt.save_lord_file(good_file, make_lord(seed=1))
    assert good_file.read_bytes() == before
    assert sorted(os.listdir(good_file.parent)) == [good_file.name]


def test_writer_refuses_non_finite(tmp_path):
    lord = make_lord()
    lord.targets[NAMES[0]].up[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fmt.save_lord_file(tmp_path / "x.safetensors", lord)
    assert not list(tmp_path.iterdir())


def test_kohya_lora_layout(tmp_path):
    p = fmt.save_kohya_lora(tmp_path / "l.safetensors", {NAMES[0]: (torch.ones(4, 16), torch.ones(16, 4), 2.0)})
    sd = safetensors.torch.load_file(str(p))
    assert set(sd) == {f"{NAMES[0]}.lora_down.weight", f"{NAMES[0]}.lora_up.weight", f"{NAMES[0]}.alpha"}
    assert sd[f"{NAMES[0]}.lora_down.weight"].dtype == torch.float16 and float(sd[f"{NAMES[0]}.alpha"]) == 2.0


def test_unet_name_map_prefers_diffusers_names():
    comfy_map = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_time_embed_0": "diffusion_model.time_embed.0.weight",
        "diffusion_model.time_embed.0": "diffusion_model.time_embed.0.weight",
        "lora_unet_odd": ("diffusion_model.x.weight", (0, 0, 4)),
    }
    names = unet_name_map(comfy_map)
    assert names == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_time_embed_0": "time_embed.0",
    }
    assert select_targets(names) == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    with pytest.raises(ValueError, match="unknown target preset"):
        select_targets(names, "everything")
