"""Print, as JSON, the activations each fused-MoE experts backend of the installed vLLM
accepts: python moe_activations.py.

Imports every module under vllm/model_executor/layers/fused_moe/ and calls the real
`_supports_activation` of every class (and module-level function) that defines one, with
every member of that vLLM's MoEActivation. Run it once per installation (PYTHONPATH
picks which).
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil


def accepted(check, activations) -> list[str] | str:
    try:
        return [a.value for a in activations if check(a)]
    except NotImplementedError as error:  # vLLM's "not yet used by an Oracle"
        return f"raises NotImplementedError: {error}"


def main() -> None:
    import vllm.model_executor.layers.fused_moe as package
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    backends: dict[str, list[str] | str] = {}
    failed: dict[str, str] = {}
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        try:
            module = importlib.import_module(info.name)
        except Exception as error:  # a backend this machine cannot import is reported, not hidden
            failed[info.name] = f"{type(error).__name__}: {error}"
            continue
        short = info.name.removeprefix(f"{package.__name__}.")
        if inspect.isfunction(getattr(module, "_supports_activation", None)):
            backends[f"{short}._supports_activation"] = accepted(module._supports_activation, MoEActivation)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and "_supports_activation" in cls.__dict__:
                backends[f"{short}.{name}"] = accepted(cls._supports_activation, MoEActivation)
    from vllm.model_executor.layers.fused_moe.cpu_fused_moe import _CPU_MOE_ACT_FN

    cpu = sorted(a.value for a in _CPU_MOE_ACT_FN)  # the CPU backend's own table
    print(json.dumps({"backends": backends, "cpu": cpu, "import_errors": failed}, sort_keys=True))


if __name__ == "__main__":
    main()
