"""The pack is publishable on the Comfy Registry and its dependency lists are right.

Registry rules: https://docs.comfy.org/registry/specifications (pyproject.toml) and
https://docs.comfy.org/registry/standards (no eval/exec, no pip install at run time).
Dependencies: every third-party package the pack's runtime code imports (``__init__.py``,
``nodes/``, ``lord_ops/``, ``training/`` -- the documented commands) is in ``requirements.txt``
unless ComfyUI itself requires it, every line of ``requirements.txt`` is imported somewhere, and
``[project] dependencies`` is the same list.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
RUNTIME = [ROOT / "__init__.py"] + sorted(p for d in ("nodes", "lord_ops", "training") for p in (ROOT / d).rglob("*.py"))
# Distributions listed in requirements.txt although no runtime module imports them, with the reason.
# (Empty: every line is imported. Add an entry here, not a silent exception in the test.)
DELIBERATE_EXTRAS: dict[str, str] = {}
# ComfyUI's own modules when its requirements.txt cannot tell (imported from ComfyUI's folder)
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "comfyui_version",
                   "node_helpers", "nodes", "server", "execution", "latent_preview"}

# The Registry's node-id rules: < 100 characters; letters, digits, "-", "_", "."; no two special
# characters in a row; starts with a letter (not a digit or a special character).
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
GITHUB_REPO = re.compile(r"^https://github\.com/([A-Za-z0-9-]+)/([A-Za-z0-9._-]+)$")


def registry_name_problems(name: str) -> list[str]:
    """What the Registry would object to in a ``[project] name`` (empty list = fine)."""
    problems = []
    if not 0 < len(name) < 100:
        problems.append("must be 1..99 characters")
    if not NODE_ID.match(name):
        problems.append("only letters, digits, '-', '_', '.'; no consecutive special characters; "
                        "must start with a letter")
    if "comfyui" in name.lower():
        problems.append("must not contain 'ComfyUI'")
    return problems


@pytest.mark.parametrize("name, ok", [("lord-defense", True), ("image-processor", True), ("comfyui-lord", False),
                                      ("ComfyUI-enhancer", False), ("123-tool", False), ("-tool", False),
                                      ("my--tool", False), ("my_tool.v2", True), ("a" * 100, False)])
def test_name_rule_itself(name, ok):
    assert (registry_name_problems(name) == []) is ok


def test_project_name_is_a_registry_node_id():
    assert registry_name_problems(PROJECT["name"]) == [], PROJECT["name"]


def test_version_is_semver_and_matches_the_package():
    version = PROJECT["version"]
    assert SEMVER.match(version), f"[project] version {version!r} is not X.Y.Z"
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    declared = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
    assert declared == [version], f"__init__.__version__ {declared} != pyproject version {version}"


def test_description_and_license():
    assert len(PROJECT.get("description", "").strip()) >= 20
    lic = PROJECT["license"]
    # the Registry accepts {file = "LICENSE"} or {text = "..."}, never a bare string
    assert isinstance(lic, dict) and len(lic) == 1 and set(lic) <= {"file", "text"}, lic
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    if "file" in lic:
        assert (ROOT / lic["file"]).is_file()
    else:
        assert lic["text"].strip()
        if lic["text"].startswith("GPL-3.0"):  # the SPDX id names the LICENSE file's licence
            assert "GNU GENERAL PUBLIC LICENSE" in license_text and "Version 3" in license_text


def test_urls():
    urls = PROJECT["urls"]
    assert GITHUB_REPO.match(urls["Repository"]), urls["Repository"]
    for key, url in urls.items():
        assert url.startswith("https://"), (key, url)


def _svg_size(path: Path) -> tuple[float, float]:
    root = ET.parse(path).getroot()
    if "width" in root.attrib and "height" in root.attrib:
        return float(root.attrib["width"].removesuffix("px")), float(root.attrib["height"].removesuffix("px"))
    _, _, w, h = (float(v) for v in root.attrib["viewBox"].replace(",", " ").split())
    return w, h


def test_tool_comfy_section():
    assert re.match(r"^[a-z0-9][a-z0-9-]*$", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip()
    owner, repo = GITHUB_REPO.match(PROJECT["urls"]["Repository"]).groups()
    # Icon: a URL (the Registry does not read the repository); ours is the raw URL of a file in it
    icon = re.match(rf"^https://raw\.githubusercontent\.com/{owner}/{repo}/[^/]+/(.+)$", COMFY["Icon"])
    assert icon, f"Icon must be the raw GitHub URL of a file in {owner}/{repo}: {COMFY['Icon']!r}"
    path = ROOT / icon.group(1)
    assert path.is_file(), f"the Icon URL names {icon.group(1)}, which is not in the repository"
    assert path.suffix.lower() in (".svg", ".png", ".jpg", ".jpeg", ".gif")
    if path.suffix.lower() == ".svg":
        w, h = _svg_size(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
    assert 0 < w <= 800 and 0 < h <= 400, f"icon is {w}x{h}; the Registry allows at most 800x400"
    assert path.stat().st_size < 150_000


def test_requires_comfyui_admits_the_pinned_comfyui(comfyui_path):
    spec = SpecifierSet(COMFY["requires-comfyui"])
    text = (comfyui_path / "comfyui_version.py").read_text(encoding="utf-8")
    pinned = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)
    assert Version(pinned) in spec, f"the tested ComfyUI {pinned} is outside requires-comfyui {spec}"
    assert isinstance(COMFY.get("includes", []), list)
    for inc in COMFY.get("includes", []):
        assert (ROOT / inc).exists(), inc


# --- dependencies -----------------------------------------------------------------------------

def requirement_lines(path: Path) -> list[Requirement]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


REQUIREMENTS = requirement_lines(ROOT / "requirements.txt")


def test_pyproject_dependencies_equal_requirements_txt():
    assert [str(Requirement(d)) for d in PROJECT["dependencies"]] == [str(r) for r in REQUIREMENTS]


def test_requirements_never_install_torch():
    names = {canonicalize_name(r.name) for r in REQUIREMENTS}
    assert not names & {"torch", "torchvision", "torchaudio"}, "ComfyUI provides torch: never (re)install it"


def imported_top_level(files, root: Path = ROOT) -> dict[str, set[str]]:
    """{top-level module name: files importing it} for absolute imports anywhere in ``files``
    (module level and inside functions: a lazy import is still a runtime dependency)."""
    found: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(f.relative_to(root)))
    return found


def own_modules() -> set[str]:
    names = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return names | {"comfyui_lord"}


def comfyui_provides(comfyui_path: Path) -> tuple[set[str], set[str]]:
    """(ComfyUI's own top-level modules, the distributions its requirements.txt installs)."""
    modules = {p.stem for p in comfyui_path.glob("*.py")} | {p.name for p in comfyui_path.iterdir()
                                                             if p.is_dir() and (p / "__init__.py").exists()}
    dists = {canonicalize_name(r.name) for r in requirement_lines(comfyui_path / "requirements.txt")}
    return modules | COMFYUI_MODULES, dists


def dependency_problems(imports: dict[str, set[str]], listed: set[str], comfyui_path: Path) -> dict[str, object]:
    """Compare the runtime imports with the listed distributions (canonical names)."""
    comfy_modules, comfy_dists = comfyui_provides(comfyui_path)
    to_dist = metadata.packages_distributions()
    third_party = {m: f for m, f in imports.items()
                   if m not in sys.stdlib_module_names and m not in own_modules() and m not in comfy_modules}
    unknown = {m: sorted(f) for m, f in third_party.items() if m not in to_dist}
    needed = {canonicalize_name(d): m for m in third_party if m in to_dist for d in to_dist[m]}
    missing = {d: sorted(third_party[m]) for d, m in needed.items() if d not in listed and d not in comfy_dists}
    extras = {canonicalize_name(d) for d in DELIBERATE_EXTRAS}
    unused = sorted(listed - set(needed) - extras)
    return {"not installed, cannot tell the distribution": unknown, "imported but not in requirements.txt": missing,
            "in requirements.txt but never imported": unused}


def test_requirements_match_runtime_imports(comfyui_path):
    listed = {canonicalize_name(r.name) for r in REQUIREMENTS}
    problems = dependency_problems(imported_top_level(RUNTIME), listed, comfyui_path)
    assert not any(problems.values()), problems


def test_dependency_check_finds_a_missing_and_an_unused_line(comfyui_path, tmp_path):
    """The comparison above is not vacuous: an import of an unlisted package and a listed package
    nobody imports are both reported."""
    mod = tmp_path / "m.py"
    mod.write_text("import matplotlib.pyplot\nfrom PIL import Image\nimport tqdm\nimport json\nimport folder_paths\n")
    imports = imported_top_level([mod], root=tmp_path)
    problems = dependency_problems(imports, {"pillow", "open-clip-torch"}, comfyui_path)
    assert set(problems["imported but not in requirements.txt"]) == {"matplotlib"}  # tqdm: ComfyUI installs it
    assert problems["in requirements.txt but never imported"] == ["open-clip-torch"]


def test_installed_versions_satisfy_requirements():
    """The tests ran against versions the requirements admit."""
    for req in REQUIREMENTS:
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req} but {installed} is installed"


def test_registry_security_standards():
    """No eval/exec calls and no pip install at run time in the pack's runtime code."""
    offenders = []
    for f in RUNTIME:
        src = f.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\bpip\b.*\binstall\b",
                                                                                             node.value):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} pip install")
    assert not offenders, offenders
