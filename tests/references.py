"""Float64 references of the MoE layers under test, written from the models' published
rules, independent of vLLM's code. Shared by the CPU and the GPU tests.

Weights use vLLM's FusedMoE layout: w13 [experts, 2 * intermediate, hidden] (gate rows
first, then up) and w2 [experts, hidden, intermediate]. Routing is a dense
[tokens, experts] matrix, zero for the experts a token does not use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The experts' activations, by vLLM's names: SiLU (Qwen3), exact erf GELU and its tanh
# approximation (Gemma4's hidden_activation, gelu_pytorch_tanh).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, the gate being the first half of the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def softmax_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over all experts, top-k, renormalised over the chosen ones (Qwen3's
    norm_topk_prob)."""
    probs = torch.softmax(logits.double(), dim=-1)
    top, ids = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, ids, top / top.sum(dim=-1, keepdim=True))


def gemma4_routing(logits: torch.Tensor, top_k: int, scale: torch.Tensor) -> torch.Tensor:
    """Gemma4's rule: softmax over all experts, top-k, renormalise, times the chosen
    experts' per_expert_scale."""
    return softmax_top_k(logits, top_k) * scale.detach().double().to(logits.device)


def routed_experts(
    x: torch.Tensor, routing: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str
) -> torch.Tensor:
    """Every expert on every token, down(act(gate) * up), weighted by routing."""
    hidden = gated(torch.einsum("th,eoh->teo", x.double(), w13.double()), activation)
    experts = torch.einsum("tei,ehi->teh", hidden, w2.double())
    return torch.einsum("te,teh->th", routing.double(), experts)


def gemma4_moe(
    x: torch.Tensor,
    logits: torch.Tensor,
    weights: dict[str, torch.Tensor],
    top_k: int,
    scale: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Gemma4MoE's output for router logits given from outside (Gemma4Router)."""
    routing = gemma4_routing(logits, top_k, scale)
    return routed_experts(x, routing, weights["experts.w13_weight"], weights["experts.w2_weight"], activation)


def qwen3_block(x: torch.Tensor, weights: dict[str, torch.Tensor], top_k: int, shared: bool) -> torch.Tensor:
    """Qwen3MoeSparseMoeBlock, dense over all experts. Routed: softmax over the gate
    logits, top-k, renormalised, each expert down(silu(gate) * up). Shared: the same
    MLP, times sigmoid(shared_expert_gate)."""
    w = weights
    x = x.double()
    routing = softmax_top_k(x @ w["gate.weight"].T, top_k)
    out = routed_experts(x, routing, w["experts.w13_weight"], w["experts.w2_weight"], "silu")
    if shared:
        mlp = gated(x @ w["shared_expert.gate_up_proj.weight"].T, "silu")
        mlp = mlp @ w["shared_expert.down_proj.weight"].T
        out += torch.sigmoid(x @ w["shared_expert_gate.weight"].T) * mlp
    return out
