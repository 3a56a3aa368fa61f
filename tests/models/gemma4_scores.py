"""Logprobs of gemma4-moe-tiny: served by vLLM (prompt and sampled positions, top-k at
each) and from transformers' Gemma4ForCausalLM on the same tokens (teacher forced),
with the experts' GELU as trained (tanh) or exact. Distances compare the two at every
(position, token) vLLM reports."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import tiny_gemma4
import torch
from serve_helpers import greedy_choice

PROMPTS = ["The quick brown fox", "Hello, world!", "Mixture of experts: ", "Grüße ✓"]
MAX_TOKENS, TOP_K = 16, 5
# vLLM (CPU torch MoE path, float32) against transformers (float32): measured at most
# 2.2e-5 over the 671 (position, token) pairs of these prompts (TESTING.md).
ATOL = 1e-4
# What a test tells apart must differ by this many times the noise.
SIGNAL_OVER_NOISE = 10
# The experts' activation in transformers: Gemma4's own, and the exact GELU that pristine
# vLLM 0.19.1 runs (transformers' ACT2FN names).
TANH, EXACT = "gelu_pytorch_tanh", "gelu"


@dataclass(frozen=True)
class Scored:
    """One served request: its tokens (prompt, then generated) and, at each position
    p >= 1, vLLM's top-k logprobs of token p given tokens < p (the sampled or prompt
    token included)."""

    tokens: list[int]
    prompt_len: int
    text: str
    top: dict[int, dict[int, float]]

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def served(server, model: str, prompt: list[int], max_tokens: int, top_k: int) -> Scored:
    """Greedy completion of token ids with prompt and sampled top-k logprobs."""
    choice = greedy_choice(server, model, prompt, max_tokens, top_k, prompt_logprobs=top_k)
    logprobs = choice["logprobs"]
    generated = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    top = {
        p: {int(t): entry["logprob"] for t, entry in step.items()}
        for p, step in enumerate(choice["prompt_logprobs"])
        if step is not None
    }
    for i, step in enumerate(logprobs["top_logprobs"]):
        top[len(prompt) + i] = {int(t.removeprefix("token_id:")): lp for t, lp in step.items()}
    return Scored([*prompt, *generated], len(prompt), choice["text"], top)


def summary(values: list[float]) -> str:
    return f"max {max(values):.2e}, mean {sum(values) / len(values):.2e} over {len(values)} logprobs"


def from_json(answer: dict) -> Scored:
    top = {int(p): {int(t): lp for t, lp in step.items()} for p, step in answer["top"].items()}
    return Scored(answer["tokens"], answer["prompt_len"], answer["text"], top)


@contextmanager
def per_expert_scales(model, scales: list[list[float]] | None) -> Iterator[None]:
    """transformers' Gemma4 model with each layer's router.per_expert_scale set to
    `scales` (None: its own)."""
    routers = [layer.router for layer in model.model.layers]
    saved = [r.per_expert_scale.detach().clone() for r in routers]
    with torch.no_grad():
        for router, scale in zip(routers, scales or saved):
            router.per_expert_scale.copy_(torch.as_tensor(scale))
    try:
        yield
    finally:
        with torch.no_grad():
            for router, scale in zip(routers, saved):
                router.per_expert_scale.copy_(scale)


@contextmanager
def experts_activation(model, activation: str) -> Iterator[None]:
    """transformers' Gemma4 model with only its experts' activation replaced."""
    experts = [layer.experts for layer in model.model.layers]
    saved = [e.act_fn for e in experts]
    tiny_gemma4.set_experts_activation(model, activation)
    try:
        yield
    finally:
        for e, act_fn in zip(experts, saved):
            e.act_fn = act_fn


def reference_logprobs(
    model, tokens: list[int], activation: str = TANH, scales: list[list[float]] | None = None
) -> torch.Tensor:
    """[len(tokens), vocab] float64 log-softmax; row p - 1 scores token p."""
    with torch.no_grad(), experts_activation(model, activation), per_expert_scales(model, scales):
        logits = model(torch.tensor([tokens])).logits[0]
    return logits.double().log_softmax(-1)


def distances(scored: Scored, reference: torch.Tensor) -> list[float]:
    """|vLLM - reference| at every (position, token) vLLM reported."""
    pairs = ((p, token, lp) for p, step in scored.top.items() for token, lp in step.items())
    return [abs(lp - float(reference[p - 1, token])) for p, token, lp in pairs]


def apart(scored: Scored, one: torch.Tensor, other: torch.Tensor) -> list[float]:
    """|one - other|, two references, at every (position, token) vLLM reported."""
    pairs = ((p, token) for p, step in scored.top.items() for token in step)
    return [abs(float(one[p - 1, token] - other[p - 1, token])) for p, token in pairs]


def transformers_generate(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy generate (float32, its KV cache), not stopping at EOS
    (as the served requests ask with ignore_eos)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()
