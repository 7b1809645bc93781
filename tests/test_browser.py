"""The shipped workflows in the real ComfyUI web UI, driven by headless Chromium.

One pinned ComfyUI server with this pack serves its bundled frontend (``comfyui_frontend_package``)
and Debian's ``chromium`` (``/usr/bin/chromium``, no browser download) opens it through Playwright.
For every file in ``workflows/`` the test does what a user does: drops the JSON file on the canvas
(a real ``drop`` event carrying the file, the frontend's own drop handler loads it), checks that no
missing-node or missing-model dialog opened, that the frontend kept every widget value of the file
(and that every combo value is one of the options the server offers), that the nodes do not overlap
and the saved view shows the whole graph, presses the **Run** button, waits until the server's
``/history`` has the prompt, and checks that the output nodes show their results in the page
(image previews on the nodes, the text of the *Preview Any* report nodes, the loss graphs).

Only speed settings differ from the shipped files, set through the page's widgets before Run
(``FAST_WIDGETS``: 2 trainer / sampler / attack steps, a 64x64 latent). Console errors are compared
with those of the bare frontend: a server without any custom node, the same page and a drop of its
default graph (requests to other hosts are left out: the test machine is offline). A PNG saved by
the UI's run of ``lord_defended_generation.json`` (SaveImage embeds the workflow) and every
``docs/examples/*.png`` are dropped too, and must load the workflow they carry.

The experiment runner's report page (``index.html`` of ``training.report.write_report`` on the
synthetic results of ``tools.report_results``, served over http by a stdlib server thread) is opened
too: Table I has its method rows, every picture (Fig. 7, ROC, sample grids) loaded, no console error
or failed request, and its full-page screenshot shows the table and each picture where the DOM puts
them (``report_index.png``).

A screenshot per workflow (after its run) goes to ``$LORD_ARTIFACTS/browser/`` (default: a pytest
temporary folder; the path is printed). ``make setup`` installs Chromium (as root) and Playwright.
Without them the tests are skipped, except under ``CI=true``, where they fail.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tools.comfy_server import ComfyServer

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
EXAMPLE_PNGS = sorted((ROOT / "docs" / "examples").glob("*.png"))
CHROMIUM = Path(os.environ.get("LORD_CHROMIUM", "/usr/bin/chromium"))
# Flags that work in containers and on an offline machine (no sandbox as root, no GPU, no updates).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
TIMEOUT_MS = 180_000  # page waits; generous for a 2-core CI machine
RUN_TIMEOUT_S = 600
TRAINING_STEPS = 2  # as tests/test_server.py
# The only widgets the test changes after the drop (node type -> widget -> value), so that every
# workflow runs in seconds on a CPU; everything else is queued as the file has it.
FAST_WIDGETS = {
    "LoRDTrainStage1": {"steps": TRAINING_STEPS},
    "LoRDTrainStage2": {"steps": TRAINING_STEPS},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "LoRDProtect": {"steps": 2},
}
NOTE_TYPES = ("Note", "MarkdownNote")
# Settings of a user who has used ComfyUI before: the default graph on first load (a new user gets
# the template browser instead) and no minimap over the graph in the screenshots.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
INIT_SCRIPT = "localStorage.setItem('vueNodesBannerDismissed', 'true')"  # the 'try Nodes 2.0' banner

_READY = "() => !!(window.app && app.vueAppReady && app.graph && app.canvas && document.getElementById('graph-canvas'))"
_UNBLOCKED = "() => !document.querySelector('.p-blockui-mask')"  # the workspace spinner is gone
_FREE_POINT = """() => {
  // a point on the bare canvas (no node, no DOM widget on top) to drop files at: a drop on a node
  // that takes files (Load Image) would go to that node instead of loading a workflow
  const c = document.getElementById('graph-canvas'), r = c.getBoundingClientRect();
  for (let fy = 0.9; fy > 0.1; fy -= 0.04) for (let fx = 0.1; fx < 0.95; fx += 0.04) {
    const x = r.x + r.width * fx, y = r.y + r.height * fy;
    if (document.elementFromPoint(x, y) !== c) continue;
    const p = app.canvas.ds.convertOffsetToCanvas([x - r.x, y - r.y]);
    if (!app.graph.getNodeOnPos(p[0], p[1])) return [x, y];
  }
  return null;
}"""
_DROP = """async ([b64, name, mime, x, y]) => {
  const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: mime}));
  const target = document.elementFromPoint(x, y);
  const init = {bubbles: true, cancelable: true, composed: true, dataTransfer: dt, clientX: x, clientY: y};
  for (const type of ['dragenter', 'dragover', 'drop']) target.dispatchEvent(new DragEvent(type, init));
}"""
_GRAPH = """() => ({
  nodes: app.graph.serialize().nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? null})),
  known: app.graph.nodes.filter(n => !!LiteGraph.registered_node_types[n.type]).map(n => n.id),
  bad_combos: app.graph.nodes.flatMap(n => (n.widgets || [])
      .filter(w => w.type === 'combo' && Array.isArray(w.options?.values) && !w.options.values.includes(w.value))
      .map(w => `node ${n.id} (${n.type}) ${w.name} = ${JSON.stringify(w.value)}, not among ${JSON.stringify(w.options.values)}`)),
})"""
_DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog, .p-toast-message'))
    .filter(e => e.offsetParent !== null || e.getClientRects().length).map(e => e.innerText.trim().slice(0, 500))"""
