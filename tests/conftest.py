"""The fast lane's collection, and at the end of a run: what this CPU did with
each MoE kernel case, the kernel paths the tests exercised and how long each
vLLM server took to start, so a report from any machine says what it ran."""

import sys

FAST = "fast"  # the marker of the fast lane (pytest.ini)


def pytest_ignore_collect(collection_path, config):
    """With `-m fast`, only modules that mark fast tests are imported: the others
    may import torch or vLLM, which the fast lane's Python need not have."""
    if config.getoption("markexpr") == FAST and collection_path.match("test_*.py"):
        return f"pytest.mark.{FAST}" not in collection_path.read_text()
    return None


def pytest_terminal_summary(terminalreporter):
    # Each module is imported only by runs that test MoE layers or serve.
    moe_fixtures, serve_helpers = sys.modules.get("moe_fixtures"), sys.modules.get("serve_helpers")
    if moe_fixtures is not None and moe_fixtures.probed():  # a MoE test ran
        cases = "; ".join(f"{name} {moe_fixtures.outcome(name)}" for name in moe_fixtures.probed())
        terminalreporter.write_line(f"CPU MoE kernel cases: {cases}")
        moe_layers = moe_fixtures.moe_layers
        paths = ", ".join(sorted(moe_layers.exercised)) or "none"
        terminalreporter.write_line(f"CPU MoE kernel paths: {paths}; ISA: {moe_layers.cpu_isa()}")
    if serve_helpers is not None and serve_helpers.startups:
        starts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in serve_helpers.startups)
        terminalreporter.write_line(
            f"vLLM server starts (limit {serve_helpers.STARTUP_TIMEOUT:.0f} s): {starts}"
        )
