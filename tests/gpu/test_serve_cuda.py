"""`vllm serve` on the GPU, in this process's variant, of the tiny checkpoints of
tests/make-tiny-checkpoints (Qwen3-MoE and Gemma4): eager and with torch.compile + CUDA
graphs, float32 and bfloat16. All servers of a process start at once, each with a small
share of the GPU.

Checked here: every server comes up and answers /version with the variant's version;
the routed Qwen3 checkpoint's greedy text equals transformers' on the GPU; Gemma4's
prompt and greedy logprobs agree with transformers' on the GPU with the experts' GELU
this variant should run, within the kernels' precision (the deviations from both GELUs'
references are recorded for tests/run-gpu-tests' table); with the plugin, the API
server and the engine core log its INFO line. Each variant writes its greedy outputs
(serve_outputs.FILE); tests/run-gpu-tests then checks that the variants agree.
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

import against_transformers as against  # noqa: E402
import plugin_helpers  # noqa: E402
import serve_outputs  # noqa: E402
import torch  # noqa: E402
from build_helpers import PINS, REPO  # noqa: E402
from series_helpers import GELU_FIX, MODULES  # noqa: E402
from serve_helpers import (  # noqa: E402
    Completion,
    Echoed,
    Server,
    assert_logprobs_close,
    echoed_completion,
    greedy_completion,
    server_env,
    start_server,
    stop,
    transformers_greedy,
    wait_until_healthy,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM  # noqa: E402

PLAIN, SHARED, GEMMA = "qwen3-moe-tiny", "qwen3-moe-tiny-shared", "gemma4-moe-tiny"
MODEL_MODULES = {PLAIN: "qwen3_moe", SHARED: "qwen3_moe", GEMMA: "gemma4"}  # in vllm.model_executor.models
PROMPTS = ["The quick brown fox", "Hello, world!", "Mixture of experts: ", "Grüße ✓"]
MAX_TOKENS, TOP_K = 16, 5
STARTUP_TIMEOUT = 420.0  # 27 servers may start at once (nine per variant)
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
# Triton's tl.dot in IEEE float32 (TRITON_F32_DEFAULT=ieee) leaves float32 rounding alone:
# on the CPU, vLLM's float32 gemma4-moe-tiny is at most 1.7e-4 (mean 1.4e-5) from
# transformers' float64 (benchmarks/gemma4-precision, TESTING.md).
IEEE_LOGPROB_ATOL = 1e-3
# Gemma4 servers against transformers' float32: the largest and the mean deviation within
# this many times the rounding at the server's precision, and at least within the floor of
# that precision (TRANSFORMERS_LOGPROB_ATOL, IEEE_LOGPROB_ATOL; mean: a tenth of it). The
# rounding: bfloat16, transformers' own bfloat16 run from its float32 one; float32 with
# IEEE dots, transformers' own float32 from its float64; float32 as vLLM runs it (TF32
# Triton dots), this server from the one with IEEE dots (FP32_IEEE), the same code.
# The Gemma4 checkpoint's weights are large, so that the two GELUs give different logits:
# the rounding grows through its layers too.
ROUNDING_FACTOR = 4.0
# A model-level GELU verdict only where transformers' two GELU references differ by at
# least this many times the served model's mean deviation from the nearer one.
GELU_VERDICT_FACTOR = 10.0
# Gemma4's experts should run tanh GELU (its hidden_activation); pristine 0.19.1 and the
# plugin (which does not carry that patch) run exact GELU.
GEMMA4_GELU = "tanh" if gpu_env.has_fix(GELU_FIX) else "exact"


@dataclass(frozen=True)
class Setup:
    checkpoint: str
    dtype: str
    eager: bool
    env: tuple[tuple[str, str], ...] = ()  # the server's extra environment

    @property
    def flags(self) -> list[str]:
        return ["--dtype", self.dtype, *GPU_FLAGS, *(["--enforce-eager"] if self.eager else [])]


# Every Triton tl.dot of the server in IEEE float32 instead of TF32.
IEEE_DOTS = (("TRITON_F32_DEFAULT", "ieee"),)
FP32_IEEE = "gemma-fp32ieee-eager"
# Eager and compiled with CUDA graphs, float32 and bfloat16, and Gemma4 in float32 with
# IEEE dots: nine servers per variant.
SETUPS = {
    "routed-fp32-eager": Setup(PLAIN, "float32", eager=True),
    "shared-fp32-graphs": Setup(SHARED, "float32", eager=False),
    "shared-bf16-eager": Setup(SHARED, "bfloat16", eager=True),
    "shared-bf16-graphs": Setup(SHARED, "bfloat16", eager=False),
    "gemma-fp32-eager": Setup(GEMMA, "float32", eager=True),
    "gemma-fp32-graphs": Setup(GEMMA, "float32", eager=False),
    "gemma-bf16-eager": Setup(GEMMA, "bfloat16", eager=True),
    "gemma-bf16-graphs": Setup(GEMMA, "bfloat16", eager=False),
    FP32_IEEE: Setup(GEMMA, "float32", eager=True, env=IEEE_DOTS),
}
# Served with the prompt echoed (prompt and greedy logprobs), for transformers' comparison.
ECHOED = [name for name, setup in SETUPS.items() if setup.checkpoint == GEMMA]


@dataclass
class Served:
    """What one server answered before it was stopped, or why it did not."""

    log: Path
    error: str = ""
    version: str = ""
    completions: list[Completion] = field(default_factory=list)
    echoed: list[Echoed] = field(default_factory=list)  # the setups in ECHOED
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
    return gpu_env.server_logs(tmp_path_factory.mktemp("server-logs"))


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
        if name in ECHOED:
            served.echoed = [echoed_completion(server, model, p, MAX_TOKENS, TOP_K) for p in prompts]
            served.completions = [e.generated() for e in served.echoed]
        else:
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
        own_env = {**env, **dict(setup.env), "VLLM_CACHE_ROOT": str(caches / name)}
        if setup.env:  # Triton's cache key leaves out TRITON_F32_DEFAULT
            own_env["TRITON_CACHE_DIR"] = str(caches / name / "triton")
        servers[name] = start_server(
            serve_command(checkpoints / setup.checkpoint, setup), fleet[name].log, own_env
        )
        time.sleep(2)  # staggered: the processes do not all import at the same instant
    prompts = {name: prompt_ids(checkpoints, setup.checkpoint) for name, setup in SETUPS.items()}
    with ThreadPoolExecutor(len(servers)) as pool:
        done = {
            name: pool.submit(finish, name, server, fleet[name], prompts[name])
            for name, server in servers.items()
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
            # Variants of other expert GELUs are not compared with each other.
            **({"gelu": GEMMA4_GELU} if SETUPS[name].checkpoint == GEMMA else {}),
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


def prompt_ids(checkpoints: Path, checkpoint: str) -> list[list[int]]:
    """PROMPTS as the checkpoint's token ids: the servers and transformers get the same ids."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / checkpoint)
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


