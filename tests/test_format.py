"""LoRD file format v1 and the kohya writer: round trip, validation, atomic writes."""
import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch

from lord_ops import format as fmt
from tools.safetensors_edit import rewrite_header
from lord_ops.keys import select_targets, unet_name_map
from lord_ops.layer import init_lord_weights
from lord_ops.safetensors_file import LoRDFileError

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
    with pytest.raises(LoRDFileError) as info:
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


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_looks_like_pickle_or_zip_loads(tmp_path, first_bytes):
    """The header length is the file's first 8 bytes: a length of 0x..80 or 0x..4B50 starts the file
    with a pickle's 0x80 or a zip's "PK" by chance; such a file is still safetensors."""
    target = first_bytes[0] if len(first_bytes) == 1 else struct.unpack("<H", first_bytes)[0]
    modulus = 256 if len(first_bytes) == 1 else 65536
    pad, path = 0, tmp_path / "a.safetensors"
    for _ in range(400):
        lord = make_lord()
        lord.provenance = {"tool": "test", "pad": "x" * pad}
        fmt.save_lord_file(path, lord)
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        if length % modulus == target:
            break
        pad += max(1, (target - length % modulus) % modulus) if (target - length % modulus) % modulus > 8 else 1
    assert path.read_bytes()[: len(first_bytes)] == first_bytes
    assert fmt.load_lord_file(path).provenance["pad"] == "x" * pad


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
    with pytest.raises(LoRDFileError, match="made for a 'sd1' model, but the MODEL is 'sdxl'"):
        fmt.check_against_model(lord, "sdxl", shapes)
    with pytest.raises(LoRDFileError, match="has no layer"):
        fmt.check_against_model(lord, "sd1", {NAMES[0]: (16, 16)})
    with pytest.raises(LoRDFileError, match=r"\(16, 16\).*\(32, 16\)"):
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


# ----------------------------------------------------------------------------------------------
# LoRA files given to Load LoRD: validated like LoRD files (file, key, fix)

TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
LORA_SHAPES = {NAMES[0]: (16, 16), NAMES[1]: (16, 8, 1, 1)}  # what a MODEL's key map gives


