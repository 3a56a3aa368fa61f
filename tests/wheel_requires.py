"""A wheel's runtime requirements for this machine, leaving out the torch family.

The CPU wheel pins torch==2.10.0+cpu, which only PyTorch's own index serves;
the test environment installs torch itself and the wheel with --no-deps.
"""

from __future__ import annotations

import zipfile

from overlaytools.rewheel import dist_info_dir
from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def runtime_requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"{dist_info_dir(zf)}/METADATA").decode("utf-8")
    header = metadata.partition("\n\n")[0]
    out = []
    for line in header.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = Requirement(line[len("Requires-Dist: ") :])
        if req.name in TORCH_FAMILY or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.append(str(req))
    return out
