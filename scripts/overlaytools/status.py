"""scripts/upstream-status: is each patch still needed in a given vLLM release?"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.version import InvalidVersion, Version

from . import detect, fetch, lock, patching, sources
from .errors import OverlayError, run
from .fetch import log

PROG = "upstream-status"
APPLIES, FIXED, CONFLICTS = "applies", "fixed", "conflicts"
# pip does not widen --platform to older glibc levels, so list the plausible ones.
MANYLINUX = range(17, 51)


@dataclass(frozen=True)
class Verdict:
    patch: str
    state: str  # APPLIES, FIXED or CONFLICTS
    reason: str


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="For each patch and each vLLM release: 'applies' (the bug is there "
        "and the patch applies cleanly), 'fixed' (the release has the fix) or "
        "'conflicts' (needs a forward-port or a look). Read from the release's own "
        "code, which pip fetches (the release's wheel, hash-checked against the index).",
    )
    parser.add_argument(
        "versions", nargs="*", metavar="VERSION", help="vLLM releases, or 'latest' [the pin and latest]"
    )
    parser.add_argument(
        "--arch",
        choices=lock.ARCHES,
        default=sources.host_arch(),
        help="which release wheel to read [this machine's]",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="download cache [$VLLM_OVERLAY_CACHE or ~/.cache/vllm-moe-overlay]",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: status(args), lambda: "nothing was written")


def status(args: argparse.Namespace) -> None:
    locked = lock.load()
    cache = args.cache_dir or fetch.default_cache_dir()
    patches = patching.series()
    if not patches:
        raise OverlayError(f"{patching.PATCHES / 'series'} lists no patch: nothing to check")
    for patch in patches:
        patching.check_format(patch)
    requested = args.versions or [locked.pin, "latest"]
    for spec in requested:
        if spec != "latest":
            _check_version(spec)
    done = set()
    for spec in requested:
        version, artifact = _release_wheel(locked, spec, args.arch)
        if version in done:
            continue
        done.add(version)
        log(f"vLLM {version}: reading {artifact.filename}")
        with fetch.open_verified(artifact, version, cache, offline=False) as source:
            verdicts = _verdicts(patches, source, artifact.filename)
        _report(version, artifact, verdicts)


def _check_version(spec: str) -> None:
    try:
        Version(spec)
    except InvalidVersion:
        raise OverlayError(f"{spec!r} is not a version (e.g. 0.22.0) or 'latest'") from None


def _release_wheel(locked: lock.Lock, spec: str, arch: str) -> tuple[str, lock.Artifact]:
    """The release's CUDA wheel: from the lock if locked, else as the index lists it."""
    if spec in locked.releases:
        return spec, locked.wheels(spec, ["cuda"], [arch])[0]
    requirement = "vllm" if spec == "latest" else f"vllm=={spec}"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        platforms = [f"--platform=manylinux_2_{n}_{arch}" for n in MANYLINUX]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--no-deps",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            *platforms,
            f"--python-version={lock.PIP_PYTHON_VERSION}",
            "--implementation=cp",
            "--target",
            str(Path(tmp) / "target"),
            "--report",
            str(report),
            requirement,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = fetch.pip_failure(result)
            raise OverlayError(f"no {arch} wheel of {requirement} on the index: {reason}")
        (item,) = json.loads(report.read_text())["install"]
    info = item["download_info"]
    sha256 = info.get("archive_info", {}).get("hashes", {}).get("sha256")
    if not sha256:
        raise OverlayError(f"the index gives no sha256 for {info['url']}")
    filename = unquote(Path(urlsplit(info["url"]).path).name)
    version = item["metadata"]["version"]
    return version, lock.Artifact("vllm", "cuda", arch, filename, 0, sha256, "the index")


