"""The vllm-moe-overlay plugin's startup hook, imported by vllm_moe_overlay.pth at the
start of every interpreter that reads this site directory: pip, a training script, vLLM.

It puts one finder first on sys.meta_path and does nothing else: it reads no file and
imports nothing until a module named vllm or vllm.* is first looked up. Then, once per
process and before any vLLM module exists, the plugin decides (vllm_moe_overlay.startup)
and the finder serves the modules it chose, or none. A fault serves nothing and writes
one line to stderr. Standard library only, and valid down to Python 3.9.
"""

import sys
from _thread import RLock


class StartupFinder:
    def __init__(self):
        self.lock = RLock()
        self.decided = False
        self.served = None  # the plugin's finder, once it chose to serve

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vllm" and not fullname.startswith("vllm."):
            return None
        with self.lock:  # another thread waits; this one, deciding, finds nothing here
            if not self.decided:
                self.decided = True
                self.served = _decide()
        return self.served.find_spec(fullname, path, target) if self.served else None


def _decide():
    try:
        import vllm_moe_overlay

        return vllm_moe_overlay.startup()
    except Exception as exc:
        try:
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
            sys.stderr.write(f"vllm-moe-overlay: startup hook: nothing served: {cause}\n")
        except Exception:
            pass
        return None


try:
    sys.meta_path.insert(0, StartupFinder())
except Exception:
    pass
