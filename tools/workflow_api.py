"""Turn a UI-format ComfyUI workflow (what the frontend saves) into an API prompt, and run it.

The conversion follows what the ComfyUI frontend (1.32) does when you press *Queue* (its
``graphToPrompt``), driven only by the server's ``/object_info``:

* Frontend-only nodes (``Note``, ``MarkdownNote``, ``PrimitiveNode``, ``Reroute``) are dropped.
  Links through ``Reroute`` nodes are followed; a ``PrimitiveNode`` feeding a widget input gives
  that input its value.
* Muted nodes (``mode`` 2) are dropped, and so are inputs linked to them. Bypassed nodes (``mode``
  4) are dropped and each of their outputs is wired to the input the frontend would pick: the
  input at the same index when its type fits, else the first input of the same type.
* ``widgets_values`` are assigned to the node's widget inputs in the order the frontend creates
  the widgets: ``input_order`` (required, then optional; dict order when absent). An INT input
  whose spec has ``control_after_generate`` (or, when the key is absent, one named ``seed`` or
  ``noise_seed``) is followed by one extra value ("fixed", "randomize", ...), a COMBO with
  ``control_after_generate`` by two (mode and filter list); these are skipped, as are values after
  the last widget (e.g. LoadImage's ``"image"`` upload-button value). A widget input with a link
  still consumes its value; the link wins.
* Widget types: INT, FLOAT, STRING, BOOLEAN, COMBO (both ``[[options...], {...}]`` and
  ``["COMBO", {"options": [...]}]``), plus the single-value frontend widgets MARKDOWN, TEXTAREA and
  COLOR. ``forceInput`` inputs and every other type are sockets. STRING widgets with
  ``dynamicPrompts`` get the frontend's ``{a|b}`` / comment processing.
* Not handled (raise ``ValueError`` or are passed as saved): subgraphs and group nodes, nodes with
  frontend-only widgets (webcam, 3D viewers), and the frontend's ``%date:...%`` /
  ``%Node.widget%`` expansion of ``filename_prefix``.

Pure Python: nothing here imports ComfyUI.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

# Nodes that exist only in the frontend (never sent to the server).
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# LiteGraph node modes.
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# The pack's trainer nodes (the workflows whose steps the demo, the tests and the thumbnails lower).
TRAINER_NODES = ("LoRDTrainStage1", "LoRDTrainStage2")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "TEXTAREA", "COLOR"}
# Frontend widgets whose values this converter cannot reproduce (webcam capture, 3D viewers...).
UNSUPPORTED_WIDGET_TYPES = {"WEBCAM", "LOAD_3D", "LOAD_3D_ANIMATION", "PREVIEW_3D", "PREVIEW_3D_ANIMATION",
                            "IMAGECOMPARE", "CHART", "GALLERIA", "AUDIO_UI", "AUDIO_RECORD", "AUDIOUPLOAD"}


# ----------------------------------------------------------------------------------------------
# /object_info helpers


def _spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _spec_type(spec) -> str:
    """``"COMBO"`` for legacy ``[[options...], {...}]`` specs, else the declared type (or its ``widgetType``)."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(t, (list, tuple)):
        return "COMBO"
    return _spec_options(spec).get("widgetType") or str(t)


def ordered_inputs(info: dict) -> list[tuple[str, Any]]:
    """``(name, spec)`` of a node's required then optional inputs in the order the frontend builds them."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out, seen = [], set()
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in (order.get(section) or []) if order else list(specs):
            if name in specs and name not in seen:
                out.append((name, specs[name]))
                seen.add(name)
    for section in ("required", "optional"):  # any input input_order left out comes last
        for name, spec in (inputs.get(section) or {}).items():
            if name not in seen:
                out.append((name, spec))
                seen.add(name)
    return out


def is_widget_input(spec) -> bool:
    return _spec_type(spec) in WIDGET_TYPES and not _spec_options(spec).get("forceInput")


def control_values_after(name: str, spec) -> int:
    """How many frontend-only values follow this widget's own value in ``widgets_values``."""
    t, opts = _spec_type(spec), _spec_options(spec)
    cag = opts.get("control_after_generate")
    if t == "INT":
        # frontend: ``control_after_generate ?? ["seed", "noise_seed"].includes(name)``
        return 1 if (cag if cag is not None else name in ("seed", "noise_seed")) else 0
    if t == "COMBO" and cag:
        return 2  # control mode + "control_filter_list"
    return 0


