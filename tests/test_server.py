"""Through a real ComfyUI server on 127.0.0.1 with the pack installed as a custom node."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lord_ops import format as fmt
from tools.comfy_server import ComfyServer

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"


def write_bad_files(lord_dir: Path, good: Path, marker: Path) -> dict[str, str]:
    """Broken LoRD files; returns {file name: fragment of the message the user must see}."""
    data = good.read_bytes()
    (lord_dir / "bad_empty.safetensors").write_bytes(b"")
    (lord_dir / "bad_truncated.safetensors").write_bytes(data[: len(data) // 3])

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (lord_dir / "bad_pickle.safetensors").write_bytes(pickle.dumps(Payload()))
    with safetensors.safe_open(str(good), "pt") as f:
        meta, sd = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    first = json.loads(meta["targets"])[0]
    nan_sd = dict(sd)
    nan_sd[f"{first}.lord_gate.0.weight"] = sd[f"{first}.lord_gate.0.weight"].clone().fill_(float("inf"))
    safetensors.torch.save_file(nan_sd, str(lord_dir / "bad_nan.safetensors"), metadata=meta)
    safetensors.torch.save_file(sd, str(lord_dir / "bad_family.safetensors"), metadata=dict(meta, base_family="sdxl"))
    # consistent file whose adapters are twice as wide as the model's layers
    lord = fmt.load_lord_file(good)
    for w in lord.targets.values():
        w.down = torch.cat([w.down, w.down], dim=1)
    fmt.save_lord_file(lord_dir / "bad_shapes.safetensors", lord)
    return {
        "bad_empty.safetensors": "empty",
        "bad_truncated.safetensors": "truncated",
        "bad_pickle.safetensors": "pickle",
        "bad_nan.safetensors": "NaN or Inf",
        "bad_family.safetensors": "made for a 'sdxl' model, but the MODEL is 'sd1'",
        "bad_shapes.safetensors": "base weight of shape",
    }


@pytest.fixture(scope="module")
def server(make_comfy_base, comfyui_path):
    base = make_comfy_base("comfy_base")  # the checkpoint, LoRD, LoRA and inputs the shipped workflows read
    models = base / "models"
    good = models / "lord" / "lord_sd15.safetensors"
    marker = base / "pickle_was_executed"
    bad = write_bad_files(models / "lord", good, marker)
    from PIL import Image

    g = torch.Generator().manual_seed(11)
    pixels = (torch.rand(44, 36, 3, generator=g) * 255).byte().numpy()
    Image.fromarray(pixels).save(base / "input" / "protect_me.png")
    extra = base / "extra_lord"
    extra.mkdir()
    shutil.copy(good, extra / "from_extra_paths.safetensors")
    (extra / "notes.txt").write_text("not a model")
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"lord_test:\n    base_path: {base}\n    lord: extra_lord\n")
    srv = ComfyServer(base, comfyui=comfyui_path, extra_model_paths=yaml)
    srv.start()
    srv.bad_files, srv.marker = bad, marker
    yield srv
    srv.stop()


def generation_prompt(lord_name="lord_sd15.safetensors", gate_mode="learned", lora="None", seed=0):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "LoRDLoader", "inputs": {"model": ["1", 0], "lord_name": lord_name, "strength": 1.0,
                                                     "gate_mode": gate_mode, "implementation": "fused",
                                                     "lora_name": lora, "lora_strength": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks person"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "test/lord"}},
    }


def error_message(entry) -> str:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data["exception_message"]
    raise AssertionError(f"no execution_error in {entry['status']}")


def test_nodes_and_files_in_object_info(server):
    info = server.object_info()
    assert {"LoRDLoader", "LoRDDetect", "LoRDProtect", "LoRDPurify", "LoRDImageQuality", "LoRDImageMetrics"} <= set(info)
    loader = info["LoRDLoader"]
    assert loader["category"] == "loaders/LoRD"
    lord_opts = json.dumps(loader["input"]["required"]["lord_name"])
    assert "lord_sd15.safetensors" in lord_opts
    assert "from_extra_paths.safetensors" in lord_opts  # extra_model_paths.yaml entry kept
    assert "notes.txt" not in lord_opts  # .safetensors only
    assert "lord_stage2_sks.safetensors" in json.dumps(loader["input"]["required"]["lora_name"])
    assert set(info["LoRDDetect"]["output_name"]) == {"heatmap", "gate_mask", "score", "report"}


def test_generation_with_lord_and_lora(server):
    entry = server.run_prompt(generation_prompt(lora="lord_stage2_sks.safetensors"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert (server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


@pytest.mark.parametrize("bad_name", ["bad_empty.safetensors", "bad_truncated.safetensors", "bad_pickle.safetensors",
                                      "bad_nan.safetensors", "bad_family.safetensors", "bad_shapes.safetensors"])
def test_bad_lord_files_fail_cleanly(server, bad_name):
    entry = server.run_prompt(generation_prompt(lord_name=bad_name, seed=1))
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert bad_name in message and server.bad_files[bad_name] in message, message
    assert not server.marker.exists(), "a pickle in a LoRD file was executed"
    # the server keeps serving and the next prompt succeeds
    ok = server.run_prompt(generation_prompt(seed=2))
    assert ok["status"]["status_str"] == "success"


def test_bad_lora_input_fails_cleanly(server):
    lora_dir = server.base_dir / "models" / "loras"
    shutil.copy(server.base_dir / "models" / "lord" / "bad_pickle.safetensors", lora_dir / "evil_lora.safetensors")
    try:
        info = server.get("/object_info/LoRDLoader")  # refreshes the file lists
        assert "evil_lora.safetensors" in json.dumps(info)
        entry = server.run_prompt(generation_prompt(lora="evil_lora.safetensors", seed=3))
        assert entry["status"]["status_str"] == "error"
        assert "LoRA file" in error_message(entry) and "pickle" in error_message(entry)
        assert not server.marker.exists()
    finally:
        (lora_dir / "evil_lora.safetensors").unlink()


def test_image_metrics_node_in_the_server(server):
    """LoRD Image Metrics inside the server (inference mode, models/lord_metrics registered by the
    pack's entry point): two sampled images against input/lord_train with a random Inception-v3."""
    import torchvision

    folder = server.base_dir / "models" / "lord_metrics"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    torch.save(net.state_dict(), folder / "pt_inception_random.pth")
    info = server.get("/object_info/LoRDImageMetrics")  # refreshes the file lists
    assert "pt_inception_random.pth" in json.dumps(info["LoRDImageMetrics"]["input"]["required"]["weights"])
    assert "LoRDImageQuality" in server.object_info()
    prompt = generation_prompt(seed=4)
    prompt["4"]["inputs"]["batch_size"] = 2
    del prompt["7"]
    prompt["8"] = {"class_type": "LoRDImageMetrics", "inputs": {
        "images": ["6", 0], "reference_folder": "lord_train", "extractor": "inception-v3",
        "weights": "pt_inception_random.pth", "kid_subset_size": 1000, "kid_subsets": 10}}
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = entry["outputs"]["8"]["text"][0]
    assert text.startswith("FID: ") and "KID: " in text and "2 generated vs 4 reference images" in text, text


WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_workflow_conversion_uses_object_info(server):
    from tools.workflow_api import load_workflow, ui_to_api

    api = ui_to_api(load_workflow(ROOT / "workflows" / "lord_defended_generation.json"), server.object_info())
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert "Note" not in by_type
    assert by_type["KSampler"]["seed"] == 42 and by_type["KSampler"]["steps"] == 20  # "fixed" control value skipped
    assert by_type["LoRDLoader"]["gate_mode"] == "learned" and by_type["LoRDLoader"]["implementation"] == "fused"
    assert by_type["LoraLoader"]["model"][0] in api and api[by_type["LoraLoader"]["model"][0]]["class_type"] == "LoRDLoader"


# The only changes the tests make to a shipped workflow are iteration counts, so that it runs in
# seconds on a CPU: the trainer nodes (Train LoRD / Train LoRA with LoRD) get TRAINING_STEPS steps
# instead of the shipped 1000 / 800, and KSampler SAMPLING_STEPS steps instead of 20 (at the
# shipped 512 px, 20 steps of the SD15-geometry checkpoint cost 4-9 minutes of a 2-core CI run and
# exercise nothing 2 steps do not). Every other node and widget (sizes, models, gate settings) is
# sent as the frontend queues it.
TRAINING_STEPS = 2
SAMPLING_STEPS = 2
SAMPLERS = ("KSampler", "KSamplerAdvanced")


def shipped_prompt(server, workflow: Path, steps: int = TRAINING_STEPS, **trainer_values) -> dict:
    """The API prompt of a shipped workflow (converted with the server's /object_info), its samplers
    with SAMPLING_STEPS steps; for a training workflow with ``steps`` (and any ``trainer_values``) set
    on its trainer nodes."""
    from tools.workflow_api import is_training_workflow, with_trainer_settings
    from tools.workflow_api import load_workflow, ui_to_api

    data = load_workflow(workflow)
    prompt = ui_to_api(data, server.object_info())
    for node in prompt.values():
        if node["class_type"] in SAMPLERS:
            node["inputs"]["steps"] = SAMPLING_STEPS
    if is_training_workflow(data):
        with_trainer_settings(prompt, steps=steps, **trainer_values)
    else:
        assert not trainer_values
    return prompt


def cached_nodes(entry) -> set:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_every_shipped_workflow_runs_unchanged(server, workflow):
    """Every workflow in workflows/ runs on the server as the frontend would queue it (trainers with
    TRAINING_STEPS steps, samplers with SAMPLING_STEPS, nothing else changed: the defended generation at
    its shipped 512 px) and writes its images or model files."""
    prompt = shipped_prompt(server, workflow)
    entry = server.run_prompt(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", {k: v for k, v in entry["status"]["messages"][-1][1].items()
                                                             if k in ("node_type", "exception_message")}
    outputs = entry["outputs"].values()
    saved = [img for out in outputs for img in out.get("images", []) if img["type"] == "output"]
    written = [t for out in outputs for t in out.get("text", []) if t.startswith("models/")]  # Save LoRD / LoRA
    assert saved or written
    for img in saved:
        assert (server.base_dir / "output" / img["subfolder"] / img["filename"]).stat().st_size > 0
    for name in written:
        assert (server.base_dir / name).stat().st_size > 0
    trainers = [n for n in prompt.values() if n["class_type"].startswith("LoRDTrain")]
    if trainers:
        assert written
        previews = [img for out in outputs for img in out.get("images", []) if img["type"] == "temp"]
        assert previews, "Plot Loss Graph shows nothing"  # core's loss graph of the trainer's loss_map
        reports = [json.loads(t) for out in outputs for t in out.get("text", []) if t.startswith("{")]
        assert [r["final"]["step"] for r in reports] == [TRAINING_STEPS]


def test_replaced_file_is_reloaded(server):
    """A file overwritten under the same name is re-validated, not served from ComfyUI's cache."""
    lord_dir = server.base_dir / "models" / "lord"
    swap = lord_dir / "swap.safetensors"
    shutil.copy(lord_dir / "lord_sd15.safetensors", swap)
    server.get("/object_info/LoRDLoader")
    assert server.run_prompt(generation_prompt("swap.safetensors", seed=9))["status"]["status_str"] == "success"
    shutil.copy(lord_dir / "bad_nan.safetensors", swap)
    entry = server.run_prompt(generation_prompt("swap.safetensors", seed=9))
    assert entry["status"]["status_str"] == "error" and "NaN or Inf" in error_message(entry)


def protect_prompt(steps: int, seed: int = 0):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a person"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "protect_me.png"}},
        "4": {"class_type": "LoRDProtect", "inputs": {"model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0],
                                                      "image": ["3", 0], "method": "ace", "strength": 4.0,
                                                      "step_size": 1.0, "steps": steps, "seed": seed,
                                                      "low_memory": False}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "test/protected"}},
    }


