"""benchmarks/bench-serve without a GPU: its arguments, its table from recorded rounds,
and the model directory it serves (Gemma 4 26B-A4B's config as vLLM reads it, a
tokenizer of the real vocabulary size that vLLM's random dataset can use)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys

import pytest
from build_helpers import REPO

SCRIPT = REPO / "benchmarks/bench-serve"


def bench_serve():
    loader = importlib.machinery.SourceFileLoader("bench_serve", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module  # its dataclasses look their module up
    loader.exec_module(module)
    return module


BENCH = bench_serve()


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)


def metrics(scale: float) -> dict:
    return {key: scale * (i + 1) for i, key in enumerate(BENCH.METRICS)} | {"duration": 9.0}


def report(rounds: list[dict]) -> dict:
    variants = ["patched", "pristine"]
    settings = {
        "model": "Gemma 4 26B-A4B (Gemma4ForCausalLM)",
        "enforce_eager": False,
        "uniform_routing": False,
        "serial": False,
        "num_prompts": 64,
        "input_len": 512,
        "output_len": 128,
        "max_concurrency": 32,
        "rounds": 3,
    }
    servers = [{"variant": v, "startup_seconds": s} for v, s in zip(variants, (151.2, 149.7))]
    return {
        "settings": settings,
        "variants": variants,
        "servers": servers,
        "gpu_memory": "120000 MiB, 143771 MiB",
        "wall_seconds": 301.4,
        "rounds": rounds,
        "summary": BENCH.summarize(rounds, variants) if rounds else None,
    }


@pytest.mark.fast
def test_ratios_per_round_and_their_spread():
    rounds = [
        {"patched": metrics(a), "pristine": metrics(b)} for a, b in ((1.0, 1.0), (1.1, 1.0), (0.9, 1.0))
    ]
    summary = BENCH.summarize(rounds, ["patched", "pristine"])
    throughput = summary["output_throughput"]
    assert throughput["patched"] == 1.0 and throughput["pristine"] == 1.0
    assert throughput["ratio"] == 1.0
    assert (throughput["ratio_min"], throughput["ratio_max"]) == pytest.approx((0.9, 1.1))
    assert summary["p99_itl_ms"]["patched"] == 6.0  # the sixth metric, scale 1


@pytest.mark.fast
def test_table_of_a_recorded_run(tmp_path):
    rounds = [
        {"patched": metrics(1.02), "pristine": metrics(1.0)},
        {"patched": metrics(0.98), "pristine": metrics(1.0)},
    ]
    (tmp_path / "bench.json").write_text(json.dumps(report(rounds)))
    result = run("--table", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 timed rounds (of 3) after one warm-up round per server" in lines[0]
    assert "torch.compile + CUDA graphs" in lines[0] and "side by side on one GPU" in lines[0]
    assert lines[1].startswith("Server starts: patched 151 s, pristine 150 s;")
    assert lines[1].endswith("; wall time 301 s.")
    assert "| patched | pristine | patched/pristine (median of rounds) | min-max over rounds |" in lines[3]
    assert "| output throughput (tok/s) | 1.00 | 1.00 | 1.000 | 0.980-1.020 |" in lines
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(BENCH.METRICS)


@pytest.mark.fast
def test_table_of_a_run_without_timed_rounds(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(report([]) | {"note": "Rounds stopped after 0 of 3."}))
    result = run("--table", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["Rounds stopped after 0 of 3.", "No timed round finished."]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "--out is required"),
        (["--out", "x", "--variants", "patched"], "--variants takes two of patched, pristine, plugin"),
        (["--out", "x", "--variants", "patched,nightly"], "--variants takes two of"),
        (["--out", "x"], "set VLLM_OVERLAY_GPU_PATCHED, VLLM_OVERLAY_GPU_PRISTINE"),
    ],
)
def test_argument_errors(tmp_path, args, error):
    env = {"PATH": "/usr/bin:/bin"}  # no VLLM_OVERLAY_GPU_* variables
    result = run(*args, env=env)
    assert result.returncode == 2 and error in result.stderr, result.stderr


def test_model_directory_has_the_26b_a4b_shapes_and_a_full_size_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.config import ModelConfig
    from vllm.tokenizers import get_tokenizer

    directory = BENCH.write_model(tmp_path / "model")
    config = ModelConfig(model=str(directory), dtype="bfloat16").hf_text_config
    assert config.architectures == ["Gemma4ForCausalLM"] and config.model_type == "gemma4_text"
    expected = {k: v for k, v in BENCH.TEXT_CONFIG.items() if k not in ("rope_parameters",)}
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.num_experts, config.top_k_experts, config.moe_intermediate_size) == (128, 8, 704)
    assert (config.global_head_dim, config.attention_k_eq_v, config.hidden_size_per_layer_input) == (
        512,
        True,
        0,
    )

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.vocab_size == len(tokenizer) == 262144
    ids = [4, 77, 100000, 262143]
    assert tokenizer.encode(tokenizer.decode(ids)) == [config.bos_token_id, *ids]
    # vLLM's random dataset gets prompts of exactly the asked length (the BOS included).
    requests = RandomDataset(random_seed=1).sample(
        tokenizer=get_tokenizer(str(directory)), num_requests=4, input_len=512, output_len=8
    )
    assert [len(tokenizer.encode(r.prompt)) for r in requests] == [512] * 4