def widget_inputs(info: dict) -> list[tuple[str, Any, int]]:
    """``(name, spec, extra_values_after)`` for the node's widget inputs, in ``widgets_values`` order."""
    return [(n, s, control_values_after(n, s)) for n, s in ordered_inputs(info) if is_widget_input(s)]


# ----------------------------------------------------------------------------------------------
# Frontend value processing


def process_dynamic_prompt(text: str, rng: random.Random) -> str:
    """The frontend's dynamic prompt expansion: strip ``/* */`` and ``//`` comments, pick one
    option of each ``{a|b|c}`` (nested allowed), ``\\{`` ``\\|`` ``\\}`` are literals."""
    import re

    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    pos = 0

    def escape() -> str:
        nonlocal pos
        ch = text[pos] if pos < len(text) else ""
        pos += 1
        return "\\" + ch

    def choice_block() -> str:
        nonlocal pos
        options, current, depth = [], "", 0
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == "\\":
                current += escape()
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if not depth:
                    break
                depth -= 1
            elif ch == "|" and not depth:
                options.append(current)
                current = ""
                continue
            current += ch
        options.append(current)
        return process_dynamic_prompt(rng.choice(options), rng)

    out = ""
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if ch == "\\":
            out += escape()
        elif ch == "{":
            out += choice_block()
        else:
            out += ch
    return re.sub(r"\\([{}|])", r"\1", out)


# ----------------------------------------------------------------------------------------------
# Graph helpers


def _links(workflow: dict) -> dict[int, tuple]:
    """link id -> ``(origin_id, origin_slot, target_id, target_slot, type)``; both saved forms."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return out


def _valid_connection(a, b) -> bool:
    """LiteGraph.isValidConnection: ``*``/empty match anything; comma lists match on any member."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0):
        return True
    a, b = str(a).lower(), str(b).lower()
    if a == b:
        return True
    if "," not in a and "," not in b:
        return False
    return bool(set(a.split(",")) & set(b.split(",")))


