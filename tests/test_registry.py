"""The pack is publishable on the Comfy Registry and its dependency lists are right.

Registry rules: https://docs.comfy.org/registry/specifications (pyproject.toml) and
https://docs.comfy.org/registry/standards (no eval/exec, no pip install at run time).
Dependencies: every third-party package the pack's runtime code imports (``__init__.py``,
``nodes/``, ``lord_ops/``, ``training/`` -- the documented commands) is in ``requirements.txt``
unless ComfyUI itself requires it, every line of ``requirements.txt`` is imported somewhere, and
``[project] dependencies`` is the same list.
The Registry's own tool: ``comfy node validate`` (comfy-cli, pinned in tools/registry-tools.txt, in
its own venv ``.cache/comfy-cli``) passes with no warning, and ``comfy node pack`` builds an archive
that holds the node pack and what it needs at run time (``.comfyignore``) and loads in ComfyUI.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
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


# --- the Registry's own tool: comfy node validate / comfy node pack ------------------------------
# comfy-cli is pinned (tools/registry-tools.txt) and lives in a venv of its own (make setup runs
# tools/setup_registry_tools.sh). It runs offline: telemetry off (DO_NOT_TRACK, the tool's documented
# opt-out), a throw-away HOME for its config file, proxies pointing at a closed local port, and, where
# the machine allows it (root, or user namespaces), in a network namespace with no network at all.

COMFY_VENV = ROOT / ".cache" / "comfy-cli"
COMFY_CLI = COMFY_VENV / "bin" / "comfy"
REGISTRY_PINS = {canonicalize_name(r.name): str(r.specifier).removeprefix("==")
                 for r in requirement_lines(ROOT / "tools" / "registry-tools.txt")}
VALIDATE_OK = ["Validating node configuration...", "Running security checks...",
               "✓ All validation checks passed successfully"]
PACK_OK = ["Validating node configuration...", "Created zip file: node.zip"]
# What the archive holds (.comfyignore): the node pack (__init__.py, nodes/, lord_ops/), the documented
# command-line entry points (training/, whose imports requirements.txt covers), the help pages (web/),
# the workflows, the two docs the entry points name, and the package's metadata and licence.
ARCHIVE_DIRS = ("nodes", "lord_ops", "training", "web", "workflows")
ARCHIVE_FILES = ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt",
                 "docs/design.md", "docs/experiment.md")
NEVER_SHIPPED = ("tests/", "bench/", "lab/", "tools/", ".ci/", ".cache/", ".venv/", "docs/bench/", "docs/lab/",
                 "demo_output/", "models/")


def need_comfy_cli() -> None:
    if not COMFY_CLI.is_file():
        message = (f"comfy-cli is not installed at {COMFY_CLI.relative_to(ROOT)}: run `make setup` "
                   "(tools/setup_registry_tools.sh)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@functools.cache
def no_network_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that run a command with no network, or () where the machine refuses."""
    if shutil.which("unshare"):
        for prefix in (("unshare", "--net"), ("unshare", "--net", "--map-root-user")):
            try:
                if subprocess.run([*prefix, "true"], capture_output=True, timeout=20).returncode == 0:
                    return prefix
            except (OSError, subprocess.SubprocessError):
                pass
    return ()


