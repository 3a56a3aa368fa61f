"""tests/run-gpu-tests' reports from recorded outputs, on any machine: the greedy
outputs compared across variants (Gemma4 only within each expert GELU's group) and the
table of the Gemma4 servers' deviations from transformers."""

from __future__ import annotations

import json

import pytest
import serve_outputs

QWEN = {"tokens": [[1, 2]], "logprobs": [[-0.5, -0.25]]}
TANH = {"tokens": [[3, 4]], "logprobs": [[-0.1, -0.2]], "gelu": "tanh"}
EXACT = {"tokens": [[3, 5]], "logprobs": [[-0.15, -0.3]], "gelu": "exact"}


def write(tmp_path, outputs: dict[str, dict]) -> dict:
    dirs = {}
    for variant, served in outputs.items():
        dirs[variant] = tmp_path / variant
        serve_outputs.write(dirs[variant], served)
    return dirs


@pytest.mark.fast
def test_variants_of_other_gelus_are_compared_within_their_groups(tmp_path):
    dirs = write(
        tmp_path,
        {
            "patched": {"routed-fp32-eager": QWEN, "gemma-fp32-eager": TANH},
            "pristine": {"routed-fp32-eager": QWEN, "gemma-fp32-eager": EXACT},
            "plugin": {"routed-fp32-eager": QWEN, "gemma-fp32-eager": EXACT},
        },
    )
    assert serve_outputs.compare(dirs) == [
        "ok   gemma-fp32-eager: same greedy tokens in patched (tanh GELU); in pristine, plugin (exact GELU)",
        "ok   routed-fp32-eager: same greedy tokens in patched, pristine, plugin",
    ]


@pytest.mark.fast
def test_a_difference_within_a_gelu_group_fails(tmp_path):
    other = {**EXACT, "logprobs": [[-0.15, -0.31]]}
    dirs = write(tmp_path, {"patched": {"gemma-bf16-eager": TANH}, "pristine": {"gemma-bf16-eager": EXACT}})
    dirs |= write(tmp_path, {"plugin": {"gemma-bf16-eager": other}})
    (line,) = serve_outputs.compare(dirs)
    assert line == "FAIL gemma-bf16-eager: plugin's logprobs differ from pristine's by more than 0.0e+00"


@pytest.mark.fast
def test_transformers_table(tmp_path):
    row = {
        "variant": "patched",
        "what": "vs-transformers",
        "setup": "gemma-fp32-eager",
        "gelu": "tanh",
        "to_tanh": {"max": 0.0021, "mean": 0.00031},
        "to_exact": {"max": 0.68, "mean": 0.037},
        "transformers_tanh_to_exact": {"max": 0.68, "mean": 0.037},
        "rounding": {"as": "tf32-vs-ieee-dots", "max": 0.004, "mean": 0.0005},
        "atol": {"max": 0.05, "mean": 0.005},
        "greedy_equal": True,
        "greedy_gaps": {},
        "verdict": "tanh",
    }
    flipped = {
        **row,
        "variant": "pristine",
        "setup": "gemma-bf16-graphs",
        "gelu": "exact",
        "greedy_equal": False,
        "greedy_gaps": {"Hello, world!": [[3, 0.02]]},
        "verdict": None,
    }
    (tmp_path / "patched").mkdir()
    lines = [json.dumps(row), json.dumps({"what": "server", "name": "x"}), json.dumps(flipped)]
    (tmp_path / "patched" / serve_outputs.MEASUREMENTS).write_text("\n".join(lines) + "\n")
    rows = serve_outputs.transformers_rows({"patched": tmp_path / "patched", "plugin": tmp_path / "none"})
    assert [r["setup"] for r in rows] == ["gemma-fp32-eager", "gemma-bf16-graphs"]
    header, rule, first, second = serve_outputs.transformers_table(rows)
    assert header.count("|") == rule.count("|") == first.count("|") == 11
    assert first == (
        "| patched | gemma-fp32-eager | tanh | 0.0021 / 0.00031 | 0.68 / 0.037 | 0.05 / 0.005 | equal "
        "| 0.68 / 0.037 | tf32-vs-ieee-dots 0.004 / 0.0005 | tanh |"
    )
    assert '| near-tie flips: {"Hello, world!": [[3, 0.02]]} |' in second
    assert second.endswith("| none (hidden by rounding) |")
    assert serve_outputs.transformers_table([]) == []


@pytest.mark.fast
def test_no_outputs_is_nothing_to_compare(tmp_path):
    (line,) = serve_outputs.compare({"patched": tmp_path / "patched", "pristine": tmp_path / "pristine"})
    assert not line.startswith("FAIL"), line