_LAYOUT = """() => {
  const ds = app.canvas.ds, edge = s => { const e = document.querySelector(s); return e ? e.getBoundingClientRect() : null; };
  const side = edge('.side-tool-bar-container'), tabs = edge('.workflow-tabs-container');
  const view = [side ? side.right : 0, tabs ? tabs.bottom : 0, window.innerWidth, window.innerHeight];
  const boxes = app.graph.nodes.map(n => { const b = n.getBounding();
    return {id: n.id, type: n.type, title: n.title, b: Array.from(b),
            screen: [(b[0] + ds.offset[0]) * ds.scale, (b[1] + ds.offset[1]) * ds.scale,
                     (b[0] + b[2] + ds.offset[0]) * ds.scale, (b[1] + b[3] + ds.offset[1]) * ds.scale]}; });
  return {view, scale: ds.scale, boxes};
}"""
_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
_SET_WIDGET = """([id, name, value]) => {
  const node = app.graph.getNodeById(id), w = node.widgets.find(w => w.name === name);
  w.value = value; w.callback?.(value, app.canvas, node);
  app.graph.setDirtyCanvas(true, true);
  return w.value;
}"""
# What the page shows for each node: image previews (loaded <img> elements of node.imgs) and the
# text widgets' values (the 'preview' widget of Preview Any).
_SHOWN = """() => Object.fromEntries(app.graph.nodes.map(n => [n.id, {
  imgs: (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src),
  preview: (n.widgets || []).filter(w => w.name === 'preview').map(w => String(w.value ?? '')),
}]))"""


# ------------------------------------------------------------------------------------------------
# Browser, servers and the console


