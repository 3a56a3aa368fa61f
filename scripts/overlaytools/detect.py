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
    funcs = {
        f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in GEMMA4_ARG_PARSERS
    }
    if set(funcs) != set(GEMMA4_ARG_PARSERS):
        return Finding(UNKNOWN, f"not both of {', '.join(GEMMA4_ARG_PARSERS)}")
    missing = [name for name, func in funcs.items() if not has_fix(func)]
    if not missing:
        return Finding(FIXED, f"{' and '.join(GEMMA4_ARG_PARSERS)} have {fix}")
    return Finding(BUGGY, f"{' and '.join(missing)} lack {fix}")


# Each detector belongs to one upstream fix, named by the pull request that a
# patch's Origin field links; it reads the one file that fix changes.
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
    "https://github.com/vllm-project/vllm/pull/41991": (
        "vllm/tool_parsers/gemma4_tool_parser.py",
        gemma4_parser_progress,
    ),
    "https://github.com/vllm-project/vllm/pull/42128": (
        "vllm/tool_parsers/gemma4_tool_parser.py",
        gemma4_parser_trailing_dot,
    ),
}


def for_origin(origin: str | None) -> list[tuple[str, Callable[[str], Finding]]]:
    """The (file, detector) pairs of the upstream fixes an Origin field links."""
    links = set(re.findall(r"https?://\S+", origin or ""))
    return [found for pr, found in DETECTORS.items() if pr in links]


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
