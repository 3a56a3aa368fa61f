"""The GPU lane: one variant per process (gpu_env.VARIANT_ENV), checked to be what it
claims before any test runs. Every module here skips itself, with the reason, where
no CUDA device or no vLLM CUDA platform is present (gpu_env.unavailable), but
test_lane_reports.py, which checks the lane's reports from recorded outputs anywhere."""

from __future__ import annotations

import json
import os

import gpu_env
import pytest

MEMORY_FRACTION_ENV = "VLLM_OVERLAY_GPU_MEMORY_FRACTION"


def pytest_configure(config):
    if gpu_env.unavailable():
        return
    import torch

    # Several test processes share the GPU: each keeps to its share.
    if fraction := os.environ.get(MEMORY_FRACTION_ENV):
        torch.cuda.set_per_process_memory_fraction(float(fraction))
    if gpu_env.variant() == "plugin":
        # As vLLM's own processes do, before any model code is imported.
        from vllm.plugins import load_general_plugins

        load_general_plugins()


@pytest.fixture(scope="session", autouse=True)
def checked_variant():
    """Fails every test of a process whose vLLM is not the variant it claims to be."""
    if gpu_env.unavailable():
        yield None
        return
    import variants

    found = variants.check(gpu_env.variant())
    if out := gpu_env.out_dir():
        out.mkdir(parents=True, exist_ok=True)
        (out / "environment.json").write_text(json.dumps(found, indent=1) + "\n")
    yield found


def pytest_terminal_summary(terminalreporter):
    if gpu_env.unavailable():
        return
    import variants

    terminalreporter.write_line(f"GPU lane: {variants.describe()}")
