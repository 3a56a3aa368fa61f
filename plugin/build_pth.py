"""setuptools' build_py, plus vllm_moe_overlay.pth at the top of the wheel: pip installs
it into site-packages, where Python runs its import line at every interpreter start."""

from pathlib import Path

from setuptools.command.build_py import build_py

PTH = "vllm_moe_overlay.pth"


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))
