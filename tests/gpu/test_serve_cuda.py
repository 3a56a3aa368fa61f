"""`vllm serve` on the GPU, in this process's variant, of the tiny checkpoints of
tests/make-tiny-checkpoints: eager and with torch.compile + CUDA graphs, float32 and
bfloat16 (FlashAttention on Hopper). All servers of a process start at once, each with
a small share of the GPU.

Checked here: every server comes up and answers /version with the variant's version;
the routed checkpoint's greedy text equals transformers' on the GPU; with the plugin,
the API server and the engine core log its INFO line. Each variant writes its greedy
outputs (serve_outputs.FILE); tests/run-gpu-tests then checks that the variants agree.
"""

from __future__ import annotations

import gpu_env
import pytest

if reason := gpu_env.unavailable():
    pytest.skip(reason, allow_module_level=True)

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import plugin_helpers  # noqa: E402
import serve_outputs  # noqa: E402
import torch  # noqa: E402
from build_helpers import PINS, REPO  # noqa: E402
from serve_helpers import (  # noqa: E402
    Completion,
    Server,
    assert_logprobs_close,
    greedy_completion,
    server_env,
    start_server,
    stop,
    transformers_greedy,
    wait_until_healthy,
)
from transformers import AutoTokenizer, Qwen3MoeForCausalLM  # noqa: E402

PLAIN, SHARED = "qwen3-moe-tiny", "qwen3-moe-tiny-shared"
PROMPTS = ["The quick brown fox", "Hello, world!", "Mixture of experts: ", "Grüße ✓"]
MAX_TOKENS, TOP_K = 16, 5
STARTUP_TIMEOUT = 330.0  # twelve servers may start at once (four per variant)
# Each server's share of the GPU: several servers per process, three processes at once.
# A fixed KV cache skips vLLM's memory profiling, whose free-memory check assumes no
# other process on the GPU changes its usage meanwhile.
GPU_FLAGS = [
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "4",
    "--gpu-memory-utilization",
    "0.04",
    "--kv-cache-memory-bytes",
    str(64 << 20),
]
# float32 in vLLM's Triton kernels runs TF32 on Hopper: logprobs against transformers'
# float32 agree to about 1e-2, not to the 1e-3 of the CPU tests.
TRANSFORMERS_LOGPROB_ATOL = 5e-2


@dataclass(frozen=True)
class Setup:
    checkpoint: str
    dtype: str
    eager: bool

    @property
    def flags(self) -> list[str]:
        return ["--dtype", self.dtype, *GPU_FLAGS, *(["--enforce-eager"] if self.eager else [])]


# Eager and compiled with CUDA graphs, float32 and bfloat16, four servers per variant.
SETUPS = {
    "routed-fp32-eager": Setup(PLAIN, "float32", eager=True),
    "shared-fp32-graphs": Setup(SHARED, "float32", eager=False),
    "shared-bf16-eager": Setup(SHARED, "bfloat16", eager=True),
    "shared-bf16-graphs": Setup(SHARED, "bfloat16", eager=False),
}


@dataclass
class Served:
    """What one server answered before it was stopped, or why it did not."""

    log: Path
    error: str = ""
    version: str = ""
    completions: list[Completion] = field(default_factory=list)
    startup_seconds: float = 0.0
    exit_code: int | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def require(self) -> Served:
        if self.error:
            pytest.fail(self.error)
        return self


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(
        [sys.executable, str(REPO / "tests/make-tiny-checkpoints"), str(out)], check=True, capture_output=True
    )
    return out


def logs_dir(tmp_path_factory) -> Path:
    if out := gpu_env.out_dir():
        (out / "server-logs").mkdir(parents=True, exist_ok=True)
        return out / "server-logs"
    return tmp_path_factory.mktemp("server-logs")


