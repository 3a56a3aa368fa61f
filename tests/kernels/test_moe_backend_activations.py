"""Which MoE activations each fused-MoE experts backend accepts, pristine 0.19.1 against
the build.

vLLM picks a Gemma4 model's experts backend among those whose `_supports_activation`
accepts its activation. Pristine 0.19.1 lists exact GELU in several backends that lack
the tanh GELU the Gemma4 fixes use, so such a model either falls to another backend or
finds none. The listing comes from the real methods of both installations
(moe_activations.py, in a process each); this test requires that every backend that
accepts an exact-GELU activation accepts its tanh counterpart too, unless DECLINED says
why not, and that the build adds nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_helpers import pristine_vllm

pytestmark = pytest.mark.installed

LISTER = Path(__file__).with_name("moe_activations.py")
TANH_OF = {"gelu": "gelu_tanh", "gelu_no_mul": "gelu_tanh_no_mul"}
# Backends that keep exact GELU only: their kernels take the activation by name, and the
# kernel libraries of vLLM 0.19.1's era have no tanh GELU (upstream adds it with newer
# libraries, or not at all).
DECLINED = {
    "xpu_fused_moe.XPUExperts": "vllm-xpu-kernels' fused MoE of that era takes no 'gelu_tanh'",
    "rocm_aiter_fused_moe.AiterExperts": "AITER's ActivationType has no tanh GELU; 0.23.0 leaves it out too",
}


def listing(pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, str(LISTER)], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def pristine() -> dict:
    return listing(str(pristine_vllm()))


@pytest.fixture(scope="module")
def patched() -> dict:
    return listing(None)  # the test environment's own vLLM: the patched CPU wheel


def test_both_list_the_same_backends(pristine, patched):
    assert sorted(patched["backends"]) == sorted(pristine["backends"])
    assert patched["import_errors"] == pristine["import_errors"]
    assert len(patched["backends"]) > 10  # the walk found the backends


def test_every_exact_gelu_backend_takes_tanh_gelu(patched):
    missing = {
        backend: [TANH_OF[a] for a in accepted if a in TANH_OF and TANH_OF[a] not in accepted]
        for backend, accepted in patched["backends"].items()
        if isinstance(accepted, list)
    }
    missing = {backend: acts for backend, acts in missing.items() if acts}
    assert missing.keys() == DECLINED.keys(), missing


def test_the_build_adds_only_tanh_gelu(pristine, patched):
    added = {}
    for backend, before in pristine["backends"].items():
        after = patched["backends"][backend]
        if isinstance(before, str) or isinstance(after, str):  # not used by an oracle in 0.19.1
            assert after == before, backend
            continue
        assert set(before) <= set(after), backend
        if set(after) - set(before):
            added[backend] = sorted(set(after) - set(before))
    assert all(set(acts) <= set(TANH_OF.values()) for acts in added.values()), added
    assert added  # pristine lacks tanh GELU in these backends: the bug this listing shows


def test_the_cpu_backend_runs_both_gelus(pristine, patched):
    """Pristine's CPU backend has neither GELU (upstream #43326): Gemma4 MoE cannot run
    on the CPU flavour. The build maps both to torch's F.gelu."""
    assert not {"gelu", "gelu_tanh"} & set(pristine["cpu"])
    assert set(patched["cpu"]) == set(pristine["cpu"]) | {"gelu", "gelu_tanh"}
