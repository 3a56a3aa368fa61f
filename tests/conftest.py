"""At the end of a run: the CPU MoE kernel paths it exercised and how long each
vLLM server took to start, so a report from any machine says what it ran."""

import sys


def pytest_terminal_summary(terminalreporter):
    # Each module is imported only by runs that test MoE layers or serve.
    moe_layers, serve_helpers = sys.modules.get("moe_layers"), sys.modules.get("serve_helpers")
    if moe_layers is not None:
        paths = ", ".join(sorted(moe_layers.exercised)) or "none"
        terminalreporter.write_line(f"CPU MoE kernel paths: {paths}; ISA: {moe_layers.cpu_isa()}")
    if serve_helpers is not None and serve_helpers.startups:
        starts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in serve_helpers.startups)
        terminalreporter.write_line(
            f"vLLM server starts (limit {serve_helpers.STARTUP_TIMEOUT:.0f} s): {starts}"
        )