@pytest.mark.parametrize(
    "name", [n for n, s in SETUPS.items() if s.dtype == "bfloat16" and s.checkpoint != GEMMA]
)
def test_bfloat16_takes_flash_attention(fleet, name):
    assert attention_backend(fleet[name].require()) == "FLASH_ATTN"


def test_routed_checkpoint_matches_transformers_on_the_gpu(fleet, checkpoints):
    run = fleet["routed-fp32-eager"].require()
    model = Qwen3MoeForCausalLM.from_pretrained(checkpoints / PLAIN, dtype=torch.float32)
    model = model.to("cuda").eval()
    for ids, served in zip(prompt_ids(checkpoints, PLAIN), run.completions, strict=True):
        reference = transformers_greedy(model, ids, MAX_TOKENS, TOP_K)
        assert_logprobs_close(reference, served, atol=TRANSFORMERS_LOGPROB_ATOL)


@pytest.fixture(scope="module")
def gemma4_references(checkpoints) -> dict[str, against.Reference]:
    """transformers' Gemma4 of the checkpoint on the GPU, plain eager code: float32 with
    tanh-GELU experts (the checkpoint's) and with exact-GELU experts; and, with tanh GELU,
    the rounding yardsticks: float64 and bfloat16."""

    def load(dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoints / GEMMA, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
        )
        return model.to("cuda").eval()

    fp32, bf16, fp64 = load(torch.float32), load(torch.bfloat16), load(torch.float64)
    tanh = against.with_expert_gelu(fp32, "tanh")
    return {
        "tanh": against.Reference(tanh),
        "exact": against.Reference(against.with_expert_gelu(fp32, "exact")),
        "bf16": against.Reference(against.with_expert_gelu(bf16, "tanh")),
        "fp64": against.Reference(against.with_expert_gelu(fp64, "tanh")),
    }