def _verdicts(patches: list[Path], source, filename: str) -> list[Verdict]:
    """Each patch judged in series order, on the release's files with the patches
    before it applied where they apply (a later patch may build on an earlier one)."""
    files: dict[str, bytes] = {}
    verdicts = []
    for patch in patches:
        touched, added = patching.touched_files([patch]), patching.added_files([patch])
        detected = [r for paths, _ in detect.for_origin(patching.origin(patch.read_text())) for r in paths]
        wanted = [r for r in dict.fromkeys([*touched, *detected]) if r not in files]
        try:
            files.update(sources.wheel_members(source, wanted, filename, added, missing_ok=True))
        except OverlayError as exc:
            verdicts.append(Verdict(patch.name, CONFLICTS, str(exc)))
            continue
        missing = [r for r in touched if r not in files and r not in added]
        mine = {rel: files[rel] for rel in touched if rel in files}
        if missing:
            moved = {rel: files[rel] for rel in detected if rel in files}
            gone = f"{filename} has no {', '.join(missing)}"
            verdicts.append(_verdict_on_moved_code(patch, {**moved, **mine}, gone))
            continue
        verdicts.append(_verdict(patch, mine))
        if verdicts[-1].state == APPLIES:
            files.update(patching.apply(mine, [patch]))
    return verdicts


def _findings(patch: Path, files: dict[str, bytes]) -> list[detect.Finding]:
    detectors = detect.for_origin(patching.origin(patch.read_text()))
    found = [(next((rel for rel in paths if rel in files), None), find) for paths, find in detectors]
    return [find(files[rel].decode()) for rel, find in found if rel is not None]


def _verdict_on_moved_code(patch: Path, files: dict[str, bytes], gone: str) -> Verdict:
    """Some files the patch changes are gone from the release: only a detector on the
    files still there can say the fix is in."""
    findings = _findings(patch, files)
    fixed = [f.reason for f in findings if f.state == detect.FIXED]
    if fixed and all(f.state == detect.FIXED for f in findings):
        return Verdict(patch.name, FIXED, f"{'; '.join(fixed)} ({gone})")
    if buggy := [f.reason for f in findings if f.state == detect.BUGGY]:
        return Verdict(patch.name, CONFLICTS, f"{'; '.join(buggy)}, but {gone}: forward-port it")
    return Verdict(patch.name, CONFLICTS, gone)


def _verdict(patch: Path, files: dict[str, bytes]) -> Verdict:
    findings = _findings(patch, files)
    if not findings:
        return _verdict_by_git_alone(patch, files)
    fixed = [f.reason for f in findings if f.state == detect.FIXED]
    buggy = [f.reason for f in findings if f.state == detect.BUGGY]
    if fixed and not buggy:
        return Verdict(patch.name, FIXED, "; ".join(fixed))
    if not buggy and not patching.check_applies(files, patch, reverse=True):
        return Verdict(patch.name, FIXED, "the patch is already applied")
    failure = patching.check_applies(files, patch).removeprefix(f"{patch.name}: ")
    if not failure:
        return Verdict(patch.name, APPLIES, "; ".join(buggy) or "applies with zero fuzz")
    if buggy:
        return Verdict(patch.name, CONFLICTS, f"{'; '.join(buggy)}, but {failure}: forward-port it")
    unknown = "; ".join(f.reason for f in findings)
    return Verdict(patch.name, CONFLICTS, f"{failure}, and {unknown}: review by hand")


def _verdict_by_git_alone(patch: Path, files: dict[str, bytes]) -> Verdict:
    alone = "no bug detector: judged by `git apply --check` forward and reverse alone"
    if not patching.check_applies(files, patch, reverse=True):
        return Verdict(patch.name, FIXED, f"the patch is already applied ({alone})")
    failure = patching.check_applies(files, patch).removeprefix(f"{patch.name}: ")
    if not failure:
        return Verdict(patch.name, APPLIES, f"applies with zero fuzz ({alone})")
    return Verdict(patch.name, CONFLICTS, f"{failure} ({alone}): review by hand")


def _report(version: str, artifact: lock.Artifact, verdicts: list[Verdict]) -> None:
    print(f"vLLM {version} ({artifact.filename}, sha256 checked against {artifact.hash_from})")
    width = max(len(v.patch) for v in verdicts)
    for v in verdicts:
        print(f"  {v.patch:<{width}}  {v.state:<9}  {v.reason}")
    states = {v.state for v in verdicts}
    if states == {FIXED}:
        summary = f"every fix is upstream: on {version} the overlay is no longer needed"
    elif CONFLICTS in states:
        summary = f"the overlay needs a forward-port before it can patch {version}"
    else:
        summary = f"the overlay is still needed on {version}"
    print(f"  => {summary}", flush=True)
