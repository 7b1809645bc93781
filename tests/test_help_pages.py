"""Node help pages (``web/docs/<NodeId>.md``) in step with the node schemas, and served where the
frontend's node-help panel reads them.

The schemas are the real ones: each node class's ``GET_NODE_INFO_V1()``, which is what ComfyUI's
``/object_info`` returns for a V3 node. The frontend (comfyui_frontend_package, ``NodeHelpService``)
fetches ``/extensions/<pack>/docs/<NodeId>/<locale>.md`` and falls back to
``/extensions/<pack>/docs/<NodeId>.md``, where ``<pack>`` is the second part of the node's
``python_module`` (``custom_nodes.<folder>``); relative image links resolve against
``/extensions/<pack>/docs/``.
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfyui_lord import WEB_DIRECTORY
from comfyui_lord import nodes as pack_nodes

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / WEB_DIRECTORY / "docs").resolve()
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MAX_IMAGE_BYTES = 100_000


@pytest.fixture(scope="module")
def infos() -> dict[str, dict]:
    pack_nodes.register_model_folder()
    return {info["name"]: info for info in (cls.GET_NODE_INFO_V1() for cls in pack_nodes.NODES)}


def inputs_of(info: dict) -> dict[str, dict]:
    return {name: spec[1] if len(spec) > 1 else {} for section in ("required", "optional")
            for name, spec in info["input"].get(section, {}).items()}


def page(node_id: str) -> str:
    return (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


def test_every_node_has_a_page_and_every_page_a_node(infos):
    assert len(infos) == len(pack_nodes.NODES) >= 10
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert set(infos) - pages == set(), "nodes without a help page in web/docs/"
    assert pages - set(infos) == set(), "help pages for nodes the pack does not have (renamed?)"


def test_every_input_and_output_is_documented_on_the_page(infos):
    missing = []
    for node_id, info in infos.items():
        text = page(node_id)
        assert text.lstrip().startswith(f"# {info['display_name']}"), f"{node_id}.md must start with '# {info['display_name']}'"
        for name in inputs_of(info):
            if f"`{name}`" not in text:
                missing.append(f"{node_id}: input `{name}`")
        for name in info["output_name"]:
            if f"`{name}`" not in text:
                missing.append(f"{node_id}: output `{name}`")
        for heading in ("## Inputs", "## Outputs", "## Example"):
            if heading not in text:
                missing.append(f"{node_id}: section '{heading}'")
    assert not missing, "help pages out of step with the node schemas:\n" + "\n".join(missing)


def test_every_node_has_a_description_and_every_input_and_output_a_tooltip(infos):
    missing = []
    for node_id, info in infos.items():
        if not (info.get("description") or "").strip():
            missing.append(f"{node_id}: description")
        missing += [f"{node_id}: input {name}" for name, opts in inputs_of(info).items() if not opts.get("tooltip")]
        missing += [f"{node_id}: output {name}" for name, tip in zip(info["output_name"], info["output_tooltips"]) if not tip]
    assert not missing, "missing description/tooltips:\n" + "\n".join(missing)


def page_images(node_id: str) -> list[str]:
    return [link for link in IMAGE_LINK.findall(page(node_id)) if not link.startswith(("http://", "https://"))]


def test_page_images_exist_are_png_and_small(infos):
    linked = set()
    for node_id in infos:
        for link in page_images(node_id):
            assert not link.startswith("/"), f"{node_id}.md: image {link} must be relative to docs/ (the frontend prefixes it)"
            path = (DOCS / link).resolve()
            assert path.is_relative_to(DOCS) and path.is_file(), f"{node_id}.md links a missing image {link}"
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{link} is not a PNG"
            assert len(data) < MAX_IMAGE_BYTES, f"{link} is {len(data)} bytes (keep pictures under 100 KB)"
            linked.add(path)
    assert {"LoRDDetect", "LoRDProtect"} <= {n for n in infos if page_images(n)}, "Detect and Protect pages need a picture"
    unused = {p for p in DOCS.rglob("*.png")} - linked
    assert not unused, f"pictures no page links: {sorted(str(p.relative_to(DOCS)) for p in unused)}"


def test_the_installed_frontend_reads_the_layout_we_ship():
    """The URL pattern in the frontend bundle ComfyUI serves (a new frontend that moves the docs fails here)."""
    frontend = pytest.importorskip("comfyui_frontend_package")
    bundle = "".join(p.read_text(encoding="utf-8", errors="replace")
                     for p in (Path(frontend.__file__).parent / "static" / "assets").glob("index-*.js"))
    assert re.search(r"`/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md`", bundle), "frontend no longer reads docs/<NodeId>.md"
    assert re.search(r'split\("\."\)[^}]{0,80}"custom_nodes"', bundle), "frontend no longer takes the pack from python_module"


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.mark.server
def test_server_serves_each_page_and_picture_at_the_frontends_url(tmp_path_factory, comfyui_path, infos):
    from tools.comfy_server import ComfyServer

    with ComfyServer(tmp_path_factory.mktemp("help_base"), comfyui=comfyui_path) as srv:
        for node_id in infos:
            module = srv.get(f"/object_info/{node_id}")[node_id]["python_module"]
            parts = module.split(".")
            assert parts[0] == "custom_nodes" and len(parts) >= 2, module
            base = f"{srv.url}/extensions/{parts[1].split('@')[0]}/docs/"  # the frontend's getNodeHelpBaseUrl
            status, body = fetch(f"{base}{node_id}.md")
            assert status == 200 and body == (DOCS / f"{node_id}.md").read_bytes(), f"{base}{node_id}.md: {status}"
            for link in page_images(node_id):
                status, body = fetch(base + link)
                assert status == 200 and body == (DOCS / link).read_bytes(), f"{base}{link}: {status}"


@pytest.mark.parametrize("node_id", ["LoRDTrainStage1", "LoRDTrainStage2"])
def test_trainer_pages_say_what_cancel_keeps(node_id):
    text = page(node_id)
    assert "## Cancel" in text
    section = text.split("## Cancel", 1)[1].split("\n## ", 1)[0]
    for needed in ("output/lord_training/<run_name>/checkpoint.pt", "optimizer state", "step", "resume"):
        assert needed in section, f"{node_id}.md, Cancel: say {needed!r}"