def serve_command(model: Path, setup: Setup) -> list[str]:
    """`vllm serve`, through its module: the kit's trees have no console script."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(model),
        "--served-model-name",
        model.name,
        *setup.flags,
    ]


def variant_env() -> dict[str, str]:
    """The servers import this process's variant (PYTHONPATH); the plugin logs at DEBUG,
    naming each module it serves."""
    extra = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if gpu_env.variant() == "plugin":
        extra["VLLM_LOGGING_LEVEL"] = "DEBUG"
    return server_env(extra)


def finish(name: str, server: Server, served: Served, prompts: list[list[int]]) -> None:
    """Wait for one started server, take its greedy completions, stop it. Records any
    failure in `served` instead of raising, so the other servers go on."""
    try:
        wait_until_healthy(server, STARTUP_TIMEOUT)
        served.startup_seconds = server.startup_seconds
        served.version = server.get("/version").json()["version"]
        model = SETUPS[name].checkpoint
        served.completions = [greedy_completion(server, model, p, MAX_TOKENS, TOP_K) for p in prompts]
    except Exception as error:  # noqa: BLE001 - reported by the tests of this server
        served.error = f"{name}: {type(error).__name__}: {error}"
    finally:
        stop(server)
        served.exit_code = server.process.returncode


@pytest.fixture(scope="module")
def fleet(checkpoints, tmp_path_factory) -> dict[str, Served]:
    """Every setup served at once, queried and stopped; the greedy outputs written for
    the comparison across variants."""
    logs, env = logs_dir(tmp_path_factory), variant_env()
    caches = tmp_path_factory.mktemp("vllm-cache")
    servers, fleet = {}, {}
    for name, setup in SETUPS.items():
        fleet[name] = Served(logs / f"{name}.log")
        # A compile cache of its own: servers of two variants may compile the same code at once.
        own_env = {**env, "VLLM_CACHE_ROOT": str(caches / name)}
        servers[name] = start_server(
            serve_command(checkpoints / setup.checkpoint, setup), fleet[name].log, own_env
        )
        time.sleep(2)  # staggered: the processes do not all import at the same instant
    prompts = prompt_ids(checkpoints)
    with ThreadPoolExecutor(len(servers)) as pool:
        done = {
            name: pool.submit(finish, name, server, fleet[name], prompts) for name, server in servers.items()
        }
    for name, future in done.items():
        if future.exception() and not fleet[name].error:
            fleet[name].error = f"{name}: {future.exception()!r}"
    outputs = {
        name: {
            "tokens": [c.tokens for c in run.completions],
            "logprobs": [c.logprobs for c in run.completions],
            "attention": attention_backend(run),
            "startup_seconds": run.startup_seconds,
        }
        for name, run in fleet.items()
        if not run.error
    }
    if out := gpu_env.out_dir():
        serve_outputs.write(out, outputs)
    for name, run in fleet.items():
        gpu_env.record(
            "server",
            name=name,
            startup_seconds=round(run.startup_seconds, 1),
            attention=attention_backend(run),
            error=run.error,
        )
    return fleet


def prompt_ids(checkpoints: Path) -> list[list[int]]:
    """PROMPTS as token ids (both checkpoints share one tokenizer): the servers and
    transformers get the same ids."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / PLAIN)
    return [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def attention_backend(run: Served) -> str:
    found = re.search(r"Using (\w+) attention backend", run.text()) if run.log.exists() else None
    return found[1] if found else "unknown"


def expected_version() -> str:
    return PINS.patched_version(PINS.pin, "cuda") if gpu_env.variant() == "patched" else PINS.pin


@pytest.mark.parametrize("name", SETUPS)
def test_server_answers_and_shuts_down(fleet, name):
    run = fleet[name].require()
    assert run.version == expected_version()
    assert len(run.completions) == len(PROMPTS)
    assert all(len(c.tokens) == MAX_TOKENS for c in run.completions)
    assert run.exit_code == 0, f"{name} exited with {run.exit_code}"


@pytest.mark.parametrize("name", [n for n, s in SETUPS.items() if s.dtype == "bfloat16"])
def test_bfloat16_takes_flash_attention(fleet, name):
    assert attention_backend(fleet[name].require()) == "FLASH_ATTN"


def test_routed_checkpoint_matches_transformers_on_the_gpu(fleet, checkpoints):
    run = fleet["routed-fp32-eager"].require()
    model = Qwen3MoeForCausalLM.from_pretrained(checkpoints / PLAIN, dtype=torch.float32)
    model = model.to("cuda").eval()
    for ids, served in zip(prompt_ids(checkpoints), run.completions, strict=True):
        reference = transformers_greedy(model, ids, MAX_TOKENS, TOP_K)
        assert_logprobs_close(reference, served, atol=TRANSFORMERS_LOGPROB_ATOL)


@pytest.mark.skipif(gpu_env.variant() != "plugin", reason="the plugin variant only")
@pytest.mark.parametrize("name", SETUPS)
def test_plugin_applied_in_api_server_and_engine_core(fleet, name):
    names, applied, served = plugin_helpers.plugin_log(fleet[name].require().log)
    for process in ("APIServer", "EngineCore"):
        assert process in names and names[process] in applied, (process, names, applied)
    # The engine core loads the model: it imported qwen3_moe from the plugin.
    assert "vllm.model_executor.models.qwen3_moe" in served.get(names["EngineCore"], set())
