"""Checks that the vLLM this process imports is the variant it claims to be
(gpu_env.VARIANTS), from the files Python actually loads."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import torch
import vllm
from overlaytools import lock

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "overlay"


def overlay_modules() -> dict[str, Path]:
    """Every module the patch series changes, with its overlay file (the patched bytes)."""
    files = sorted((OVERLAY / "vllm").rglob("*.py"))
    return {".".join(f.relative_to(OVERLAY).with_suffix("").parts): f for f in files}


def loaded_from(module: str) -> Path:
    """The file Python loads `module` from in this process (meta path finders included)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise AssertionError(f"{module} cannot be found")
    return Path(spec.origin)


def check(variant: str) -> dict:
    """Raises AssertionError unless this process runs `variant`; returns what it found."""
    pins = lock.load()
    package = Path(vllm.__file__).parent
    found = {"variant": variant, "vllm": vllm.__version__, "vllm_path": str(package), "modules": {}}
    served = {}  # the plugin's: module -> its own file (pristine + the whole series)
    if variant == "plugin":
        import vllm_moe_overlay as plugin

        # On disk the install is pristine 0.19.1, as the plugin's manifest records it ...
        targets = plugin.plan().targets
        states = {t.module: t.state for t in targets}
        assert set(states.values()) == {"pristine"}, f"installed files are not pristine: {states}"
        # ... and its startup hook chose to serve them, at the first import of vllm.
        decided = plugin.decision
        assert decided and decided.action == "apply", f"the plugin's startup hook did not apply: {decided}"
        served = {t.module: t.packaged for t in targets}
    expected_version = pins.pin if variant != "patched" else pins.patched_version(pins.pin, "cuda")
    assert vllm.__version__ == expected_version, f"{variant}: vLLM {vllm.__version__}"
    for module, overlay_file in overlay_modules().items():
        origin = loaded_from(module)
        patched = origin.read_bytes() == overlay_file.read_bytes()
        found["modules"][module] = str(origin)
        if variant == "patched":
            assert patched, f"patched: {origin} is not {overlay_file.relative_to(REPO)}"
            assert origin.is_relative_to(package), origin
        elif module in served:
            assert origin == served[module], f"plugin: {module} is loaded from {origin}, not {served[module]}"
        else:  # pristine
            assert not patched, f"{variant}: {origin} is the patched file"
            assert origin.is_relative_to(package), origin
    return found


def describe() -> str:
    """The variant, its vLLM and the GPU stack, for the end of a test report."""
    import gpu_env
    import triton

    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return (
        f"variant {gpu_env.variant()}: vLLM {vllm.__version__} from {Path(vllm.__file__).parent}; "
        f"{torch.cuda.get_device_name()} (driver {driver}); torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"Python {platform.python_version()} {sys.executable}"
    )