def stock_valid_lora_sd(seed=0) -> dict:
    """A LoRA stock loaders accept: kohya UNet pairs (linear + 1x1 conv) with alpha, text-encoder
    pairs, a dora_scale, a LoHa layer, an int reshape_weight-free extra key and training metadata keys."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return {
        f"{NAMES[0]}.lora_down.weight": r(4, 16).half(), f"{NAMES[0]}.lora_up.weight": r(16, 4).half(),
        f"{NAMES[0]}.alpha": torch.tensor(4.0), f"{NAMES[0]}.dora_scale": r(16, 1),
        f"{NAMES[1]}.lora_down.weight": r(2, 8, 1, 1), f"{NAMES[1]}.lora_up.weight": r(16, 2, 1, 1),
        f"{NAMES[1]}.alpha": torch.tensor(1, dtype=torch.int64),
        f"{TE}.lora_down.weight": r(4, 32), f"{TE}.lora_up.weight": r(32, 4), f"{TE}.alpha": torch.tensor(4.0),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": r(16, 2), "lora_unet_mid_block_attentions_0_proj_out.hada_w1_b": r(2, 16),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w2_a": r(16, 2), "lora_unet_mid_block_attentions_0_proj_out.hada_w2_b": r(2, 16),
        "some_trainer_step": torch.tensor([1200], dtype=torch.int32),
    }


def save_lora(path, sd):
    safetensors.torch.save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def expect_lora_error(path, *fragments, shapes=None):
    with pytest.raises(LoRDFileError) as info:
        sd, pairs = fmt.load_lora_file(path)
        fmt.check_lora_against_model(path, sd, pairs, LORA_SHAPES if shapes is None else shapes)
    msg = str(info.value)
    assert msg.startswith(f"LoRA file '{path}'"), msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_stock_valid_lora_with_text_encoder_keys_loads(tmp_path):
    path = save_lora(tmp_path / "ok.safetensors", stock_valid_lora_sd())
    sd, pairs = fmt.load_lora_file(path)
    assert set(pairs) == {NAMES[0], NAMES[1], TE}
    assert fmt.check_lora_against_model(path, sd, pairs, LORA_SHAPES) == sorted(NAMES)
    # a LoRA with text-encoder layers only is stock-valid too (Load LoRD applies nothing of it)
    te_only = save_lora(tmp_path / "te.safetensors", {k: v for k, v in stock_valid_lora_sd().items() if k.startswith(TE)})
    sd, pairs = fmt.load_lora_file(te_only)
    assert fmt.check_lora_against_model(te_only, sd, pairs, LORA_SHAPES) == []
    # diffusers / PEFT names
    peft = {f"{NAMES[0]}.lora_A.weight": torch.zeros(4, 16), f"{NAMES[0]}.lora_B.weight": torch.zeros(16, 4)}
    sd, pairs = fmt.load_lora_file(save_lora(tmp_path / "peft.safetensors", peft))
    assert pairs[NAMES[0]].up_key == f"{NAMES[0]}.lora_B.weight"


def test_damaged_lora_non_finite(tmp_path):
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[1]}.lora_up.weight"][3, 1, 0, 0] = float("nan")
    expect_lora_error(save_lora(tmp_path / "nan.safetensors", sd), "NaN or Inf", f"{NAMES[1]}.lora_up.weight", "re-train")
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[0]}.alpha"] = torch.tensor(float("inf"))
    expect_lora_error(save_lora(tmp_path / "inf.safetensors", sd), "NaN or Inf", f"{NAMES[0]}.alpha")


def test_damaged_lora_wrong_shape(tmp_path):
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[0]}.lora_down.weight"] = torch.zeros(4, 12)  # consistent rank, wrong d_in for the MODEL
    expect_lora_error(save_lora(tmp_path / "shape.safetensors", sd), f"{NAMES[0]}.lora_up.weight", "[16, 12]",
                      "(16, 16)", "trained for this checkpoint")
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[0]}.lora_up.weight"] = torch.zeros(16, 3)  # rank mismatch inside the file
    expect_lora_error(save_lora(tmp_path / "rank.safetensors", sd), "rank mismatch", f"{NAMES[0]}.lora_up.weight")
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[0]}.lora_down.weight"] = torch.zeros(64)
    expect_lora_error(save_lora(tmp_path / "vector.safetensors", sd), f"{NAMES[0]}.lora_down.weight", "not a matrix")
    sd = stock_valid_lora_sd()
    sd[f"{NAMES[0]}.alpha"] = torch.ones(4)
    expect_lora_error(save_lora(tmp_path / "alpha.safetensors", sd), "alpha must be one number", f"{NAMES[0]}.alpha")
    assert "another architecture" in expect_lora_error(save_lora(tmp_path / "arch.safetensors", stock_valid_lora_sd()),
                                                       shapes={"lora_unet_other_layer": (16, 16)})


@pytest.mark.parametrize("missing", ["lora_up", "lora_down"])
def test_damaged_lora_half_pair(tmp_path, missing):
    sd = stock_valid_lora_sd()
    sd.pop(f"{NAMES[0]}.{missing}.weight")
    other = "lora_down" if missing == "lora_up" else "lora_up"
    expect_lora_error(save_lora(tmp_path / "half.safetensors", sd), f"{NAMES[0]}.{other}.weight",
                      f"no partner '{NAMES[0]}.{missing}.weight'")


def test_damaged_lora_overlapping_ranges(tmp_path):
    path = save_lora(tmp_path / "overlap.safetensors", stock_valid_lora_sd())
    up, down = f"{TE}.lora_up.weight", f"{TE}.lora_down.weight"  # same byte size: [32, 4] and [4, 32]

    def overlap(h):
        h[up]["data_offsets"] = h[down]["data_offsets"]

    rewrite_header(path, overlap)
    with pytest.raises(Exception, match="invalid offset"):  # what safetensors itself says (no file named)
        safetensors.torch.load_file(str(path))
    expect_lora_error(path, "overlaps", "Re-download")
    # the same header checks guard LoRD files (one owner)
    lord = fmt.save_lord_file(tmp_path / "lord.safetensors", make_lord())
    rewrite_header(lord, lambda h: h[f"{NAMES[0]}.lord_up.weight"].__setitem__(
        "data_offsets", h[f"{NAMES[0]}.lord_up_defense.weight"]["data_offsets"]))
    expect_error(lord, "overlaps")


def test_damaged_lora_header_and_size(tmp_path):
    path = save_lora(tmp_path / "size.safetensors", stock_valid_lora_sd())
    rewrite_header(path, lambda h: h[f"{TE}.lora_up.weight"].__setitem__("shape", [32, 5]))
    expect_lora_error(path, f"{TE}.lora_up.weight", "header is damaged")
    path = save_lora(tmp_path / "trailing.safetensors", stock_valid_lora_sd())
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    expect_lora_error(path, "16 bytes after the last tensor")


def test_damaged_lora_container(tmp_path):
    good = save_lora(tmp_path / "good.safetensors", stock_valid_lora_sd())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    expect_lora_error(truncated, "truncated")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 24) + b"\x89PNG garbage not json!!" + b"\0" * 64)
    expect_lora_error(garbage, "not a valid safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_lora_error(empty, "empty")
    torch.save(stock_valid_lora_sd(), tmp_path / "pickled.safetensors")
    expect_lora_error(tmp_path / "pickled.safetensors", "pickle")
