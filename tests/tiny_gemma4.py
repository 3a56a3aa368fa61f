"""gemma4-moe-tiny: a tiny random-weight Gemma4 MoE checkpoint made by transformers'
own Gemma4TextConfig / Gemma4ForCausalLM (enable_moe_block=True), for serving tests.

Two decoder layers, one sliding-window and one full-attention (the full one with
attention_k_eq_v and one global KV head, as Gemma 4 26B-A4B's are), 8 experts, top-2,
per_expert_scale drawn from [0.5, 1.5). Sizes suit vLLM 0.19.1's CPU kernels: head_dim
and global_head_dim 64, 2 * moe_intermediate_size a multiple of 64 also per rank at
--tensor-parallel-size 2; hidden_size_per_layer_input 0 (vLLM's Gemma4ForCausalLM
has no per-layer inputs).

The weights are drawn so that the experts' GELU matters: Gemma4 trains them with tanh
GELU (gelu_pytorch_tanh), pristine vLLM 0.19.1 runs exact GELU, and the two differ
most, relative to their size, for inputs around -2 to -4 (at -3 tanh GELU is 10 %
below exact GELU). Residual channel BIAS_CHANNEL carries a constant that only the
experts' gate rows read, with a weight that puts the gate pre-activations there; no
branch writes that channel (the post-norms' weights are 0 there), so it stays
constant through the layers. TESTING.md gives what this does to the logprobs.

The tokenizer is byte level with Gemma4's turn, tool and channel tokens as added
special tokens, and a chat template in Gemma4's format that renders tools, tool
calls and tool responses the way vLLM's gemma4 tool parser reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from byte_tokenizer import byte_level_tokenizer

NAME = "gemma4-moe-tiny"
TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM = "<|tool_call>", "<tool_call|>", '<|"|>'
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<|turn>",
    "<turn|>",
    "<|tool>",
    "<tool|>",
    TOOL_CALL_START,
    TOOL_CALL_END,
    "<|tool_response>",
    "<tool_response|>",
    STRING_DELIM,
    "<|channel>",
    "<channel|>",
    "<|think|>",
]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_POSITIONS = 512


def token_id(token: str) -> int:
    return 256 + SPECIAL_TOKENS.index(token)


# Gemma4's turn format: <|turn>role\n...<turn|>; the assistant's role is "model".
# Arguments and tool results use Gemma4's notation: key:value, strings in <|"|>
# (vLLM hands the template tool-call arguments as mappings, as transformers does).
CHAT_TEMPLATE = r"""{%- macro value(v) -%}
{%- if v is string -%}
<|"|>{{ v }}<|"|>
{%- elif v is mapping -%}
{ {%- for k, item in v.items() -%}
{{ k }}:{{ value(item) }}{{ "," if not loop.last }}
{%- endfor -%} }
{%- elif v is iterable -%}
[ {%- for item in v -%}
{{ value(item) }}{{ "," if not loop.last }}
{%- endfor -%} ]
{%- else -%}
{{ v | tojson }}
{%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- set rest = messages %}
{%- if messages and messages[0].role == "system" %}{% set rest = messages[1:] %}{% endif %}
{%- if tools or rest is not sameas messages -%}
<|turn>system
{% if rest is not sameas messages %}{{ messages[0].content }}{% endif %}
{%- for tool in tools or [] -%}
<|tool>declaration:{{ tool.function.name }}{{ value(tool.function) }}<tool|>
{%- endfor -%}
<turn|>
{% endif -%}
{%- for message in rest -%}
{%- if message.role == "assistant" -%}
<|turn>model
{{ message.content or "" }}
{%- for call in message.tool_calls or [] -%}
<|tool_call>call:{{ call.function.name }}{{ value(call.function.arguments) }}<tool_call|>
{%- endfor -%}
<turn|>
{% elif message.role == "tool" -%}
<|tool_response>response:{{ message.name or "" }}{{ value({"value": message.content}) }}<tool_response|>
{% else -%}
<|turn>{{ message.role }}
{{ message.content }}<turn|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|turn>model
{% endif -%}
"""

CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "vocab_size_per_layer_input": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 8,  # shorter than the tests' prompts
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 64,
    "global_head_dim": 64,
    "attention_k_eq_v": True,
    "hidden_size_per_layer_input": 0,
    "enable_moe_block": True,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 64,  # 32 per rank at TP=2: 2 * 32 is still a multiple of 64
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": True,
    "pad_token_id": token_id("<pad>"),
    "bos_token_id": token_id("<bos>"),
    "eos_token_id": [token_id("<eos>"), token_id("<turn|>")],
    "dtype": "float32",
}

BIAS_CHANNEL = 0
BIAS_INPUT = 1.0  # the channel's value in the residual stream
# The gate rows' weight on it. With seed 0 it puts the gate pre-activations at -2.65 on
# average, 90 % of them in [-3.9, -1.4] (the channel's normalised value varies by token).
GATE_BIAS = -4.5
GATE_SPREAD = 0.3  # the gate rows' other weights, relative to the other projections'
UP_GAIN = 16.0  # keeps the experts' small outputs far above the RMS norms' epsilon
ROUTER_GAIN = 4.0  # router logits spread out, so routing is not uniform
# Linear layers that read the residual stream; they ignore the bias channel.
READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "mlp.gate_proj", "mlp.up_proj", "router.proj")
# Norms whose output is added to the residual stream; 0 on the bias channel.
WRITES_RESIDUAL = ("post_attention_layernorm", "post_feedforward_layernorm")


def set_experts_activation(model, activation: str) -> None:
    """Give a transformers Gemma4 model's MoE experts (only) the activation named
    `activation` in transformers' ACT2FN."""
    from transformers.activations import ACT2FN

    experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
    assert experts, f"{type(model).__name__} has no Gemma4TextExperts"
    for module in experts:
        module.act_fn = ACT2FN[activation]


