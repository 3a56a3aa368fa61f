"""A served model's logprobs against transformers' on the very same token sequence.

transformers runs each echoed sequence (prompt + the server's greedy tokens) in one
forward, teacher-forced: at every position both sides then predict from the same
prefix, so a near-tie that flips one greedy token does not end the comparison.
Compared are the logprobs the server returned (its top k and the token itself at each
position), looked up in transformers' full distribution.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import tiny_gemma4
import torch
from serve_helpers import Echoed

# The two GELUs of Gemma4's experts: its config's (tanh) and pristine 0.19.1's (exact).
GELUS = {"tanh": "gelu_pytorch_tanh", "exact": "gelu"}


def with_expert_gelu(model: torch.nn.Module, gelu: str) -> torch.nn.Module:
    """A copy of a transformers Gemma4 model whose MoE experts (only) use `gelu`."""
    model = copy.deepcopy(model)
    tiny_gemma4.set_experts_activation(model, GELUS[gelu])
    return model


@dataclass(frozen=True)
class Reference:
    """A transformers causal LM, run in its dtype with full-precision float32 GEMMs (no
    TF32)."""

    model: torch.nn.Module

    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Row j - 1: the float64 log-softmax over the vocabulary at position j."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([tokens], device=self.model.device)).logits[0, :-1]
        finally:
            torch.set_float32_matmul_precision(previous)
        return logits.double().log_softmax(-1).cpu()


def deviations(served: Echoed, reference: torch.Tensor) -> list[float]:
    """|served - reference| for every logprob the server returned."""
    return [abs(lp - float(reference[j, t])) for j, step in enumerate(served.top) for t, lp in step.items()]


def between(served: Echoed, first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """|first - second| at the logprobs the server returned: two references compared
    where the server was."""
    return [abs(float(first[j, t] - second[j, t])) for j, step in enumerate(served.top) for t in step]


def served_apart(served: Echoed, other: Echoed) -> list[float]:
    """|served - other|, two servers' logprobs, at every (position, token) both returned
    from the same prefix (up to the first position where their tokens part)."""
    same = next(
        (j for j, (a, b) in enumerate(zip(served.tokens, other.tokens)) if a != b), len(served.tokens)
    )
    return [
        abs(lp - other.top[j][t])
        for j, step in enumerate(served.top[:same])
        for t, lp in step.items()
        if t in other.top[j]
    ]


def greedy_gaps(served: Echoed, reference: torch.Tensor) -> list[tuple[int, float]]:
    """(step, gap) wherever the server's greedy token is not the reference's argmax: how
    far below the reference's best token the reference puts the server's."""
    gaps = []
    for step, position in enumerate(range(served.prompt_len, len(served.tokens))):
        row, token = reference[position - 1], served.tokens[position]
        best = int(row.argmax())
        if best != token:
            gaps.append((step, float(row[best] - row[token])))
    return gaps


@dataclass(frozen=True)
class Spread:
    max: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(max(values), statistics.fmean(values))

    def as_dict(self) -> dict[str, float]:
        return {"max": float(f"{self.max:.3g}"), "mean": float(f"{self.mean:.3g}")}


def verdict(to: dict[str, Spread], signal: Spread, factor: float) -> str | None:
    """The GELU the served model runs, if the numbers show one: the nearer reference
    (by mean deviation), provided the references differ by at least `factor` times that
    deviation. Otherwise None: the kernels' rounding hides the GELU."""
    nearer = min(to, key=lambda gelu: to[gelu].mean)
    return nearer if signal.mean > factor * to[nearer].mean else None
