"""Gemma4ForCausalLM.load_weights (the real method, of pristine 0.19.1 or of the build)
fed the expert tensors of quantized Gemma 4 26B-A4B checkpoints, on the CPU flavour.

- compressed-tensors W4A16 (fused _packed/_scale experts, vllm#40247): vLLM builds
  the real CompressedTensorsWNA16MarlinMoEMethod parameters on the CPU (loading
  needs no kernel). Pristine stops with the upstream KeyError on ..._proj_packed.
- ModelOpt NVFP4 (per-expert names already under .moe.experts, PR #41206): the CPU
  flavour has no NVFP4 MoE backend ("No module named 'flashinfer'", then none
  supported), so the checkpoint's expert names are loaded with float weights into
  the unquantized model: the rename under test comes before any quantization
  method. Pristine stops with a KeyError on .moe.moe.experts.
- AWQ (per-expert .qweight/.qzeros/.scales): vLLM's CPU flavour turns awq into
  cpu_awq, which leaves MoE layers unquantized, so the AWQ MoE parameters cannot
  be built here; tests/gpu/test_quantized_gemma4.py loads it on CUDA.

After a load, every checkpoint tensor went to a parameter (an unknown name raises),
and every expert slot of every parameter the format carries was written: the
parameters start filled with a sentinel that no written slot keeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import quantized_gemma4
import tiny_gemma4
import torch
from moe_layers import load_variant
from series_helpers import fix_of

pytest_plugins = ["moe_fixtures"]

PACKED_FIX = fix_of("https://github.com/vllm-project/vllm/pull/40708")
PREFIX_FIX = fix_of("https://github.com/vllm-project/vllm/pull/41206")
# Parameters of the MoE method that these checkpoints do not carry, and why vLLM
# does not need them: g_idx only with activation reordering (actorder is null),
# weight_shape is not read for MoE layers; the attention's q/k/v scales and zero
# points belong to a KV-cache scheme, which these configs do not have.
NOT_CARRIED = re.compile(r"(g_idx|g_idx_sort_indices|weight_shape|attn\.[qkv]_(scale|zero_point))$")


@pytest.fixture(scope="module")
def float_state() -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tiny_gemma4.make_model(seed=0).state_dict().items()}


def build(variant: str, workdir: Path, fmt: str | None):
    """The variant's Gemma4ForCausalLM for a checkpoint of `fmt` (None: unquantized),
    bf16, with every parameter filled with the sentinel."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_dir = workdir / f"{variant}-{fmt}"
    model_dir.mkdir(exist_ok=True)
    config = {**tiny_gemma4.CONFIG, "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"]}
    config["dtype"] = "bfloat16"
    if fmt:
        config["quantization_config"] = quantized_gemma4.quantization_config(fmt)
    (model_dir / "config.json").write_text(json.dumps(config))
    vllm_config = VllmConfig(model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True))
    module = load_variant(variant, "gemma4", workdir)
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(torch.bfloat16):
        model = module.Gemma4ForCausalLM(vllm_config=vllm_config, prefix="")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(sentinel(param))
    return model


def sentinel(param: torch.Tensor):
    return torch.nan if param.dtype.is_floating_point else torch.iinfo(param.dtype).min


def assert_every_slot_written(model, carried: re.Pattern) -> list[str]:
    """Every expert of every MoE parameter matching `carried` was written, and every
    other parameter but those in NOT_CARRIED; returns the expert parameters checked."""
    checked = []
    for name, param in model.named_parameters():
        if NOT_CARRIED.search(name):
            continue
        written = param != sentinel(param) if not param.dtype.is_floating_point else ~param.isnan()
        if ".moe.experts." in name:
            assert carried.search(name), name
            untouched = [e for e in range(param.shape[0]) if not written[e].any()]
            assert not untouched, f"{name}: experts {untouched} were not loaded"
            checked.append(name)
        else:
            assert written.all(), f"{name} was not loaded"
    return checked


def test_compressed_tensors_packed_experts(variant, moe_workdir, vllm_distributed, float_state):
    model = build(variant.name, moe_workdir, "w4a16")
    assert type(model.model.layers[0].moe.experts.quant_method).__name__ == (
        "CompressedTensorsWNA16MarlinMoEMethod"
    )
    tensors, _ = quantized_gemma4.quantize(float_state, "w4a16")
    assert "model.language_model.layers.0.experts.down_proj_packed" in tensors  # the names of #40247
    if variant.lacks(PACKED_FIX):
        # The upstream symptom: the per-expert _packed name reaches the plain lookup.
        with pytest.raises(KeyError, match=r"layers\.\d+\.moe\.experts\.\d+\.(gate|up|down)_proj_packed"):
            model.load_weights(iter(tensors.items()))
        return
    model.load_weights(iter(tensors.items()))
    checked = assert_every_slot_written(model, re.compile(r"experts\.w(13|2)_weight_(packed|scale)$"))
    assert len(checked) == 4 * tiny_gemma4.CONFIG["num_hidden_layers"]


def nvfp4_names_with_float_experts(float_state) -> dict[str, torch.Tensor]:
    """The NVFP4 checkpoint's tensor names, its experts' .weight holding the float
    weights (bf16) in the unquantized model's shape."""
    tensors, _ = quantized_gemma4.quantize(float_state, "nvfp4")
    named = {n: t for n, t in tensors.items() if ".moe.experts." not in n}
    for name in tensors:
        found = re.fullmatch(
            r"model\.language_model\.(layers\.\d+\.)moe\.experts\.(\d+)\.(\w+)_proj\.weight", name
        )
        if found:
            layer, expert, proj = found[1], int(found[2]), found[3]
            gate_up = float_state[f"model.{layer}experts.gate_up_proj"][expert]
            weight = {
                "gate": gate_up[: gate_up.shape[0] // 2],
                "up": gate_up[gate_up.shape[0] // 2 :],
                "down": float_state[f"model.{layer}experts.down_proj"][expert],
            }[proj]
            named[name] = weight.to(torch.bfloat16)
    return named


def test_modelopt_names_already_under_moe(variant, moe_workdir, vllm_distributed, float_state):
    model = build(variant.name, moe_workdir, None)
    tensors = nvfp4_names_with_float_experts(float_state)
    assert "model.language_model.layers.0.moe.experts.0.down_proj.weight" in tensors  # as in #41206
    if variant.lacks(PREFIX_FIX):
        with pytest.raises(KeyError, match=r"\.moe\.moe\.experts\.\d+\."):
            model.load_weights(iter(tensors.items()))
        return
    model.load_weights(iter(tensors.items()))
    assert_every_slot_written(model, re.compile(r"experts\.w(13|2)_weight$"))
    for layer in range(tiny_gemma4.CONFIG["num_hidden_layers"]):
        experts = model.model.layers[layer].moe.experts
        expected = float_state[f"model.layers.{layer}.experts.gate_up_proj"].to(torch.bfloat16)
        assert torch.equal(experts.w13_weight.detach(), expected)
        expected = float_state[f"model.layers.{layer}.experts.down_proj"].to(torch.bfloat16)
        assert torch.equal(experts.w2_weight.detach(), expected)
