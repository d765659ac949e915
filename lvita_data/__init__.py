"""lvita_data: Long-VITA data preparation (manifests, sources, exact token planning, shards).

The data flows manifest -> records -> samples -> packing -> shards -> loader, one sub-package per
step, with media (all pixel and container I/O), build (`lvita plan` / `lvita build`), verify and
stats beside it. The public API below is imported lazily (PEP 562), so importing a pure planning
module such as `lvita_data.samples.tiling` never pulls in Pillow, PyAV or torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("lvita")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_PUBLIC = {
    "load_manifest": "lvita_data.manifest",
    "plan_stage": "lvita_data.build.plan",
    "build_stage": "lvita_data.build.run",
    "ShardLoader": "lvita_data.loader",
    "PackedBatch": "lvita_data.loader",
    "verify_build": "lvita_data.verify",
    "compute_stats": "lvita_data.stats.compute",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lvita_data' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
