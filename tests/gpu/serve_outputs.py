"""The greedy outputs each variant's GPU servers gave, written per variant by
test_serve_cuda.py and compared across variants by tests/run-gpu-tests.

Standard library only: run-gpu-tests imports it outside any vLLM environment.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "serve-outputs.json"  # in each variant's out dir (gpu_env.OUT_ENV)
# The same server setup must give the same greedy tokens in every variant: the fixes change
# which code computes the router logits, not their values. Eager servers run the same
# kernels, so their logprobs must be equal. Compiled ones (torch.compile + CUDA graphs) may
# pick other GEMM kernels in each process: their logprobs may differ by the rounding of what
# the GEMMs compute with, bounded as in cuda_layers.tolerance: 8u, u = 2^-10 for float32
# (TF32 on Hopper), 2^-9 for bfloat16 (measured on an H100: up to 8.4e-4 in float32, 0 in
# bfloat16).
COMPILED_LOGPROB_ATOL = {"fp32": 8 * 2.0**-10, "bf16": 8 * 2.0**-9}


def logprob_atol(setup: str) -> float:
    """For a setup named <checkpoint>-<fp32|bf16>-<eager|graphs> (test_serve_cuda.SETUPS)."""
    _, dtype, mode = setup.rsplit("-", 2)
    return 0.0 if mode == "eager" else COMPILED_LOGPROB_ATOL[dtype]


def write(out_dir: Path, outputs: dict[str, dict]) -> None:
    """outputs: server name -> {"tokens": [[...] per prompt], "logprobs": [[...]], ...}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FILE).write_text(json.dumps(outputs, indent=1) + "\n")


def compare(variant_dirs: dict[str, Path]) -> list[str]:
    """One line per server setup: the variants agree, or how they differ (lines of
    failures start with 'FAIL'). Every variant must have served every setup any
    variant served."""
    served = {}
    for variant, directory in variant_dirs.items():
        path = directory / FILE
        served[variant] = json.loads(path.read_text()) if path.exists() else {}
    setups = sorted({name for outputs in served.values() for name in outputs})
    if not setups:
        return ["FAIL no variant wrote greedy outputs"]
    lines = []
    for setup in setups:
        missing = [v for v, outputs in served.items() if setup not in outputs]
        if missing:
            lines.append(f"FAIL {setup}: no outputs from {', '.join(missing)}")
            continue
        (first, reference), *others = [(v, served[v][setup]) for v in served]
        differ = []
        for variant, run in others:
            if run["tokens"] != reference["tokens"]:
                differ.append(f"{variant} chose other tokens than {first}")
            elif any(
                abs(a - b) > logprob_atol(setup)
                for ours, theirs in zip(run["logprobs"], reference["logprobs"])
                for a, b in zip(ours, theirs)
            ):
                differ.append(
                    f"{variant}'s logprobs differ from {first}'s by more than {logprob_atol(setup):.1e}"
                )
        names = ", ".join(served)
        lines.append(
            f"FAIL {setup}: {'; '.join(differ)}" if differ else f"ok   {setup}: same greedy tokens in {names}"
        )
    return lines
