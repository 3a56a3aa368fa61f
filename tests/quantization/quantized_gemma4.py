"""Tiny quantized Gemma4 MoE checkpoints, written from a float Gemma4 checkpoint in
transformers' layout (Gemma4ForCausalLM: model.layers.N.experts.gate_up_proj
[E, 2I, H] and experts.down_proj [E, H, I]), such as tiny_gemma4's.

Only the routed experts are quantized; every other tensor is kept in bfloat16 and
named as in the real checkpoints, under model.language_model.*. Each format uses
the expert tensor names of published Gemma 4 26B-A4B checkpoints:

- "w4a16": compressed-tensors pack-quantized int4, symmetric, group size 32 (the
  smallest Marlin's MoE kernel takes), written with the compressed-tensors package
  (its qparams, quantize and pack_to_int32). The experts stay fused, 3D, as in
  cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit (vllm#40247, #40591):
  layers.N.experts.{gate_up,down}_proj_{packed,scale}.
- "awq": AutoAWQ GEMM layout (qweight [in, out/8] and qzeros [in/g, out/8] packed in
  AWQ's nibble order, scales [in/g, out]), asymmetric int4, group size 32, one
  tensor set per expert: layers.N.experts.{e}.{gate,up,down}_proj.{qweight,qzeros,scales}
  (the dot-suffix names of FusedMoE.make_expert_params_mapping).
- "nvfp4": ModelOpt NVFP4 (FP4 E2M1 values two per byte, an FP8 E4M3 scale per 16
  inputs, a float32 weight_scale_2 per tensor, and input_scale), one tensor set per
  expert already under .moe.experts, as in bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4
  (vllm#41206): layers.N.moe.experts.{e}.{gate,up,down}_proj.{weight,weight_scale,
  weight_scale_2,input_scale}.

dequantized() gives the float checkpoint with each expert weight replaced by what
its quantized form decodes to, in float64: the reference the quantized model must
match, so the test measures kernels and loading, not the quantization itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMATS = ("w4a16", "awq", "nvfp4")
GROUP_SIZE = 32  # int4 formats; NVFP4's block is 16
NVFP4_BLOCK = 16
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ's nibble order within an int32
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
FP8_MAX, FP4_MAX = 448.0, 6.0
PREFIX = "model.language_model."  # where the real checkpoints keep the text model
# Modules that stay unquantized, as vLLM names them (only the experts are quantized).
DENSE_MODULES = ["self_attn", "mlp", "router", "lm_head"]


def quantization_config(fmt: str) -> dict:
    if fmt == "w4a16":
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": GROUP_SIZE,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ["lm_head", *(f"re:.*\\.{m}\\..*" for m in DENSE_MODULES[:-1])],
            "kv_cache_scheme": None,
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": GROUP_SIZE,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": [f".{m}." for m in DENSE_MODULES[:-1]] + ["lm_head"],
        }
    if fmt == "nvfp4":
        return {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "group_size": NVFP4_BLOCK,
            "kv_cache_quant_algo": None,
            "ignore": ["lm_head", *(f"*{m}*" for m in DENSE_MODULES[:-1])],  # the flat form's key
        }
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


# --- the three codecs: float64 weight [..., out, in] -> tensors, and back ----------


def w4a16(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' own symmetric int4 group quantization and packing."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**quantization_config("w4a16")["config_groups"]["group_0"]["weights"])
    weight = weight.to(torch.bfloat16)
    packed, scales, decoded = [], [], []
    for w in weight.reshape(-1, *weight.shape[-2:]):  # one [out, in] matrix at a time
        groups = w.reshape(w.shape[0], -1, GROUP_SIZE)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        scale = scale.to(torch.bfloat16)
        q = quantize(w, scale, zero, args, dtype=torch.int8)
        packed.append(pack_to_int32(q, 4))
        scales.append(scale)
        decoded.append(dequantize(q, scale.double(), zero, args, dtype=torch.float64))
    shape = weight.shape[:-2]
    return (
        {
            "packed": torch.stack(packed).reshape(*shape, *packed[0].shape),
            "scale": torch.stack(scales).reshape(*shape, *scales[0].shape),
        },
        torch.stack(decoded).reshape(weight.shape),
    )


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] of 0..15 -> [rows, cols / 8] int32 in AWQ's nibble order."""
    grouped = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.int64)
    for i, position in enumerate(AWQ_ORDER):
        packed |= grouped[..., i] << (4 * position)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def awq(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Asymmetric int4 per group of GROUP_SIZE inputs, in AutoAWQ's GEMM layout, fp16 scales."""
    w = weight.to(torch.float64).t()  # [in, out]
    groups = w.reshape(-1, GROUP_SIZE, w.shape[1])  # [in / g, g, out]
    low, high = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
    # Scales that bfloat16 and float16 both hold exactly: vLLM keeps them in the model dtype.
    scale = ((high - low) / 15).clamp(min=1e-4).to(torch.bfloat16).double()
    zero = (-low / scale).round().clamp(0, 15)
    q = (groups / scale[:, None] + zero[:, None]).round().clamp(0, 15)
    decoded = ((q - zero[:, None]) * scale[:, None]).reshape(w.shape).t()
    tensors = {
        "qweight": _awq_pack(q.reshape(w.shape)),
        "qzeros": _awq_pack(zero),
        "scales": scale.to(torch.float16),
    }
    return tensors, decoded.contiguous()


def nvfp4(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ModelOpt NVFP4: E2M1 values, an E4M3 scale per block of 16 inputs, and a global
    scale from `amax` (by default the weight's own; gate and up share theirs, since
    vLLM keeps one weight_scale_2 for both)."""
    w = weight.to(torch.float64)
    global_scale = (w.abs().max() if amax is None else amax.double()) / (FP4_MAX * FP8_MAX)
    blocks = w.reshape(w.shape[0], -1, NVFP4_BLOCK)
    block_scale = (blocks.abs().amax(-1) / FP4_MAX / global_scale).to(torch.float8_e4m3fn)
    scale = block_scale.double() * global_scale
    scaled = blocks / scale.clamp(min=1e-30)[..., None]
    index = (scaled.abs()[..., None] - FP4_VALUES).abs().argmin(-1)  # nearest E2M1 magnitude
    codes = (index | ((scaled < 0).to(torch.int64) << 3)).reshape(w.shape)
    decoded = (FP4_VALUES[index] * scaled.sign() * scale[..., None]).reshape(w.shape)
    tensors = {
        "weight": (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8),  # low nibble first
        "weight_scale": block_scale,
        "weight_scale_2": global_scale.to(torch.float32),
        "input_scale": torch.tensor(1.0 / (FP4_MAX * FP8_MAX), dtype=torch.float32),
    }
    return tensors, decoded


# --- checkpoints --------------------------------------------------------------------


def _experts(state: dict[str, torch.Tensor]):
    """(layer prefix, gate_up [E, 2I, H], down [E, H, I]) per MoE layer."""
    for name in sorted(state):
        if name.endswith(".experts.gate_up_proj"):
            layer = name.removesuffix("experts.gate_up_proj")
            yield layer, state[name], state[layer + "experts.down_proj"]


def quantize(
    state: dict[str, torch.Tensor], fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the quantized checkpoint's tensors, the float state dict with the experts dequantized)."""
    tensors = {
        PREFIX + name.removeprefix("model."): t.to(torch.bfloat16)
        for name, t in state.items()
        if ".experts." not in name and name != "lm_head.weight"  # tied to the embeddings
    }
    reference = {name: t.to(torch.float64) for name, t in state.items()}
    for layer, gate_up, down in _experts(state):
        out = PREFIX + layer.removeprefix("model.")
        if fmt == "w4a16":
            for proj, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
                quantized, reference[layer + "experts." + proj] = w4a16(weight)
                tensors |= {f"{out}experts.{proj}_{k}": v for k, v in quantized.items()}
            continue
        codec, folder = (awq, "experts") if fmt == "awq" else (nvfp4, "moe.experts")
        halves = gate_up.shape[1] // 2
        decoded = {"gate_up_proj": torch.empty_like(gate_up, dtype=torch.float64), "down_proj": []}
        for e in range(gate_up.shape[0]):
            projections = {
                "gate_proj": gate_up[e, :halves],
                "up_proj": gate_up[e, halves:],
                "down_proj": down[e],
            }
            for proj, weight in projections.items():
                extra = {"amax": gate_up[e].abs().max()} if fmt == "nvfp4" and proj != "down_proj" else {}
                quantized, back = codec(weight.to(torch.bfloat16), **extra)
                tensors |= {f"{out}{folder}.{e}.{proj}.{k}": v for k, v in quantized.items()}
                if proj == "down_proj":
                    decoded["down_proj"].append(back)
                else:
                    rows = slice(0, halves) if proj == "gate_proj" else slice(halves, None)
                    decoded["gate_up_proj"][e, rows] = back
        reference[layer + "experts.gate_up_proj"] = decoded["gate_up_proj"]
        reference[layer + "experts.down_proj"] = torch.stack(decoded["down_proj"])
    return tensors, reference


def write(source: Path, dest: Path, fmt: str) -> None:
    """A quantized copy of the float checkpoint `source` (config.json, model.safetensors,
    tokenizer files) at `dest`."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in ("config.json", "model.safetensors"):
            (dest / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.pop("torch_dtype", None)  # transformers 5 writes "dtype"
    config |= {"dtype": "bfloat16", "quantization_config": quantization_config(fmt)}
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors, _ = quantize(load_file(source / "model.safetensors"), fmt)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, dest / "model.safetensors", metadata={"format": "pt"}
    )
