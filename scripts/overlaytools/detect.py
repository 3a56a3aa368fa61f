"""Read a release's model source for each bug: still there, fixed, or not recognisable.

Each detector parses the file and looks at the construct its bug lives in,
so it follows upstream's fix even where upstream's code no longer matches the
backport line for line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass

BUGGY, FIXED, UNKNOWN = "buggy", "fixed", "unknown"


@dataclass(frozen=True)
class Finding:
    state: str  # BUGGY, FIXED or UNKNOWN
    reason: str


def gemma4_routing(source: str) -> Finding:
    """Gemma4's custom routing function must read self.per_expert_scale when
    called, not a variable captured from the enclosing __init__."""
    tree = ast.parse(source)
    names = {
        _last_name(kw.value)
        for kw in ast.walk(tree)
        if isinstance(kw, ast.keyword) and kw.arg == "custom_routing_function"
    }
    routers = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in names]
    if not routers:
        return Finding(UNKNOWN, "no function passed as custom_routing_function")
    for func in routers:
        if "per_expert_scale" in _free_names(func):
            return Finding(BUGGY, f"{func.name} reads per_expert_scale captured from its enclosing scope")
    for func in routers:
        if any(_is_self_attr(n, "per_expert_scale") for n in ast.walk(func)):
            return Finding(FIXED, f"{func.name} reads self.per_expert_scale at call time")
    return Finding(UNKNOWN, f"{routers[0].name} does not read per_expert_scale")


def qwen3_gate(source: str) -> Finding:
    """Qwen3MoeSparseMoeBlock.forward must not call self.gate when the experts
    run the router themselves (is_internal_router)."""
    tree = ast.parse(source)
    forward = _method(tree, "Qwen3MoeSparseMoeBlock", "forward")
    if forward is None:
        return Finding(UNKNOWN, "no Qwen3MoeSparseMoeBlock.forward")
    calls = _gate_calls(forward)
    if not calls:
        return Finding(FIXED, "forward never calls self.gate: the experts route internally")
    if all(calls):
        return Finding(FIXED, "forward calls self.gate only when the router is not internal")
    return Finding(BUGGY, "forward calls self.gate whether or not the router is internal")


def gemma4_moe_activation(source: str) -> Finding:
    """Gemma4's experts (the call that hands them the custom routing function) must
    use tanh GELU, as Gemma4 was trained: activation="gelu" is the exact (erf) GELU."""
    tree = ast.parse(source)
    experts = [
        call
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and any(kw.arg == "custom_routing_function" for kw in call.keywords)
    ]
    if not experts:
        return Finding(UNKNOWN, "no experts built with a custom_routing_function")
    values = [
        kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
        for call in experts
        for kw in call.keywords
        if kw.arg == "activation"
    ]
    if values and all(v in ("gelu_tanh", "gelu_pytorch_tanh") for v in values):
        return Finding(FIXED, f"Gemma4's experts are built with activation={values[0]!r}")
    if values and all(v == "gelu" for v in values):
        return Finding(BUGGY, "Gemma4's experts are built with activation='gelu' (exact GELU)")
    return Finding(UNKNOWN, f"Gemma4's experts are built with activation values {values}")


def gemma4_packed_expert_names(source: str) -> Finding:
    """Gemma4Model.load_weights must map compressed-tensors' underscore-suffixed expert
    names (experts.{id}.down_proj_packed, ..._scale) as well as the dot-suffixed ones:
    an f-string that ends a weight name in "_" after stripping its trailing dot."""
    load = _method(ast.parse(source), "Gemma4Model", "load_weights")
    if load is None:
        return Finding(UNKNOWN, "Gemma4Model has no load_weights of its own")
    strings = [n for n in ast.walk(load) if isinstance(n, ast.JoinedStr) and n.values]
    if any(_ends_in_underscore_after_rstrip(s) for s in strings):
        return Finding(FIXED, "load_weights maps underscore-suffixed expert names (_packed, _scale)")
    if any("experts." in ast.unparse(s) for s in strings):
        return Finding(BUGGY, "load_weights maps only dot-suffixed expert names (experts.{id}.{proj}.)")
    if _delegates_to_auto_loader(load):
        return Finding(FIXED, _GENERIC_LOADER)
    return Finding(UNKNOWN, "load_weights builds no expert names")


def gemma4_expert_prefix(source: str) -> Finding:
    """The rewrite of per-expert names to .moe.experts.{id}. must skip names that
    already have .moe before .experts (ModelOpt NVFP4 checkpoints)."""
    patterns = [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.endswith(r"\.experts\.(\d+)\.")
    ]
    if not patterns:
        load = _method(ast.parse(source), "Gemma4Model", "load_weights")
        if load is not None and _delegates_to_auto_loader(load):
            return Finding(FIXED, "no rewrite of per-expert names is left: " + _GENERIC_LOADER)
        return Finding(UNKNOWN, "no rewrite of per-expert names")
    if all(pattern.startswith(r"(?<!\.moe)") for pattern in patterns):
        return Finding(FIXED, "the rewrite skips names already under .moe.experts")
    return Finding(BUGGY, "the rewrite adds .moe also before .moe.experts")


def wna16_moe_activation(source: str) -> Finding:
    """MoeWNA16Method.apply must hand the layer's activation to the experts it calls
    (fused_experts, or later a modular kernel's apply) instead of asserting SiLU."""
    apply = _method(ast.parse(source), "MoeWNA16Method", "apply")
    if apply is None:
        return Finding(UNKNOWN, "MoeWNA16Method has no apply")
    passes = _passes_layer_activation(apply)
    asserts_silu = any(isinstance(n, ast.Assert) and "SILU" in ast.unparse(n.test) for n in ast.walk(apply))
    if passes and not asserts_silu:
        return Finding(FIXED, "MoeWNA16Method.apply hands layer.activation to the experts")
    if asserts_silu or any(
        isinstance(n, ast.Call) and _last_name(n.func) == "fused_experts" for n in ast.walk(apply)
    ):
        return Finding(BUGGY, "MoeWNA16Method.apply asserts SiLU and runs fused_experts with its default")
    return Finding(UNKNOWN, "MoeWNA16Method.apply hands no activation to any call")


# Upstream PR #55911 replaced Gemma4's own loader (0.23.0 still has it, 0.33.0 not) by
# AutoWeightsLoader and WeightsMapper entries; it reports the compressed-tensors
# cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit served with that loader.
_GENERIC_LOADER = "Gemma4Model.load_weights hands every tensor to AutoWeightsLoader (upstream #55911)"


def awq_marlin_moe_activation(source: str) -> Finding:
    """The AWQ MoE method's apply must hand the layer's activation to the kernel it
    calls; 0.19.1's fused_marlin_moe call leaves it at the SiLU default."""
    tree = ast.parse(source)
    found = [(cls, m) for cls in _AWQ_MOE_METHODS if (m := _method(tree, cls, "apply"))]
    if not found:
        return Finding(UNKNOWN, f"none of {', '.join(_AWQ_MOE_METHODS)} has an apply")
    cls, apply = found[0]
    if _passes_layer_activation(apply):
        return Finding(FIXED, f"{cls}.apply hands layer.activation to the experts")
    if any(isinstance(n, ast.Call) and _last_name(n.func) == "fused_marlin_moe" for n in ast.walk(apply)):
        return Finding(BUGGY, f"{cls}.apply calls fused_marlin_moe with its default activation, SiLU")
    return Finding(UNKNOWN, f"{cls}.apply hands no activation to any call")


# By 0.33.0 (the newest release read) it is AutoAWQMoEMethod, in quantization/auto_awq.py.
_AWQ_MOE_METHODS = ("AWQMarlinMoEMethod", "AutoAWQMoEMethod")


def _passes_layer_activation(func: ast.FunctionDef) -> bool:
    return any(
        isinstance(call, ast.Call)
        and any(
            kw.arg == "activation" and ast.unparse(kw.value) == "layer.activation" for kw in call.keywords
        )
        for call in ast.walk(func)
    )


def _delegates_to_auto_loader(load: ast.FunctionDef) -> bool:
    """The method builds an AutoWeightsLoader and has no loop of its own over the weights."""
    calls = [
        n for n in ast.walk(load) if isinstance(n, ast.Call) and _last_name(n.func) == "AutoWeightsLoader"
    ]
    return bool(calls) and not any(isinstance(n, ast.For) for n in ast.walk(load))


def _ends_in_underscore_after_rstrip(string: ast.JoinedStr) -> bool:
    *rest, last = string.values
    return (
        isinstance(last, ast.Constant)
        and last.value == "_"
        and bool(rest)
        and isinstance(rest[-1], ast.FormattedValue)
        and "rstrip" in ast.unparse(rest[-1].value)
    )


GEMMA4_ARG_PARSERS = ("_parse_gemma4_args", "_parse_gemma4_array")


def gemma4_parser_progress(source: str) -> Finding:
    """Gemma4's argument parsers must stop when a bare value makes no progress
    (`i == val_start`), or malformed arguments loop forever."""
    return _in_both_parsers(
        source,
        lambda f: any(ast.unparse(n) == "i == val_start" for n in ast.walk(f) if isinstance(n, ast.Compare)),
        "a stop when a bare value makes no progress",
    )


def gemma4_parser_trailing_dot(source: str) -> Finding:
    """While streaming, Gemma4's argument parsers must withhold a bare value ending
    in "." (float("108.") would be streamed as 108.0 before its digits)."""
    return _in_both_parsers(
        source,
        lambda f: "endswith('.')" in ast.unparse(f),
        "a partial bare value ending in '.' withheld",
    )


def _in_both_parsers(source: str, has_fix: Callable[[ast.FunctionDef], bool], fix: str) -> Finding:
    tree = ast.parse(source)
    defined = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    funcs = {name: _delegate(defined[name], defined) for name in GEMMA4_ARG_PARSERS if name in defined}
    if set(funcs) != set(GEMMA4_ARG_PARSERS):
        return Finding(UNKNOWN, f"not both of {', '.join(GEMMA4_ARG_PARSERS)}")
    missing = [name for name, func in funcs.items() if not has_fix(func)]
    if not missing:
        return Finding(FIXED, f"{' and '.join(GEMMA4_ARG_PARSERS)} have {fix}")
    return Finding(BUGGY, f"{' and '.join(missing)} lack {fix}")


def _delegate(func: ast.FunctionDef, defined: dict[str, ast.FunctionDef]) -> ast.FunctionDef:
    """The function that does the work: `func` itself, or the module function it only
    returns a call of (0.24.0's _parse_gemma4_args returns _parse_gemma4_fields(...)[0])."""
    body = [n for n in func.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        calls = [n for n in ast.walk(body[0].value) if isinstance(n, ast.Call)]
        if len(calls) == 1 and isinstance(calls[0].func, ast.Name) and calls[0].func.id in defined:
            return defined[calls[0].func.id]
    return func


# Each detector belongs to one upstream fix, named by the pull request that a
# patch's Origin field links; it reads the one file that fix changes (or, given
# several, the first a release has: where later releases moved that code).
DETECTORS = {
    "https://github.com/vllm-project/vllm/pull/42250": (
        "vllm/model_executor/models/gemma4.py",
        gemma4_routing,
    ),
    "https://github.com/vllm-project/vllm/pull/40664": (
        "vllm/model_executor/models/qwen3_moe.py",
        qwen3_gate,
    ),
    "https://github.com/vllm-project/vllm/pull/41574": (
        "vllm/model_executor/models/gemma4.py",
        gemma4_moe_activation,
    ),
    "https://github.com/vllm-project/vllm/pull/40708": (
        "vllm/model_executor/models/gemma4.py",
        gemma4_packed_expert_names,
    ),
    "https://github.com/vllm-project/vllm/pull/41206": (
        "vllm/model_executor/models/gemma4.py",
        gemma4_expert_prefix,
    ),
    # The one file of #42027 that keeps its path up to the newest release read.
    "https://github.com/vllm-project/vllm/pull/42027": (
        "vllm/model_executor/layers/quantization/moe_wna16.py",
        wna16_moe_activation,
    ),
    "https://github.com/vllm-project/vllm/pull/42483": (
        (
            "vllm/model_executor/layers/quantization/awq_marlin.py",
            "vllm/model_executor/layers/quantization/auto_awq.py",
        ),
        awq_marlin_moe_activation,
    ),
    # From 0.24.0 (the parser-engine rewrite) the argument parsers live in vllm/parser/.
    "https://github.com/vllm-project/vllm/pull/41991": (
        ("vllm/tool_parsers/gemma4_tool_parser.py", "vllm/parser/gemma4.py"),
        gemma4_parser_progress,
    ),
    "https://github.com/vllm-project/vllm/pull/42128": (
        ("vllm/tool_parsers/gemma4_tool_parser.py", "vllm/parser/gemma4.py"),
        gemma4_parser_trailing_dot,
    ),
}


def for_origin(origin: str | None) -> list[tuple[tuple[str, ...], Callable[[str], Finding]]]:
    """The (files, detector) pairs of the upstream fixes an Origin field links: the file
    the fix changes, then where later releases moved that code (the first one found is read)."""
    links = set(re.findall(r"https?://\S+", origin or ""))
    return [
        ((files,) if isinstance(files, str) else files, find)
        for pr, (files, find) in DETECTORS.items()
        if pr in links
    ]


def _gate_calls(forward: ast.FunctionDef) -> list[bool]:
    """For each self.gate(...) call, whether an `if` on is_internal_router encloses it."""
    parents = {child: node for node in ast.walk(forward) for child in ast.iter_child_nodes(node)}
    return [
        _guarded(call, parents)
        for call in ast.walk(forward)
        if isinstance(call, ast.Call) and _is_self_attr(call.func, "gate")
    ]


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        parent = parents[node]
        if (
            isinstance(parent, ast.If)
            and node is not parent.test
            and any(
                isinstance(n, ast.Attribute) and n.attr == "is_internal_router" for n in ast.walk(parent.test)
            )
        ):
            return True
        node = parent
    return False


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    return None


def _free_names(func: ast.FunctionDef) -> set[str]:
    """Names the function reads but neither takes as an argument nor assigns."""
    args = func.args
    bound = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    bound |= {a.arg for a in (args.vararg, args.kwarg) if a}
    loaded = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return loaded - bound


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _last_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None
