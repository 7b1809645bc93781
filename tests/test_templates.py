"""The shipped workflows in the frontend's template browser, and the README's example PNGs.

Through a real ComfyUI server with the pack installed as ``custom_nodes/ComfyUI-LoRD``: ComfyUI
lists a pack's ``workflows/*.json`` under ``GET /workflow_templates`` (keyed by the pack's folder)
and serves the folder at ``/api/workflow_templates/<folder>/``; the bundled frontend shows each
template with the thumbnail ``<name>.<ext>`` from there (``ext`` read from the frontend itself).
The thumbnails and ``docs/examples/*.png`` are made by ``lab/make_template_thumbnails.py``.
"""
from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools.comfy_server import ComfyServer

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.png"))
MAX_BYTES = 150_000
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # never sent to the server
REGENERATE = "run: python -m lab.make_template_thumbnails"


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_path):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_templates"), comfyui=comfyui_path)
    srv.start()
    srv.pack_folder = srv.install_pack().name
    yield srv
    srv.stop()


def fetch(server, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


def frontend_thumbnail_extension() -> str:
    """The file extension the bundled frontend asks for when it shows a custom node's template."""
    import comfyui_frontend_package

    assets = Path(comfyui_frontend_package.__file__).parent / "static" / "assets"
    found = set()
    for js in assets.glob("*.js"):
        found |= set(re.findall(r'mediaSubtype:"(\w+)",description:\w+,sourceModule', js.read_text(errors="replace")))
    assert len(found) == 1, f"cannot tell the frontend's thumbnail type for custom-node templates: {found}"
    return found.pop()


def test_template_browser_lists_every_workflow_once(server):
    listing = server.get("/workflow_templates")
    names = listing.get(server.pack_folder)
    assert names is not None, f"the pack is not in /workflow_templates: {sorted(listing)}"
    assert sorted(names) == [wf.stem for wf in WORKFLOWS]  # each once (one template folder, no copies)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[wf.stem for wf in WORKFLOWS])
def test_template_json_and_thumbnail_are_served(server, workflow):
    from PIL import Image

    base = f"/api/workflow_templates/{server.pack_folder}/{workflow.stem}"
    status, _, body = fetch(server, base + ".json")  # what the frontend loads when the template is picked
    assert status == 200 and json.loads(body) == json.loads(workflow.read_text(encoding="utf-8"))
    ext = frontend_thumbnail_extension()
    status, ctype, body = fetch(server, f"{base}.{ext}")
    assert status == 200, f"no thumbnail {workflow.stem}.{ext} ({REGENERATE})"
    assert ctype.startswith("image/") and 0 < len(body) <= MAX_BYTES, (ctype, len(body))
    with Image.open(io.BytesIO(body)) as im:
        im.verify()
        assert min(im.size) >= 64


def test_no_thumbnail_without_its_workflow():
    for thumb in (ROOT / "workflows").iterdir():
        if thumb.suffix != ".json":
            assert thumb.with_suffix(".json").is_file(), f"{thumb.name} has no workflow"


def test_example_pngs_exist_and_are_in_the_readme():
    assert len(EXAMPLES) >= 2, REGENERATE
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for png in EXAMPLES:
        assert png.stat().st_size <= MAX_BYTES, png
        assert f"docs/examples/{png.name}" in readme, f"{png.name} is not shown in the README"


@pytest.mark.parametrize("png", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_png_carries_a_loadable_workflow(server, png):
    """The PNG has ComfyUI's ``workflow`` (UI graph) and ``prompt`` (API graph) chunks, and every
    node in them is a node this server knows (this pack's or core's)."""
    from PIL import Image

    with Image.open(png) as im:
        chunks = {k: v for k, v in im.info.items() if isinstance(v, str)}
    assert "workflow" in chunks and "prompt" in chunks, f"{png.name}: no embedded workflow ({REGENERATE})"
    workflow, prompt = json.loads(chunks["workflow"]), json.loads(chunks["prompt"])
    info = server.object_info()
    types = {n["type"] for n in workflow["nodes"]}
    assert types - FRONTEND_ONLY <= set(info), f"unknown node types {types - FRONTEND_ONLY - set(info)}"
    assert any(info[t]["python_module"].startswith("custom_nodes.") for t in types - FRONTEND_ONLY)
    assert {n["class_type"] for n in prompt.values()} <= set(info)
    # the embedded graph is one of the shipped workflows (its node types), not a stale one
    shipped = [{n["type"] for n in json.loads(wf.read_text(encoding="utf-8"))["nodes"]} - FRONTEND_ONLY for wf in WORKFLOWS]
    assert types - FRONTEND_ONLY in shipped, f"{png.name} embeds a workflow none of workflows/*.json matches ({REGENERATE})"
