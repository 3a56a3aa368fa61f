"""Which vLLM this GPU test process runs, and whether it can run on a GPU at all.

Imports neither torch nor vLLM at module level, so tests/run-gpu-tests and
collection on machines without a GPU can use it.

Each GPU test process runs one variant, named by VARIANT_ENV, with that variant's
vLLM first on PYTHONPATH (tests/run-gpu-tests sets both):
  patched   the patched CUDA wheel
  pristine  upstream vLLM 0.19.1: both bugs must show
  plugin    upstream vLLM 0.19.1 with the plugin wheel (its folder read as a site
            directory, so its startup hook runs): every patch its manifest carries
            (has_fix), the whole series
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

VARIANTS = ("patched", "pristine", "plugin")
VARIANT_ENV = "VLLM_OVERLAY_GPU_VARIANT"
# Where a test process writes what the run measured (JSON), for run-gpu-tests and the docs.
OUT_ENV = "VLLM_OVERLAY_GPU_OUT"
# The prepared environments, as PYTHONPATH values (the gpu-kit's env.sh exports them).
PATH_ENVS = {variant: f"VLLM_OVERLAY_GPU_{variant.upper()}" for variant in VARIANTS}


def variant() -> str:
    return os.environ.get(VARIANT_ENV, "")


def expects_bugs() -> bool:
    """Pristine 0.19.1 must show every bug; patched and plugin must not (has_fix)."""
    return variant() == "pristine"


def has_fix(patch: Path) -> bool:
    """Whether this process's variant has the fix of `patch` (the plugin: a patch its
    manifest lists as carried; see series_helpers.fixes_of)."""
    from series_helpers import fixes_of

    return patch.name in fixes_of(variant())


def out_dir() -> Path | None:
    value = os.environ.get(OUT_ENV)
    return Path(value) if value else None


@functools.cache
def unavailable() -> str:
    """Why this process cannot run the GPU tests ('' if it can)."""
    try:
        import torch
    except ImportError:
        return "GPU tests: torch is not installed"
    if not torch.cuda.is_available():
        return "GPU tests: no CUDA device (torch.cuda.is_available() is False)"
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "GPU tests: vLLM is not installed"
    if not current_platform.is_cuda():
        return f"GPU tests: vLLM selected {type(current_platform).__name__}, not its CUDA platform"
    if variant() not in VARIANTS:
        return (
            f"GPU tests: {VARIANT_ENV} is {variant() or 'unset'}, not one of "
            f"{', '.join(VARIANTS)}: tests/run-gpu-tests sets it"
        )
    return ""


def server_logs(fallback: Path) -> Path:
    """Where a test's server logs go: OUT_ENV/server-logs if set (they come back with
    the run's results), else `fallback`."""
    if out := out_dir():
        (out / "server-logs").mkdir(parents=True, exist_ok=True)
        return out / "server-logs"
    return fallback


def record(what: str, **values) -> None:
    """Appends one measurement (a JSON line) to OUT_ENV/measurements.jsonl, if set."""
    if out := out_dir():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "measurements.jsonl", "a") as f:
            f.write(json.dumps({"variant": variant(), "what": what, **values}, default=str) + "\n")