def make_model(seed: int):
    """The transformers model with every parameter drawn from a generator seeded with `seed`."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    model = Gemma4ForCausalLM(Gemma4TextConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(seed)
    hidden = CONFIG["hidden_size"]
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(draw(name, param.shape, gen, hidden))
    return model


def draw(name: str, shape: torch.Size, gen: torch.Generator, hidden: int) -> torch.Tensor:
    def normal(fan_in: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * (gain / fan_in**0.5)

    if name.endswith("per_expert_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if len(shape) == 1:  # norm weights and the router's scale
        weight = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        if name.rsplit(".", 2)[-2] in WRITES_RESIDUAL:
            weight[BIAS_CHANNEL] = 0.0
        return weight
    if name.endswith("embed_tokens.weight"):  # Gemma scales embeddings by sqrt(hidden)
        weight = normal(hidden)
        weight[:, BIAS_CHANNEL] = BIAS_INPUT / hidden**0.5
        return weight
    if name.endswith("experts.gate_up_proj"):  # [experts, gate rows then up rows, hidden]
        weight = normal(hidden)
        intermediate = shape[1] // 2
        weight[:, :intermediate] *= GATE_SPREAD
        weight[:, intermediate:] *= UP_GAIN
        weight[:, :intermediate, BIAS_CHANNEL] = GATE_BIAS
        weight[:, intermediate:, BIAS_CHANNEL] = 0.0
        return weight
    if name.endswith("experts.down_proj"):  # [experts, hidden, intermediate]
        return normal(shape[-1])
    weight = normal(shape[1], ROUTER_GAIN if name.endswith("router.proj.weight") else 1.0)
    if any(f"{part}.weight" in name for part in READS_RESIDUAL):
        weight[:, BIAS_CHANNEL] = 0.0
    return weight


def write(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    make_model(seed).save_pretrained(directory)
    byte_level_tokenizer(SPECIAL_TOKENS).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    text = json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n"
    (directory / "tokenizer_config.json").write_text(text)