def _describe(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


class _Resolver:
    """Follows a link back to the node that really produces the value (frontend ExecutableNodeDTO)."""

    def __init__(self, workflow: dict):
        self.nodes = {n["id"]: n for n in workflow.get("nodes") or []}
        self.links = _links(workflow)

    def input_link(self, node: dict, index: int):
        inputs = node.get("inputs") or []
        if not 0 <= index < len(inputs):
            return None
        link_id = inputs[index].get("link")
        return self.links.get(link_id) if link_id is not None else None

    def resolve_input(self, node: dict, index: int, want_type=None, seen=frozenset()):
        """Source of input ``index`` of ``node``: ``("link", id, slot)``, ``("value", v)`` or None."""
        link = self.input_link(node, index)
        if link is None:
            return None
        origin = self.nodes.get(link[0])
        if origin is None:
            return None
        if want_type is None:
            want_type = (node.get("inputs") or [])[index].get("type")
        return self.resolve_output(origin, link[1], want_type, seen)

    def resolve_output(self, node: dict, slot: int, want_type, seen):
        key = (node["id"], slot)
        if key in seen:
            raise ValueError(f"{_describe(node)}: circular link through bypassed/reroute nodes.")
        seen = seen | {key}
        mode, ntype = node.get("mode", MODE_ALWAYS), node.get("type")
        if mode == MODE_BYPASS and ntype not in VIRTUAL_NODES:
            index = self._bypass_input(node, slot, want_type)
            return None if index is None else self.resolve_input(node, index, None, seen)
        if ntype == "Reroute":
            return self.resolve_input(node, 0, want_type, seen)
        if ntype == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if ntype in VIRTUAL_NODES:
            return None
        return ("link", str(node["id"]), int(slot))

    @staticmethod
    def _bypass_input(node: dict, slot: int, want_type) -> Optional[int]:
        """The input a bypassed node passes through to output ``slot`` (frontend rule)."""
        inputs = node.get("inputs") or []
        if not inputs:
            return None
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want_type in ("*", "", None):
            return slot if slot < len(inputs) else 0
        same = inputs[slot] if slot < len(inputs) else None
        if same and _valid_connection(same.get("type"), out_type) and _valid_connection(same.get("type"), want_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _valid_connection(inp.get("type"), out_type) and _valid_connection(inp.get("type"), want_type):
                return i
        return None


# ----------------------------------------------------------------------------------------------
# Conversion


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """Widget input name -> saved value for one node."""
    widgets = widget_inputs(info)
    saved = node.get("widgets_values")
    if saved is None:
        saved = []
    if isinstance(saved, dict):  # some custom nodes save a name -> value map
        missing = [n for n, _, _ in widgets if n not in saved]
        if missing:
            raise ValueError(f"{_describe(node)}: widgets_values has no value for {missing}.")
        return {n: saved[n] for n, _, _ in widgets}
    saved = list(saved)
    # frontend migrateWidgetsValues: old saves also held a value for each forceInput input
    forced = [(n, s) for n, s in ordered_inputs(info)
              if _spec_options(s).get("forceInput") and _spec_type(s) in WIDGET_TYPES]
    if forced:
        legacy = [(n, s) for n, s in ordered_inputs(info) if is_widget_input(s) or (n, s) in forced]
        width = sum(2 if (_spec_options(s).get("control_after_generate") or n in ("seed", "noise_seed")) else 1
                    for n, s in legacy)
        if width == len(saved):
            # index-wise like the frontend (lodash zip): drop the value at each forceInput's position
            drop = {i for i, item in enumerate(legacy) if item in forced}
            saved = [v for i, v in enumerate(saved) if i not in drop]
    values, pos = {}, 0
    for name, _spec, extra in widgets:
        if pos >= len(saved):
            expected = sum(1 + e for _, _, e in widgets)
            raise ValueError(
                f"{_describe(node)}: widgets_values has {len(saved)} value(s) but the server's node has "
                f"{len(widgets)} widget input(s) ({', '.join(n for n, _, _ in widgets)}; {expected} value(s) "
                f"counting control_after_generate); no value for {name!r}. The workflow was saved with a "
                f"different version of this node; open and re-save it in the ComfyUI frontend.")
        values[name] = saved[pos]
        pos += 1 + extra
    return values


def _check_known(nodes: list, object_info: dict, workflow: dict) -> None:
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    problems = []
    for node in nodes:
        ntype = node.get("type")
        if ntype in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if ntype in subgraphs:
            problems.append(f"{_describe(node)} is a subgraph; unpack it (right click > Unpack Subgraph) "
                            f"or export the workflow in API format")
        elif isinstance(ntype, str) and ntype.startswith(("workflow>", "workflow/")):
            problems.append(f"{_describe(node)} is a group node; convert it back to nodes or export in API format")
        elif ntype not in object_info:
            problems.append(f"{_describe(node)}: node type {ntype!r} is unknown to the server "
                            f"(missing or failed custom node?)")
        else:
            odd = sorted({_spec_type(s) for _, s in ordered_inputs(object_info[ntype])} & UNSUPPORTED_WIDGET_TYPES)
            if odd:
                problems.append(f"{_describe(node)} uses frontend widget(s) {odd} this converter cannot "
                                f"reproduce; export the workflow in API format instead")
    if problems:
        raise ValueError("Cannot convert workflow: " + "; ".join(problems) + ".")


def ui_to_api(workflow: dict, object_info: dict, rng: Optional[random.Random] = None) -> dict:
    """Convert a UI-format workflow (``nodes`` + ``links``) into an API prompt
    ``{node_id: {"inputs", "class_type", "_meta": {"title"}}}`` as the frontend queues it.

    ``object_info`` is the server's ``/object_info``. ``rng`` picks ``{a|b}`` dynamic prompt
    options (default: a fresh ``random.Random()``, like the frontend's ``Math.random``).
    Raises ``ValueError`` naming the node for unknown node types and too few widget values.
    """
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise ValueError("Not a UI-format workflow: expected a JSON object with a 'nodes' list "
                         "(API-format prompts need no conversion).")
    rng = rng or random.Random()
    nodes = sorted(workflow["nodes"], key=lambda n: (n.get("order", 0), str(n.get("id"))))
    _check_known(nodes, object_info, workflow)
    resolver = _Resolver(workflow)

    prompt: dict[str, dict] = {}
    for node in nodes:
        ntype = node.get("type")
        if ntype in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[ntype]
        specs = dict(ordered_inputs(info))
        inputs: dict[str, Any] = {}
        for name, value in widget_values(node, info).items():
            spec = specs[name]
            if _spec_type(spec) == "STRING" and _spec_options(spec).get("dynamicPrompts") and isinstance(value, str):
                value = process_dynamic_prompt(value, rng)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for index, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            if inp.get("link") is None or not name:
                continue
            source = resolver.resolve_input(node, index)
            if source is None:
                continue  # e.g. a bypassed node with nothing to pass through: keep the widget value if any
            if source[0] == "value":
                if name in specs and is_widget_input(specs[name]):
                    inputs[name] = {"__value__": source[1]} if isinstance(source[1], list) else source[1]
                continue
            inputs[name] = [source[1], source[2]]
        prompt[str(node["id"])] = {
            "inputs": inputs,
            "class_type": ntype,
            "_meta": {"title": node.get("title") or info.get("display_name") or ntype},
        }
    # like the frontend: drop links to nodes that are not in the prompt (muted ones)
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def is_api_prompt(data: Any) -> bool:
    return (isinstance(data, dict) and "nodes" not in data and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def load_workflow(path) -> dict:
    """Read a workflow JSON file (UI or API format)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a ComfyUI workflow).")
    return data


def run_workflow(server, path, timeout: float = 900.0, check: bool = False) -> dict:
    """Run a workflow file on a running :class:`tools.comfy_server.ComfyServer`; returns the
    prompt's ``/history`` entry (``entry["status"]["status_str"]`` is ``"success"`` or ``"error"``).
    UI-format files are converted with the server's ``/object_info``; API-format files are sent as
    they are. With ``check=True`` a run that ends in error raises ``RuntimeError`` with the
    server's messages. A prompt the server refuses raises ``RuntimeError`` (from ``run_prompt``)."""
    data = load_workflow(path)
    prompt = data if is_api_prompt(data) else ui_to_api(data, server.object_info())
    entry = server.run_prompt(prompt, timeout=timeout)
    status = entry.get("status") or {}
    if check and status.get("status_str") != "success":
        messages = [m for m in status.get("messages") or [] if m and m[0] == "execution_error"]
        raise RuntimeError(f"workflow {path} failed: {json.dumps(messages or status)[:4000]}")
    return entry


def is_training_workflow(workflow: dict) -> bool:
    """Whether a UI-format workflow contains a trainer node (Stage 1 or Stage 2)."""
    return any(n.get("type") in TRAINER_NODES for n in workflow.get("nodes") or [])


def with_trainer_settings(prompt: dict, **values) -> dict:
    """Set widget ``values`` (e.g. ``steps=20``) on every trainer node of an API-format prompt
    (in place; returned for convenience). Raises ``ValueError`` when the prompt has none."""
    trainers = [n for n in prompt.values() if n.get("class_type") in TRAINER_NODES]
    if not trainers:
        raise ValueError("the prompt has no Train LoRD / Train LoRA with LoRD node")
    for node in trainers:
        node["inputs"].update(values)
    return prompt