def rounding(fleet, name: str, rows: dict[str, list[torch.Tensor]]) -> tuple[str, against.Spread, float]:
    """(what, spread, floor): the rounding yardstick of setup `name` (ROUNDING_FACTOR) at
    the logprobs its server returned, and the tolerance's floor."""
    setup, run = SETUPS[name], fleet[name]
    echoed = list(enumerate(run.echoed))
    if setup.dtype == "bfloat16" or setup.env:
        other, what = ("bf16", "bf16") if setup.dtype == "bfloat16" else ("fp64", "fp32-vs-fp64")
        values = [d for i, e in echoed for d in against.between(e, rows["tanh"][i], rows[other][i])]
        return what, against.Spread.of(values), IEEE_LOGPROB_ATOL if setup.env else TRANSFORMERS_LOGPROB_ATOL
    ieee = fleet[FP32_IEEE].require()
    values = [d for i, e in echoed for d in against.served_apart(e, ieee.echoed[i])]
    return "tf32-vs-ieee-dots", against.Spread.of(values), TRANSFORMERS_LOGPROB_ATOL


@pytest.mark.parametrize("name", ECHOED)
def test_gemma4_matches_transformers_on_the_gpu(fleet, gemma4_references, name):
    """Prompt and greedy logprobs against transformers' float32 with this variant's expert
    GELU, max and mean within the precision transformers itself shows at the server's
    (ROUNDING_FACTOR);
    the greedy tokens are transformers' but where transformers' own top two lie within that
    tolerance. Deviations from both GELUs' references are recorded, with a model-level GELU
    verdict only where they show one."""
    run = fleet[name].require()
    rows = {
        ref: [reference.logprobs(e.tokens) for e in run.echoed]
        for ref, reference in gemma4_references.items()
    }
    echoed = list(enumerate(run.echoed))
    to = {
        gelu: against.Spread.of([d for i, e in echoed for d in against.deviations(e, rows[gelu][i])])
        for gelu in against.GELUS
    }
    signal = against.Spread.of(
        [d for i, e in echoed for d in against.between(e, rows["tanh"][i], rows["exact"][i])]
    )
    what, spread, floor = rounding(fleet, name, rows)
    atol = against.Spread(
        max(floor, ROUNDING_FACTOR * spread.max), max(floor / 10, ROUNDING_FACTOR * spread.mean)
    )
    gaps = {i: against.greedy_gaps(e, rows[GEMMA4_GELU][i]) for i, e in echoed}
    gelu_verdict = against.verdict(to, signal, GELU_VERDICT_FACTOR)
    gpu_env.record(
        "vs-transformers",
        setup=name,
        gelu=GEMMA4_GELU,
        values=sum(len(step) for e in run.echoed for step in e.top),
        **{f"to_{gelu}": spread.as_dict() for gelu, spread in to.items()},
        transformers_tanh_to_exact=signal.as_dict(),
        rounding={"as": what, **spread.as_dict()},
        atol=atol.as_dict(),
        greedy_equal=not any(gaps.values()),
        greedy_gaps={PROMPTS[i]: g for i, g in gaps.items() if g},
        verdict=gelu_verdict,
    )
    own = to[GEMMA4_GELU]
    assert own.max <= atol.max and own.mean <= atol.mean, f"{name}: {own} from transformers, tolerance {atol}"
    for i, prompt_gaps in gaps.items():
        assert all(gap <= atol.max for _, gap in prompt_gaps), (PROMPTS[i], prompt_gaps, atol)
    assert gelu_verdict in (None, GEMMA4_GELU), f"{name} runs {gelu_verdict} GELU at model level"


@pytest.mark.skipif(gpu_env.variant() != "plugin", reason="the plugin variant only")
@pytest.mark.parametrize("name", SETUPS)
def test_plugin_applied_in_api_server_and_engine_core(fleet, name):
    names, applied, served = plugin_helpers.plugin_log(fleet[name].require().log)
    for process in ("APIServer", "EngineCore"):
        assert process in names and names[process] in applied, (process, names, applied)
    # The engine core loads the model: it imported the model's module from the plugin.
    module = f"vllm.model_executor.models.{MODEL_MODULES[SETUPS[name].checkpoint]}"
    assert module in MODULES, f"the plugin does not serve {module}"
    assert module in served.get(names["EngineCore"], set())
