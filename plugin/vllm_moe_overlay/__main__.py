"""`python -m vllm_moe_overlay`: is the plugin active in this environment, and why (not).

Runs vLLM's own plugin loader, as every vLLM process does, then asks the
import system which file each module the plugin serves would come from. Exit
status 0 when vLLM gets them fixed (from this plugin, through its startup hook,
or because the installed vLLM already carries the patches), 1 otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from . import NAME, ManifestError, describe, installed_root, manifest, plan

GROUP = "vllm.general_plugins"


def main() -> int:
    """Never a traceback: any failure is one line and result NOT fixed (exit 1)."""
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001
        cause = str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__}: {exc}"
        print(f"error: {cause}")
        result = ""
    print("result: " + (result or "NOT fixed"))
    return 0 if result else 1


def check() -> str:
    """What vLLM gets ('' if not every module the plugin serves is fixed); prints why."""
    info = manifest()
    print(
        f"vllm-moe-overlay {info['label']} for vLLM {info['vllm_version']}: carries "
        + "; ".join(p["subject"] for p in info["carried"])
    )
    hook = next((f for f in sys.meta_path if type(f).__module__ == "_vllm_moe_overlay"), None)
    print(
        "startup hook: "
        + (
            f"active ({Path(sys.modules['_vllm_moe_overlay'].__file__).parent / 'vllm_moe_overlay.pth'})"
            if hook
            else "NOT active in this interpreter (Python runs vllm_moe_overlay.pth only in a site "
            "directory, and not with -S)"
        )
    )
    decided = plan()  # the installed files, read before vLLM's loader acts on them

    found = [ep for ep in entry_points(group=GROUP) if ep.name == NAME]
    print(
        f"entry point {GROUP}:{NAME}: "
        + (found[0].value if found else "NOT FOUND (is the wheel installed here?)")
    )

    if importlib.util.find_spec("vllm") is None:
        print(f"vLLM: NOT installed for {sys.executable}")
        return ""
    import vllm.envs
    from vllm.plugins import load_general_plugins

    allowed = vllm.envs.VLLM_PLUGINS
    if allowed is None:
        print("VLLM_PLUGINS: unset, so every plugin loads")
    else:
        verdict = "allows" if NAME in allowed else "EXCLUDES"
        print(f"VLLM_PLUGINS={','.join(allowed)}: {verdict} {NAME}")
    print(f"vLLM: {Path(vllm.__file__).parent}")
    load_general_plugins()

    fixed = bool(decided.targets)
    for target in decided.targets:
        spec = importlib.util.find_spec(target.module)
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin == target.packaged:
            status = "active: served from this plugin"
        elif target.state == "patched" and origin == installed_root() / target.path:
            status = "fixed already: the installed file carries the patch"
        else:
            fixed = False
            status = f"NOT patched: vLLM imports {origin}" if origin else "NOT patched: no such module"
            if target.state != "pristine":
                status += (
                    f" ({describe(target.found_sha256)}, plugin expects {describe(target.pristine_sha256)})"
                )
        print(f"{target.module}: {status}")
    if decided.action == "apply" and not hook:
        print("without the startup hook, vLLM imports some of these modules before its plugins load")
        return ""
    return "fixed" if fixed else ""


if __name__ == "__main__":
    sys.exit(main())
