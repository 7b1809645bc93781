"""Find and bootstrap a ComfyUI installation for scripts, tests and benchmarks.

ComfyUI is located, in order, by an explicit path, ``$COMFYUI_PATH``, the parent of the
``custom_nodes`` folder this pack sits in, or the pinned copy that ``make setup`` installs into
``.cache/ComfyUI``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PINNED_COMFYUI = REPO_ROOT / ".cache" / "ComfyUI"


class ComfyUINotFound(RuntimeError):
    pass


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """The ComfyUI source folder (the one holding ``main.py`` and ``comfy/``)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if REPO_ROOT.parent.name == "custom_nodes":
        candidates.append(REPO_ROOT.parent.parent)
    candidates.append(PINNED_COMFYUI)
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise ComfyUINotFound(
        "ComfyUI not found (looked at: " + ", ".join(str(c) for c in candidates) + "). "
        "Pass --comfyui PATH, set COMFYUI_PATH, or run `make setup` to install the pinned copy.")


def ensure_comfyui_importable(explicit: Optional[str] = None, cpu: Optional[bool] = None) -> Path:
    """Put ComfyUI on ``sys.path`` for in-process use; ``cpu=None`` picks the CPU when CUDA is absent.

    Must run before anything imports ``comfy.model_management``.
    """
    import torch

    root = find_comfyui(explicit)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True
    return root


class Refused(Exception):
    """A problem the user can fix (arguments, folders, config, checkpoint, data): the command-line
    entry points report it and exit with status 2."""


def load_checkpoint_models(path: Path):
    """UNet, CLIP and VAE of a checkpoint, loaded exactly as ComfyUI's CheckpointLoaderSimple loads
    them (ComfyUI picks the storage dtype: fp16 weights of an fp16 checkpoint on a GPU). The training
    compute dtype (``TrainConfig.dtype``) is applied by the trainer, so the CLI and the nodes train
    the same way for the same config."""
    import comfy.sd

    try:
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    except Exception as e:  # noqa: BLE001
        raise Refused(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    if model is None or clip is None or vae is None:
        raise Refused(f"checkpoint {path} lacks a diffusion model, text encoder or VAE")
    return model, clip, vae


def import_pack(name: str = "comfyui_lord"):
    """Import this repository as a package named ``name``, the way ComfyUI imports a custom node
    (its modules use relative imports, so ``nodes`` never clashes with ComfyUI's ``nodes.py``)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ComfyUI server (``main.py``) on 127.0.0.1 with this pack installed as a custom node.

    ``base_dir`` becomes ComfyUI's base directory (models/, input/, output/, custom_nodes/, user/).
    ``with_pack=False`` starts the same server without any custom node (``--disable-all-custom-nodes``;
    e.g. the bare frontend's baseline). Saved images carry no metadata unless ``metadata=True``
    (then SaveImage embeds the prompt and the workflow in its PNGs, as a user's ComfyUI does).
    """

    def __init__(self, base_dir, comfyui: Optional[Path] = None, port: Optional[int] = None,
                 extra_args: tuple = (), extra_model_paths: Optional[Path] = None, log_path: Optional[Path] = None,
                 with_pack: bool = True, metadata: bool = False):
        self.base_dir = Path(base_dir)
        self.comfyui = comfyui or find_comfyui()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = tuple(extra_args)
        self.extra_model_paths = extra_model_paths
        self.log_path = Path(log_path or self.base_dir / "comfyui.log")
        self.with_pack = with_pack
        self.metadata = metadata
        self.proc: Optional[subprocess.Popen] = None

    def install_pack(self) -> Path:
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        link = nodes_dir / "ComfyUI-LoRD"
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        return link

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.with_pack:
            self.install_pack()
        for sub in ("models", "input", "output", "user", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(self.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch", "--dont-print-server"]
        if not self.metadata:
            cmd.append("--disable-metadata")
        if not self.with_pack:
            cmd.append("--disable-all-custom-nodes")
        import torch

        if not torch.cuda.is_available():
            cmd.append("--cpu")
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        cmd += list(self.extra_args)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfyui), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        ready = "/object_info/LoRDLoader" if self.with_pack else "/object_info/KSampler"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                info = self.get(ready, timeout=5)
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
                continue
            if info:
                return self
            self.stop()  # the server answers only after loading the custom nodes: the pack failed
            raise RuntimeError(f"ComfyUI came up without the node {ready.rsplit('/', 1)[1]} (the pack did not "
                               f"load); log:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"ComfyUI did not come up on {self.url} within {timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, payload: dict, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read().decode() or "{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")

    def run_prompt(self, prompt: dict, timeout: float = 300.0, extra_data: Optional[dict] = None) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history entry. ``extra_data`` is
        sent as the frontend sends it (``{"extra_pnginfo": {"workflow": <UI workflow>}}`` makes
        SaveImage embed the workflow in its PNGs when the server runs with ``metadata=True``).

        Raises ``RuntimeError`` with the server's validation errors when the prompt is refused.
        """
        payload = {"prompt": prompt, "client_id": "comfyui-lord"}
        if extra_data:
            payload["extra_data"] = extra_data
        status, body = self.post("/prompt", payload)
        if status != 200:
            raise RuntimeError(f"prompt refused ({status}): {json.dumps(body)[:4000]}")
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt; log:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)