def test_protect_through_server_keeps_budget(server):
    """The server runs prompts under inference_mode: the attack must still get gradients."""
    import numpy as np
    from PIL import Image

    entry = server.run_prompt(protect_prompt(steps=3))
    assert entry["status"]["status_str"] == "success", entry["status"]
    img = entry["outputs"]["5"]["images"][0]
    out = np.asarray(Image.open(server.base_dir / "output" / img["subfolder"] / img["filename"])).astype(int)
    src = np.asarray(Image.open(server.base_dir / "input" / "protect_me.png")).astype(int)
    assert out.shape == src.shape and 1 <= np.abs(out - src).max() <= 4


def test_cancel_stops_an_attack_quickly(server):
    import time

    status, body = server.post("/prompt", {"prompt": protect_prompt(steps=10000, seed=5)})
    assert status == 200
    prompt_id = body["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline and not server.get("/queue")["queue_running"]:
        time.sleep(0.2)
    time.sleep(3.0)  # let it get into the step loop
    t0 = time.time()
    server.post("/interrupt", {})
    while time.time() < deadline:
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.1)
    stopped_after = time.time() - t0
    kinds = [kind for kind, _ in hist[prompt_id]["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert stopped_after < 15, stopped_after  # one attack step on a 44x36 image is well under a second
    assert server.run_prompt(generation_prompt(seed=12))["status"]["status_str"] == "success"


TRAIN_STAGE1 = ROOT / "workflows" / "lord_train_stage1.json"
TRAIN_STAGE2 = ROOT / "workflows" / "lord_train_stage2.json"


def test_training_workflows_chain_into_defended_generation(server):
    """lord_train_stage1 -> lord_train_stage2 -> lord_defended_generation (the shipped files; the
    trainers with a few steps and their own run names): the trained LoRD and LoRA are written under
    the names the next workflow loads, and the generation reloads them and produces an image."""
    from safetensors import safe_open

    lord_path = server.base_dir / "models" / "lord" / "lord_sd15.safetensors"
    lora_path = server.base_dir / "models" / "loras" / "lord_stage2_sks.safetensors"

    e1 = server.run_prompt(shipped_prompt(server, TRAIN_STAGE1, steps=4, run_name="chain_stage1"), timeout=600)
    assert e1["status"]["status_str"] == "success", e1["status"]
    assert ["models/lord/lord_sd15.safetensors"] in [o.get("text") for o in e1["outputs"].values()]  # overwritten
    prov = fmt.load_lord_file(lord_path).provenance
    assert prov["stage"] == "stage1" and prov["steps_trained"] == 4
    assert prov["dataset"]["images"] == 4 and prov["dataset"]["size_hw"] == [64, 64]
    assert "auroc" in prov["gate_separation_train"]
    assert prov["config"]["learning_rate"] == 1e-4 and prov["config"]["attack_preset"] == "pgd_2"  # the workflow's widgets
    assert prov["attack"]["steps"] == 2 and prov["gate_separation_heldout"]["images"] == 0  # attack_steps 0: the preset's

    e2 = server.run_prompt(shipped_prompt(server, TRAIN_STAGE2, steps=3, run_name="chain_stage2"), timeout=600)
    assert e2["status"]["status_str"] == "success", e2["status"]
    loader = next(k for k, n in shipped_prompt(server, TRAIN_STAGE2).items() if n["class_type"] == "LoRDLoader")
    assert loader not in cached_nodes(e2)  # Load LoRD read the new Stage-1 file
    with safe_open(str(lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["lord_stage2_mode"] == "lord" and meta["ss_max_train_steps"] == "3"
    lora_prov = json.loads(meta["lord_provenance"])
    assert lora_prov["stage"] == "stage2" and lora_prov["steps_trained"] == 3 and lora_prov["lord_live"] is True
    assert lora_prov["dataset"]["images"] == 3

    # 64x64 instead of 512x512 (the workflow at its shipped size runs in the test above)
    gen = shipped_prompt(server, ROOT / "workflows" / "lord_defended_generation.json")
    for node in gen.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
    e3 = server.run_prompt(gen, timeout=600)
    assert e3["status"]["status_str"] == "success", e3["status"]
    # the LoRA is loaded again and sampled with (Load LoRD's output may come from the Stage-2 run,
    # which loaded the trained LoRD file: same node, same inputs)
    fresh = {k for k, n in gen.items() if n["class_type"] in ("LoraLoader", "KSampler")}
    assert len(fresh) == 2 and not fresh & cached_nodes(e3)
    images = [img for out in e3["outputs"].values() for img in out.get("images", [])]
    assert images and (server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]).stat().st_size > 0


def test_cancel_keeps_the_training_checkpoint_and_queueing_again_resumes(server):
    import time

    run = "cancel_stage1"
    ckpt = server.base_dir / "output" / "lord_training" / run / "checkpoint.pt"
    prompt = shipped_prompt(server, TRAIN_STAGE1, steps=100000, checkpoint_every=1, run_name=run)
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.1)
    assert ckpt.exists(), server.log_tail()
    t0 = time.time()
    server.post("/interrupt", {})
    while time.time() < deadline:
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.1)
    stopped_after = time.time() - t0
    kinds = [kind for kind, _ in hist[prompt_id]["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert stopped_after < 10, stopped_after  # one step on 64x64 images takes well under a second
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # the last checkpoint stays
    done = int(state["step"])
    assert 1 <= done < 100000 and len(state["history"]) == done

    # queueing the same run again resumes from that checkpoint (only the step count changed)
    log_start = len(server.log_path.read_bytes())
    entry = server.run_prompt(shipped_prompt(server, TRAIN_STAGE1, steps=done + 2, checkpoint_every=1, run_name=run),
                              timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    resumed = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert resumed["step"] == done + 2 and resumed["history"][:done] == state["history"]
    log = server.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert f"LoRD Stage-1 step {done + 1}/{done + 2} " in log, log[-3000:]
    assert f"LoRD Stage-1 step 1/{done + 2} " not in log  # the first steps were not trained again
    assert fmt.load_lord_file(server.base_dir / "models" / "lord" / "lord_sd15.safetensors").provenance["steps_trained"] == done + 2