def run_comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1", "RUFF_NO_CACHE": "true", "COLUMNS": "200",
           "TERM": "dumb", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8",
           **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                               "https_proxy", "all_proxy")}}
    cmd = [*no_network_prefix(), str(COMFY_CLI), "--skip-prompt", "--no-enable-telemetry", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def output_problems(proc: subprocess.CompletedProcess, expected: list[str]) -> list[str]:
    """Everything comfy-cli said beyond the expected lines (any warning, error or traceback), and a
    non-zero exit status; empty = a clean pass."""
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    problems = [f"exit status {proc.returncode}"] if proc.returncode else []
    problems += [f"unexpected: {line}" for line in lines if line not in expected]
    problems += [f"missing: {line}" for line in expected if line not in lines]
    return problems


def validate_problems(folder: Path, home: Path) -> list[str]:
    return output_problems(run_comfy(["node", "validate"], folder, home), VALIDATE_OK)


def release_files() -> list[str]:
    """The files a commit of this working tree holds (tracked, and untracked unless git ignores them):
    what a clean clone, CI and ``comfy node publish`` see."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        message = f"not a git checkout ({e}): comfy node pack packs git-tracked files"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sorted({p for p in out.split("\0") if p and (ROOT / p).is_file()})


@pytest.fixture(scope="module")
def release_copy(tmp_path_factory) -> Path:
    """A git repository holding exactly :func:`release_files` (so neither the tools' caches nor an
    untracked file in the checkout can change the results)."""
    need_comfy_cli()
    copy = tmp_path_factory.mktemp("release") / "ComfyUI-LoRD"
    for rel in release_files():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, copy / rel)
    for args in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *args], cwd=copy, check=True, capture_output=True)
    return copy


@pytest.fixture(scope="module")
def registry_archive(release_copy, tmp_path_factory) -> Path:
    """The archive ``comfy node pack`` builds (what ``comfy node publish`` uploads)."""
    proc = run_comfy(["node", "pack"], release_copy, tmp_path_factory.mktemp("home"))
    assert output_problems(proc, PACK_OK) == [], proc.stdout + proc.stderr
    archive = tmp_path_factory.mktemp("archive") / "node.zip"
    shutil.move(release_copy / "node.zip", archive)
    return archive


def test_comfy_cli_is_the_pinned_version():
    need_comfy_cli()
    code = "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    out = subprocess.run([str(COMFY_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    installed = {canonicalize_name(k): v for k, v in json.loads(out.stdout).items()}
    assert REGISTRY_PINS["comfy-cli"] and REGISTRY_PINS["ruff"]
    wrong = {d: (v, installed.get(d)) for d, v in REGISTRY_PINS.items() if installed.get(d) != v}
    assert not wrong, f"{{pin: (pinned, installed)}}: {wrong}; rerun tools/setup_registry_tools.sh"


def test_comfy_node_validate_passes_without_a_warning(release_copy, tmp_path):
    assert validate_problems(release_copy, tmp_path / "home") == []


def test_comfy_cli_reads_the_registry_metadata(tmp_path):
    """What ``comfy node publish`` sends to the Registry, read from pyproject.toml by comfy-cli's own
    parser: the publisher (a placeholder the maintainer sets: README), the node id, version, name,
    icon, repository, licence, requires-comfyui and the dependencies (= requirements.txt)."""
    need_comfy_cli()
    code = """if True:
        import dataclasses, json, sys
        from comfy_cli.registry.config_parser import extract_node_configuration

        def plain(o):  # tomlkit's containers do not survive dataclasses.asdict
            if dataclasses.is_dataclass(o):
                return {f.name: plain(getattr(o, f.name)) for f in dataclasses.fields(o)}
            if isinstance(o, (list, tuple)):
                return [plain(v) for v in o]
            return o if isinstance(o, (int, float, bool, type(None))) else str(o)

        print(json.dumps(plain(extract_node_configuration(sys.argv[1]))))
    """
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "DO_NOT_TRACK": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([str(COMFY_VENV / "bin" / "python"), "-c", code, str(ROOT / "pyproject.toml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr  # no warning either
    config = json.loads(proc.stdout)
    project, comfy = config["project"], config["tool_comfy"]
    assert comfy["publisher_id"] == COMFY["PublisherId"] == "comfyui-lord"
    assert (project["name"], project["version"]) == (PROJECT["name"], PROJECT["version"])
    assert (comfy["display_name"], comfy["icon"]) == (COMFY["DisplayName"], COMFY["Icon"])
    assert project["urls"]["repository"] == PROJECT["urls"]["Repository"]
    assert project["license"]["text"] == PROJECT["license"]["text"]
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"]
    assert project["dependencies"] == [str(r) for r in REQUIREMENTS]
    assert project["description"] == PROJECT["description"]


MINI_PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize("case, pyproject, module, ok", [
    ("intact", MINI_PYPROJECT, "x = 1\n", True),
    ("no version", re.sub(r'(?m)^version = ".*"\n', "", MINI_PYPROJECT), "x = 1\n", False),
    ("licence neither file nor text", re.sub(r"(?m)^license = .*$", 'license = { name = "GPL-3.0-or-later" }',
                                              MINI_PYPROJECT), "x = 1\n", False),
    ("requires-comfyui not a version range", re.sub(r"(?m)^requires-comfyui = .*$", 'requires-comfyui = "0.3.x"',
                                                    MINI_PYPROJECT), "x = 1\n", False),
    ("eval", MINI_PYPROJECT, "x = eval('1')\n", False),
    ("exec", MINI_PYPROJECT, "exec('x = 1')\n", False),
    ("two statements on a line", MINI_PYPROJECT, "x = 1; y = 2\n", False),
])
def test_validation_check_fails_on_a_broken_copy(case, pyproject, module, ok, tmp_path):
    """The check above is not vacuous: comfy-cli (exit status 0 on warnings) plus output_problems
    catch a pyproject the Registry rejects or warns about, and each construct the security check flags."""
    need_comfy_cli()
    folder = tmp_path / "pack"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    (folder / "__init__.py").write_text(module, encoding="utf-8")
    problems = validate_problems(folder, tmp_path / "home")
    assert (problems == []) is ok, (case, problems)


def archive_problems(names, release) -> dict[str, list[str]]:
    """The archive's file list against the node pack's: every file of ARCHIVE_DIRS in the release and
    every ARCHIVE_FILES, nothing else, nothing NEVER_SHIPPED."""
    names = set(names)
    wanted = {f for f in release if f.split("/")[0] in ARCHIVE_DIRS} | set(ARCHIVE_FILES)
    return {"missing": sorted(wanted - names),
            "not the node pack's": sorted(names - wanted),
            "never shipped": sorted(n for n in names if n.startswith(NEVER_SHIPPED) or "__pycache__/" in n
                                    or n.endswith(".pyc"))}


def unresolved_imports(sources: dict[str, str]) -> list[str]:
    """Imports of the pack's own modules (relative, or absolute by a top-level name of this
    repository) in ``sources`` ({archive path: text}) that name no module of the archive."""
    present = set(sources)

    def exists(parts: list[str]) -> bool:
        stem = "/".join(parts)
        return not parts or f"{stem}.py" in present or f"{stem}/__init__.py" in present

    own = own_modules() - {"nodes", "__init__", "comfyui_lord"}  # an absolute `nodes` is ComfyUI's nodes.py
    missing = []
    for path, text in sources.items():
        if not path.endswith(".py"):
            continue
        package = path.removesuffix(".py").split("/")[:-1]
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] in own]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module.split(".")] if node.module.split(".")[0] in own else []
            elif isinstance(node, ast.ImportFrom):
                up = node.level - 1
                if up > len(package):
                    missing.append(f"{path}:{node.lineno} imports beyond the pack ({'.' * node.level}{node.module or ''})")
                    continue
                base = package[:len(package) - up]
                targets = [base + node.module.split(".")] if node.module else [base]
            else:
                continue
            missing += [f"{path}:{node.lineno} {'.'.join(t)}" for t in targets if not exists(t)]
    return missing


def archive_sources(archive: Path) -> dict[str, str]:
    with zipfile.ZipFile(archive) as z:
        return {n: z.read(n).decode("utf-8") if n.endswith(".py") else "" for n in z.namelist() if not n.endswith("/")}


def test_registry_archive_holds_the_node_pack(registry_archive):
    with zipfile.ZipFile(registry_archive) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        assert len(names) == len(set(names))
    problems = archive_problems(names, release_files())
    assert not any(problems.values()), problems
    assert unresolved_imports(archive_sources(registry_archive)) == []
    # the lab weights alone are 24 MB: an archive this small has none of the lab or its demo data
    assert registry_archive.stat().st_size < 3_000_000, registry_archive.stat().st_size


def test_archive_checks_are_not_vacuous(registry_archive):
    """Without .comfyignore (every released file) the list check objects to the tests, the benchmarks,
    the lab and its demo data; without a module the import check names its importers."""
    release = release_files()
    everything = archive_problems(release, release)
    for prefix in ("tests/", "bench/", "lab/demo_data/replicates/", "lab/weights/", "tools/"):
        assert any(n.startswith(prefix) for n in everything["never shipped"]), prefix
    assert archive_problems([n for n in release if n != "nodes/train.py"] + list(ARCHIVE_FILES),
                            release)["missing"] == ["nodes/train.py"]
    sources = archive_sources(registry_archive)
    del sources["lord_ops/format.py"]
    missing = unresolved_imports(sources)
    assert any(m.startswith("nodes/") and m.endswith("lord_ops.format") for m in missing), missing
    assert any(m.startswith("training/") and m.endswith("lord_ops.format") for m in missing), missing
    assert unresolved_imports({"nodes/x.py": "from ...elsewhere import y\n", "training/y.py": "import lab.demo\n"}) \
        == ["nodes/x.py:1 imports beyond the pack (...elsewhere)", "training/y.py:1 lab.demo"]


# Run in a fresh interpreter: ComfyUI (argv: ComfyUI, the unpacked pack, this repository) loads the
# pack from custom_nodes/ with its own loader, then every module of nodes/, lord_ops/ and training/ is
# imported from the unpacked archive; prints what loaded, and any module read from this repository.
LOAD_PROBE = r'''
import asyncio, importlib, json, sys
from pathlib import Path
comfyui, pack, repo = (Path(a) for a in sys.argv[1:4])
sys.path[:] = [str(comfyui)] + [p for p in sys.path if p not in ("", ".")]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
loaded = asyncio.run(nodes.load_custom_node(str(pack)))
package, failed = pack.as_posix().replace(".", "_x_"), {}

def modules(sub):
    for f in sorted((pack / sub).rglob("*.py")):
        parts = f.relative_to(pack).with_suffix("").parts
        if parts[-1] != "__main__":
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

def load(name):
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"

for name in [m for d in ("nodes", "lord_ops") for m in modules(d)]:
    load(f"{package}.{name}")
sys.path.append(str(pack))  # the documented commands: `python -m training.<x>` in the pack's folder
for name in modules("training"):
    load(name)
own = [repo / d for d in ("__init__.py", "nodes", "lord_ops", "training", "lab", "tools", "bench", "tests")]
files = [Path(f).resolve() for f in (getattr(m, "__file__", None) for m in list(sys.modules.values())) if f]
print(json.dumps({"loaded": loaded, "failed": failed,
                  "nodes": sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                                  if getattr(v, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{pack.name}"),
                  "web": sorted(str(Path(v).relative_to(pack)) for v in nodes.EXTENSION_WEB_DIRS.values()
                                if Path(v).is_relative_to(pack)),
                  "from_repository": sorted(str(f) for f in files if any(f.is_relative_to(o) for o in own)),
                  "from_pack": sum(f.is_relative_to(pack) for f in files)}))
'''


def test_registry_archive_loads_in_comfyui(registry_archive, comfyui_path, tmp_path):
    """The archive unpacked into a custom_nodes/ folder: ComfyUI's own loader registers every node and
    the help pages from it, and every module of the pack imports from it alone."""
    from comfyui_lord import nodes as pack_nodes

    pack = (tmp_path / "custom_nodes" / PROJECT["name"]).resolve()
    with zipfile.ZipFile(registry_archive) as z:
        z.extractall(pack)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(comfyui_path), str(pack), str(ROOT.resolve())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pack_nodes.register_model_folder()  # the schemas list models/lord
    expected = sorted(cls.define_schema().node_id for cls in pack_nodes.NODES)
    assert result["loaded"] is True, proc.stderr[-3000:]
    assert result["failed"] == {}
    assert result["nodes"] == expected and len(expected) >= 10
    assert result["web"] == ["web"]
    assert result["from_repository"] == []
    assert result["from_pack"] >= len([n for n in archive_sources(registry_archive) if n.endswith(".py")])
