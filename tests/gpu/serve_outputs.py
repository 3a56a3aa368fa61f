"""The greedy outputs each variant's GPU servers gave, written per variant by
test_serve_cuda.py and compared across variants by tests/run-gpu-tests; and the table
of their deviations from transformers, from each variant's measurements.

Standard library only: run-gpu-tests imports it outside any vLLM environment.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "serve-outputs.json"  # in each variant's out dir (gpu_env.OUT_ENV)
MEASUREMENTS = "measurements.jsonl"  # gpu_env.record's, in the same dir
# The same server setup must give the same greedy tokens in every variant: the fixes change
# which code computes the router logits, not their values. (Gemma4's experts run the GELU a
# setup records; variants of other GELUs are compared only within each GELU's group.) Eager
# servers run the same kernels, so their logprobs must be equal. Compiled ones (torch.compile
# + CUDA graphs) may pick other GEMM kernels in each process: their logprobs may differ by the
# rounding of what the GEMMs compute with, bounded as in cuda_layers.tolerance: 8u, u = 2^-10
# for float32 (TF32 on Hopper), 2^-9 for bfloat16 (measured on an H100: up to 8.4e-4 in
# float32, 0 in bfloat16).
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
    variant served. Where none wrote outputs (pytest's -k left the servers out; a fleet
    that failed fails its own tests), one line says so."""
    served = {}
    for variant, directory in variant_dirs.items():
        path = directory / FILE
        served[variant] = json.loads(path.read_text()) if path.exists() else {}
    setups = sorted({name for outputs in served.values() for name in outputs})
    if not setups:
        return ["no variant wrote greedy outputs: no server setup ran, nothing to compare"]
    lines = []
    for setup in setups:
        missing = [v for v, outputs in served.items() if setup not in outputs]
        if missing:
            lines.append(f"FAIL {setup}: no outputs from {', '.join(missing)}")
            continue
        groups: dict[str | None, list[str]] = {}
        for variant, outputs in served.items():
            groups.setdefault(outputs[setup].get("gelu"), []).append(variant)
        differ, agree = [], []
        for gelu, variants in groups.items():
            differ += differences(setup, {v: served[v][setup] for v in variants})
            agree.append(", ".join(variants) + (f" ({gelu} GELU)" if gelu else ""))
        lines.append(
            f"FAIL {setup}: {'; '.join(differ)}"
            if differ
            else f"ok   {setup}: same greedy tokens in {'; in '.join(agree)}"
        )
    return lines


def differences(setup: str, runs: dict[str, dict]) -> list[str]:
    """How the runs of `setup` in other variants differ from the first variant's."""
    (first, reference), *others = runs.items()
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
    return differ


def measurements(directory: Path, what: str) -> list[dict]:
    path = directory / MEASUREMENTS
    lines = path.read_text().splitlines() if path.exists() else []
    return [row for row in map(json.loads, lines) if row.get("what") == what]


def transformers_rows(variant_dirs: dict[str, Path]) -> list[dict]:
    """test_serve_cuda's "vs-transformers" measurements of every variant."""
    return [row for directory in variant_dirs.values() for row in measurements(directory, "vs-transformers")]


def transformers_table(rows: list[dict]) -> list[str]:
    """A Markdown table of the variants' and setups' deviations from transformers on the
    GPU (transformers_rows): max and mean |delta logprob| from the float32 references with
    tanh-GELU and with exact-GELU experts; beside them the same references' difference (the
    GELU signal at model level) and the rounding yardstick the tolerance is made of
    (test_serve_cuda.rounding). [] if none was recorded."""
    if not rows:
        return []

    def spread(values: dict) -> str:
        return f"{values['max']:.2g} / {values['mean']:.2g}"

    lines = [
        "| variant | setup | experts' GELU | vs tanh GELU (max / mean) | vs exact GELU (max / mean) "
        "| tolerance (max / mean) | greedy tokens | transformers tanh vs exact | rounding yardstick "
        "| GELU verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        greedy = "equal" if row["greedy_equal"] else "near-tie flips: " + json.dumps(row["greedy_gaps"])
        lines.append(
            f"| {row['variant']} | {row['setup']} | {row['gelu']} | {spread(row['to_tanh'])} "
            f"| {spread(row['to_exact'])} | {spread(row['atol'])} | {greedy} "
            f"| {spread(row['transformers_tanh_to_exact'])} "
            f"| {row['rounding']['as']} {spread(row['rounding'])} "
            f"| {row['verdict'] or 'none (hidden by rounding)'} |"
        )
    return lines