def _require_browser():
    """Playwright and Debian's Chromium, or skip (fail under CI=true) with what to install."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package 'playwright' (pip install -r requirements-test.txt -c tests/constraints.txt)")
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing) + "; `make setup` installs both (Chromium as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


class Console:
    """Console errors (failed resource loads among them) and uncaught exceptions of a page, as keys:
    the first line of the message and the (path of the) URL it refers to, with the server's origin
    removed so that two servers on different ports compare equal. Requests to other hosts are left
    out (the test machine has no internet; the frontend asks api.comfy.org for news and node packs)."""

    def __init__(self, page, origin: str):
        self.origin, self.entries = origin, []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self._add("pageerror", str(e), ""))

    def _console(self, msg) -> None:
        if msg.type in ("error", "assert"):
            self._add(msg.type, msg.text, (msg.location or {}).get("url", ""))

    def _add(self, kind: str, text: str, url: str) -> None:
        if url.startswith(("http://", "https://")) and not url.startswith(self.origin):
            return
        first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
        if "net::ERR_NAME_NOT_RESOLVED" in first or "net::ERR_INTERNET_DISCONNECTED" in first:
            return
        path = url[len(self.origin):] if url.startswith(self.origin) else url
        self.entries.append((kind, first.replace(self.origin, ""), path.split("?")[0]))

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int) -> list:
        return self.entries[mark:]


def _write_settings(base: Path) -> None:
    folder = base / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps(UI_SETTINGS, indent=2))


def _open_page(browser, server: ComfyServer):
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(INIT_SCRIPT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console = Console(page, server.url)
    page.goto(server.url, timeout=TIMEOUT_MS)
    page.wait_for_function(_READY, timeout=TIMEOUT_MS)
    page.wait_for_function("() => app.graph.nodes.length > 0", timeout=TIMEOUT_MS)  # the default graph
    page.wait_for_function(_UNBLOCKED, timeout=TIMEOUT_MS)
    return context, page, console


def drop_file(page, name: str, data: bytes, mime: str) -> None:
    """Drop a file on a free spot of the canvas the way a user's drag and drop does. The graph on
    the canvas is cleared first, so that waiting for the dropped graph's nodes cannot be satisfied
    by the previous graph (the shipped workflows share node ids)."""
    page.wait_for_function(_UNBLOCKED, timeout=TIMEOUT_MS)
    page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")
    point = page.evaluate(_FREE_POINT)
    assert point, "no free spot on the canvas to drop a file on"
    page.evaluate(_DROP, [base64.b64encode(data).decode(), name, mime, point[0], point[1]])


def wait_for_graph(page, node_ids) -> dict:
    """Wait until the page's graph holds exactly ``node_ids`` and the spinner is gone."""
    ids = sorted(node_ids)
    page.wait_for_function("ids => JSON.stringify(app.graph.nodes.map(n => n.id).sort((a, b) => a - b)) === "
                           "JSON.stringify(ids)", arg=ids, timeout=TIMEOUT_MS)
    page.wait_for_function(_UNBLOCKED, timeout=TIMEOUT_MS)
    return page.evaluate(_GRAPH)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def artifacts(request, tmp_path_factory) -> Path:
    root = os.environ.get("LORD_ARTIFACTS")
    folder = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser_screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture:
        with capture.global_and_fixture_disabled():
            print(f"\n[browser] screenshots: {folder}")
    else:
        print(f"[browser] screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def small_example(tmp_path_factory, comfyui_path) -> Path:
    """ComfyUI's example.png at 128x128 (input/example.png of the detection workflow): the same
    picture, a fraction of the work on a CPU."""
    from PIL import Image

    out = tmp_path_factory.mktemp("example") / "example.png"
    with Image.open(comfyui_path / "input" / "example.png") as im:
        im.convert("RGB").resize((128, 128), Image.LANCZOS).save(out)
    return out


@pytest.fixture(scope="module")
def bare_errors(browser, make_comfy_base, comfyui_path) -> set:
    """Console errors of the bare frontend: a server without custom nodes, the page loaded and its
    default graph dropped back onto the canvas as a workflow file."""
    base = make_comfy_base("browser_bare")
    _write_settings(base)
    with ComfyServer(base, comfyui=comfyui_path, with_pack=False) as bare:
        context, page, console = _open_page(browser, bare)
        try:
            graph = page.evaluate("() => app.graph.serialize()")
            drop_file(page, "default.json", json.dumps(graph).encode(), "application/json")
            wait_for_graph(page, [n["id"] for n in graph["nodes"]])
            page.wait_for_timeout(1000)  # late errors of the drop
        finally:
            context.close()
    return set(console.entries)


@pytest.fixture(scope="module")
def server(make_comfy_base, comfyui_path, small_example):
    from lab.ship import CHECKPOINT_NAME, ensure_checkpoint

    base = make_comfy_base("browser_base", example=small_example)
    # the example PNGs' embedded workflows are set up for the lab model (docs/examples, README): offer it
    (base / "models" / "checkpoints" / CHECKPOINT_NAME).symlink_to(ensure_checkpoint())
    _write_settings(base)
    srv = ComfyServer(base, comfyui=comfyui_path, metadata=True)  # SaveImage embeds the workflow
    srv.start()
    yield srv
    srv.stop()


class UI:
    """The page of the server with the pack, shared by the tests of this module."""

    def __init__(self, page, console: Console, server: ComfyServer, load_errors: list):
        self.page, self.console, self.server, self.load_errors = page, console, server, load_errors
        self.runs: dict[str, dict] = {}  # workflow file name -> what its run queued and produced

    def new_errors(self, mark: int, baseline: set) -> list:
        return [e for e in self.console.since(mark) if e not in baseline]

    def click_run(self) -> str:
        """Press the Run (queue) button; returns the id of the prompt it queued."""
        button = self.page.locator('[data-testid="queue-button"] button').first
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                       timeout=TIMEOUT_MS) as response:
            button.click()
        body = response.value.json()
        assert response.value.ok and "prompt_id" in body, f"the server refused the queued prompt: {body}"
        return body["prompt_id"]

    def wait_for_history(self, prompt_id: str) -> dict:
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline:
            hist = self.server.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.server.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running; log:\n{self.server.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT_S} s; log:\n{self.server.log_tail()}")


