"""The test harness's real ComfyUI server: ``main.py`` started on 127.0.0.1 with this pack installed as
a custom node, driven through its HTTP API (the tests, the demo, the template thumbnails)."""
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

from lord_ops.comfy.bootstrap import REPO_ROOT, find_comfyui


def error_summary(entry: dict) -> str:
    """A history entry's execution error in one line: ``<node type> (node <id>): <exception message>``
    (the whole ``messages`` list also holds every input tensor's repr, thousands of lines)."""
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
    return f"status {(entry.get('status') or {}).get('status_str')!r}, no execution_error message"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
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
