"""Each CPU MoE kernel case of vLLM 0.19.1 on this machine: a forward on its path
in a fresh process, or a skip that says why this CPU does not run it. The MoE
tests run on the cases that pass here."""

from __future__ import annotations

import pytest
from moe_fixtures import kernel_probes, unavailable
from moe_layers import KERNEL_CASES


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_case_runs_here(name):
    if reason := unavailable(name):
        pytest.skip(reason)
    probe = kernel_probes()[name]
    assert probe.ran, f"{name}: vLLM picked {probe.selected}, but the forward did not finish"