@pytest.fixture(scope="module")
def ui(browser, server, bare_errors):
    context, page, console = _open_page(browser, server)
    try:
        yield UI(page, console, server, list(console.entries))
    finally:
        context.close()


# ------------------------------------------------------------------------------------------------
# Checks


def check_loaded(ui: UI, workflow: dict, graph: dict) -> None:
    """No missing node, no dialog, every widget value as in the file, every combo value valid."""
    missing = sorted({n["type"] for n in workflow["nodes"]} - {n["type"] for n in graph["nodes"] if n["id"] in graph["known"]})
    assert not missing, f"node types unknown to the frontend: {missing}"
    dialogs = ui.page.evaluate(_DIALOGS)
    assert not dialogs, f"the load opened dialogs or toasts: {dialogs}"
    loaded = {n["id"]: n for n in graph["nodes"]}
    for node in workflow["nodes"]:
        got = loaded[node["id"]]
        assert got["type"] == node["type"]
        assert got["widgets_values"] == node.get("widgets_values"), (
            f"node {node['id']} ({node['type']}): the frontend changed the widget values "
            f"{node.get('widgets_values')} into {got['widgets_values']}")
    assert not graph["bad_combos"], graph["bad_combos"]


def check_layout(ui: UI, name: str) -> None:
    """Readable: at least one note, no two nodes on top of each other, and the saved view
    (``extra.ds``) shows every node in a 1920x1080 window. Checked after the drop and again after
    the run, when nodes may have grown to show their previews (a trainer's live loss plot)."""
    layout = ui.page.evaluate(_LAYOUT)
    boxes = layout["boxes"]
    assert any(b["type"] in NOTE_TYPES for b in boxes), f"{name} has no Note explaining it"
    overlaps = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["b"], b["b"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                overlaps.append(f"{a['id']} ({a['title']}) and {b['id']} ({b['title']})")
    assert not overlaps, f"{name}: overlapping nodes: {overlaps}"
    x0, y0, x1, y1 = layout["view"]
    outside = [f"{b['id']} ({b['title']})" for b in boxes
               if b["screen"][0] < x0 - 1 or b["screen"][1] < y0 - 1 or b["screen"][2] > x1 + 1 or b["screen"][3] > y1 + 1]
    assert not outside, (f"{name}: with its saved view (extra.ds, scale {layout['scale']:.2f}) these nodes are not "
                         f"(fully) visible in a {VIEWPORT['width']}x{VIEWPORT['height']} window: {outside}")


def set_fast_widgets(ui: UI, workflow: dict) -> dict:
    """Lower the step counts and the latent size through the page (FAST_WIDGETS); returns
    {node id: {widget: value}} of what was changed."""
    changed = {}
    for node in workflow["nodes"]:
        for name, value in FAST_WIDGETS.get(node["type"], {}).items():
            assert ui.page.evaluate(_SET_WIDGET, [node["id"], name, value]) == value
            changed.setdefault(node["id"], {})[name] = value
    return changed


def check_results_shown(ui: UI, entry: dict) -> dict:
    """Every output of the run is on its node in the page: each image the server made is a loaded
    preview of its node, each Preview Any shows its text. Returns what the page shows."""
    outputs = entry["outputs"]
    expected_imgs = {nid: [i["filename"] for i in out.get("images", [])] for nid, out in outputs.items() if out.get("images")}
    previews = {nid for nid, out in outputs.items() if out.get("text")}
    ui.page.wait_for_function("""([imgs, texts]) => Object.entries(imgs).every(([id, names]) => {
        const n = app.graph.getNodeById(Number(id));
        const loaded = (n?.imgs || []).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src);
        return names.every(f => loaded.some(src => src.includes(encodeURIComponent(f))));
      }) && texts.every(id => { const n = app.graph.getNodeById(Number(id));
        const w = (n?.widgets || []).find(w => w.name === 'preview'); return !w || String(w.value ?? '').length > 0; })""",
                              arg=[expected_imgs, sorted(previews)], timeout=TIMEOUT_MS)
    shown = ui.page.evaluate(_SHOWN)
    types = {n["id"]: n["type"] for n in ui.page.evaluate(_GRAPH)["nodes"]}
    for nid in previews:
        if types.get(int(nid)) == "PreviewAny":
            assert shown[nid]["preview"] == [outputs[nid]["text"][0]], (nid, shown[nid], outputs[nid])
    return shown


# ------------------------------------------------------------------------------------------------
# Tests


def test_page_loads_with_the_pack_without_new_console_errors(ui, bare_errors):
    new = [e for e in ui.load_errors if e not in bare_errors]
    assert not new, f"console errors the bare frontend does not log: {new}"
    info = ui.server.get("/object_info/LoRDLoader")
    assert "LoRDLoader" in info
    assert ui.page.evaluate("() => !!LiteGraph.registered_node_types['LoRDLoader']")


def run_dropped_workflow(ui: UI, path: Path, artifacts: Path, bare_errors: set) -> dict:
    """Drop, check, lower the step counts, press Run, wait, check the results; returns the run."""
    workflow = json.loads(path.read_text())
    mark = ui.console.mark()
    drop_file(ui.page, path.name, path.read_bytes(), "application/json")
    graph = wait_for_graph(ui.page, [n["id"] for n in workflow["nodes"]])
    check_loaded(ui, workflow, graph)
    check_layout(ui, path.name)
    changed = set_fast_widgets(ui, workflow)
    queued = ui.page.evaluate("() => app.graph.serialize()")
    prompt_id = ui.click_run()
    entry = ui.wait_for_history(prompt_id)
    status = entry["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", f"{path.name} failed: {json.dumps(errors)[:3000]}"
    shown = check_results_shown(ui, entry)
    ui.page.wait_for_function(_UNBLOCKED, timeout=TIMEOUT_MS)
    ui.page.evaluate("() => app.graph.setDirtyCanvas(true, true)")
    ui.page.evaluate(_FRAMES)  # nodes take the size their previews need when drawn
    shot = artifacts / f"{path.stem}.png"
    ui.page.screenshot(path=str(shot))
    check_layout(ui, f"{path.name} after its run (screenshot {shot})")
    new = ui.new_errors(mark, bare_errors)
    assert not new, f"{path.name}: console errors the bare frontend does not log: {new}"
    run = {"entry": entry, "queued": queued, "changed": changed, "shown": shown, "screenshot": shot}
    ui.runs[path.name] = run
    return run


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_dropped_workflow_runs_from_the_run_button(ui, artifacts, bare_errors, workflow):
    run = run_dropped_workflow(ui, workflow, artifacts, bare_errors)
    entry, shown = run["entry"], run["shown"]
    outputs = entry["outputs"]
    assert outputs, f"{workflow.name} produced no output"
    for nid, out in outputs.items():
        if out.get("images"):
            assert shown[nid]["imgs"], f"node {nid} shows none of its images"
    types = {str(n["id"]): n["type"] for n in run["queued"]["nodes"]}
    if any(t.startswith("LoRDTrain") for t in types.values()):
        graphs = [nid for nid, t in types.items() if t == "LossGraphNode"]
        assert graphs and all(shown[nid]["imgs"] for nid in graphs), "the loss graph is not shown"
        reports = [json.loads(shown[nid]["preview"][0]) for nid, t in types.items() if t == "PreviewAny"]
        assert [r["final"]["step"] for r in reports] == [TRAINING_STEPS]


def test_png_with_embedded_workflow_loads_from_a_drop(ui, artifacts, bare_errors):
    """The image SaveImage wrote in the UI's run of lord_defended_generation.json carries the
    workflow (PNG text chunk 'workflow'); dropping it on the canvas loads that workflow."""
    from PIL import Image

    name = "lord_defended_generation.json"
    run = ui.runs.get(name) or run_dropped_workflow(ui, ROOT / "workflows" / name, artifacts, bare_errors)
    saved = [img for out in run["entry"]["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved, "the generation saved no image"
    png = ui.server.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    with Image.open(png) as im:
        embedded = json.loads(im.info["workflow"])
    assert {n["id"]: n["type"] for n in embedded["nodes"]} == {n["id"]: n["type"] for n in run["queued"]["nodes"]}
    drop_and_check_png(ui, png, embedded, bare_errors)
    # what the PNG brought back is the graph that was queued, the lowered step counts included
    graph = ui.page.evaluate(_GRAPH)
    queued = {n["id"]: n.get("widgets_values") for n in run["queued"]["nodes"]}
    assert {n["id"]: n["widgets_values"] for n in graph["nodes"]} == queued


def drop_and_check_png(ui: UI, png: Path, embedded: dict, bare_errors: set) -> None:
    mark = ui.console.mark()
    drop_file(ui.page, png.name, png.read_bytes(), "image/png")
    graph = wait_for_graph(ui.page, [n["id"] for n in embedded["nodes"]])
    check_loaded(ui, embedded, graph)
    new = ui.new_errors(mark, bare_errors)
    assert not new, f"{png.name}: console errors the bare frontend does not log: {new}"


@pytest.mark.parametrize("png", EXAMPLE_PNGS or [None], ids=[p.name for p in EXAMPLE_PNGS] or ["none"])
def test_example_png_loads_its_workflow_from_a_drop(ui, bare_errors, png):
    if png is None:
        pytest.skip("no docs/examples/*.png yet")
    from PIL import Image

    with Image.open(png) as im:
        assert "workflow" in im.info, f"{png} has no embedded workflow (PNG text chunk 'workflow')"
        embedded = json.loads(im.info["workflow"])
    drop_and_check_png(ui, png, embedded, bare_errors)


def test_the_checks_catch_a_missing_node_and_an_unknown_file(ui, tmp_path):
    """The checks above can fail: a workflow with a node type nobody registered opens the frontend's
    missing-node dialog and a combo value the server does not offer is reported. (Runs last: it
    leaves a dialog open.)"""
    workflow = json.loads((ROOT / "workflows" / "lord_detect.json").read_text())
    loader = next(n for n in workflow["nodes"] if n["type"] == "LoRDLoader")
    loader["widgets_values"][0] = "no_such_file.safetensors"
    bad = tmp_path / "bad_combo.json"
    bad.write_text(json.dumps(workflow))
    drop_file(ui.page, bad.name, bad.read_bytes(), "application/json")
    graph = wait_for_graph(ui.page, [n["id"] for n in workflow["nodes"]])
    with pytest.raises(AssertionError, match="no_such_file.safetensors"):
        check_loaded(ui, workflow, graph)

    workflow["nodes"][0]["type"] = "LoRDNoSuchNode"
    missing = tmp_path / "missing_node.json"
    missing.write_text(json.dumps(workflow))
    drop_file(ui.page, missing.name, missing.read_bytes(), "application/json")
    graph = wait_for_graph(ui.page, [n["id"] for n in workflow["nodes"]])
    ui.page.wait_for_function(_DIALOGS.replace("() =>", "() => (") + ").length > 0", timeout=TIMEOUT_MS)
    with pytest.raises(AssertionError, match="LoRDNoSuchNode"):
        check_loaded(ui, workflow, graph)
    assert any("LoRDNoSuchNode" in text for text in ui.page.evaluate(_DIALOGS))


# ------------------------------------------------------------------------------------------------
# The experiment report page (training.report.write_report's index.html)

REPORT_VIEWPORT = {"width": 1280, "height": 900}  # the page is at most 1200 px wide
# Where things are on the report page, in page (document) coordinates, which are those of a
# full-page screenshot: Table I (the table right after the "Table I" heading) with the first cell of
# each body row, every <img> with its load state, and the size of the whole document.
_REPORT_DOM = """() => {
  const box = e => { const r = e.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}; };
  const h2 = Array.from(document.querySelectorAll('h2')).find(h => h.textContent.startsWith('Table I'));
  const table = h2 && h2.nextElementSibling && h2.nextElementSibling.tagName === 'TABLE' ? h2.nextElementSibling : null;
  return {
    table: table && {header: Array.from(table.rows[0].cells).map(c => c.textContent.trim()),
                     rows: Array.from(table.rows).slice(1).map(r => Array.from(r.cells).map(c => c.textContent.trim())),
                     box: box(table)},
    imgs: Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                 width: i.naturalWidth, height: i.naturalHeight, box: box(i)})),
    size: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        # Chromium asks every http origin for /favicon.ico by itself (the report links none); its 404
        # would be a console error that is not the page's, so the server answers "no content"
        if self.path.split("?")[0] == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """The folder on http://127.0.0.1:<free port>/ from a stdlib server thread, the way a user
    serves a report folder (``python -m http.server``)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def open_report(browser, folder: Path, shot: Path) -> dict:
    """Open ``folder/index.html`` over http, wait for the load event (which waits for every image),
    take a full-page screenshot into ``shot``; returns the DOM facts (``_REPORT_DOM``), the console
    errors and the failed requests (network failures and HTTP status >= 400)."""
    with serve_folder(folder) as origin:
        context = browser.new_context(viewport=REPORT_VIEWPORT)
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            console = Console(page, origin)
            failed = []
            page.on("requestfailed", lambda r: failed.append(f"{r.url.replace(origin, '')}: {r.failure}"))
            page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.url.replace(origin, '')}: HTTP {r.status}"))
            page.goto(f"{origin}/index.html", wait_until="load", timeout=TIMEOUT_MS)
            page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=TIMEOUT_MS)
            page.evaluate(_FRAMES)
            info = page.evaluate(_REPORT_DOM)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    info.update(errors=list(console.entries), failed=failed, shot=shot)
    return info


def check_report_page(info: dict, folder: Path) -> None:
    """Table I has one row per method, in order; every picture the report wrote is on the page and
    loaded at its file's size; no console error, no failed request."""
    from PIL import Image

    from tools.report_results import METHODS

    table = info["table"]
    assert table, "no <table> after the 'Table I' heading"
    assert table["header"][0] == "Method", table["header"]
    assert [r[0] for r in table["rows"]] == [m[1] for m in METHODS], table["rows"]
    lord = next(r for r in table["rows"] if r[0] == "LoRD")
    assert "0.556 ± 0.033" in lord, lord
    expected = {"fig7.png", "roc.png", "grid_all.png"} | {f"grid_{m[0]}.png" for m in METHODS}
    assert {i["src"] for i in info["imgs"]} == expected
    broken = [i["src"] for i in info["imgs"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    for img in info["imgs"]:
        with Image.open(folder / img["src"]) as im:
            assert (img["width"], img["height"]) == im.size, (img["src"], im.size)
    assert not info["failed"], f"failed requests: {info['failed']}"
    assert not info["errors"], f"console errors: {info['errors']}"


def _crop_stats(shot, box: dict):
    """Mean colour and standard deviation of the screenshot inside ``box`` (its 1-px CSS border
    and a pixel more left out)."""
    import numpy as np

    x0, y0 = int(box["x"]) + 2, int(box["y"]) + 2
    x1, y1 = int(box["x"] + box["width"]) - 2, int(box["y"] + box["height"]) - 2
    assert x1 - x0 >= 20 and y1 - y0 >= 20, f"tiny region {box}"
    crop = np.asarray(shot.crop((x0, y0, x1, y1)), dtype=np.float64)
    return crop.reshape(-1, 3).mean(axis=0), float(crop.std())


def check_screenshot(info: dict, folder: Path) -> None:
    """The full-page screenshot is the whole page and not blank: Table I and every picture show up
    in it where the DOM puts them, each region far from uniform, each picture with the mean colour
    of its file (a broken-image icon or an empty box is near white)."""
    import numpy as np
    from PIL import Image

    with Image.open(info["shot"]) as im:
        shot = im.convert("RGB")
    assert list(shot.size) == info["size"], (shot.size, info["size"])
    assert shot.width >= 800 and shot.height >= 3000, shot.size
    assert float(np.asarray(shot, dtype=np.float64).std()) > 20, "the screenshot is (nearly) uniform"
    _, spread = _crop_stats(shot, info["table"]["box"])
    assert spread > 20, f"Table I looks empty in the screenshot (std {spread:.1f})"
    for img in info["imgs"]:
        mean, spread = _crop_stats(shot, img["box"])
        assert spread > 10, f"{img['src']} looks uniform in the screenshot (std {spread:.1f})"
        with Image.open(folder / img["src"]) as im:
            want = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - want).max() < 8, f"{img['src']}: mean colour {mean.round(1)} in the screenshot, {want.round(1)} in the file"


def _write_report(folder: Path) -> None:
    from tools.report_results import make_results
    from training.report import write_report

    write_report(make_results(folder), folder)


def test_report_page_shows_table_plots_and_grids(browser, artifacts, tmp_path):
    """The experiment runner's report (``index.html`` of ``training.report.write_report``, served
    over http) in Chromium: Table I, Fig. 7, the ROC curve and the sample grids are on the page and
    in its full-page screenshot (``$LORD_ARTIFACTS/browser/report_index.png``)."""
    folder = tmp_path / "report"
    _write_report(folder)
    info = open_report(browser, folder, artifacts / "report_index.png")
    check_report_page(info, folder)
    check_screenshot(info, folder)


def test_report_page_checks_catch_a_missing_image_and_a_blank_shot(browser, tmp_path):
    """The checks above can fail: a picture missing from the folder (a 404 and a broken <img>) and
    a blank screenshot are reported."""
    from PIL import Image

    folder = tmp_path / "report"
    _write_report(folder)
    (folder / "grid_lord.png").unlink()
    info = open_report(browser, folder, tmp_path / "missing_image.png")
    with pytest.raises(AssertionError, match="grid_lord.png"):
        check_report_page(info, folder)
    assert any("/grid_lord.png: HTTP 404" in f for f in info["failed"]), info["failed"]

    Image.new("RGB", tuple(info["size"]), "white").save(tmp_path / "blank.png")
    with pytest.raises(AssertionError, match="uniform"):
        check_screenshot({**info, "shot": tmp_path / "blank.png"}, folder)
