"""Choose an attention backend by name or by device, and check that it can do what a caller needs.

``get_backend("auto", device)`` picks, in order: an ``npu`` device with torch_npu -> ``npu``;
a ``cuda`` device with flash-attn importable -> ``flash``; a ``cuda`` device whose torch has
its own flash kernel (sm80+) -> ``torch_varlen``; anything else -> ``sdpa`` (the exact fp32
reference, any device). An explicit name that cannot run on the device raises
`AttentionBackendError` saying why and what to install. Nothing here imports an optional
package at module import: each backend's ``is_available(device) -> (ok, reason)`` does so
lazily, guarded by ``except Exception`` (a broken CUDA/CANN install raises more than
ImportError).

`assert_supports` turns a caller's needs (causal, varlen, LSE, block backward for a ring, a
dtype, a device) into one error naming the first missing capability.
"""

from __future__ import annotations

import torch

from lvita_model.attention.base import AttentionBackend, device_type
from lvita_model.attention.flash import FlashBackend
from lvita_model.attention.npu import NpuBackend
from lvita_model.attention.sdpa import SdpaBackend
from lvita_model.attention.torch_varlen import TorchVarlenBackend
from lvita_model.errors import AttentionBackendError

BACKENDS: dict[str, type[AttentionBackend]] = {
    "sdpa": SdpaBackend,
    "flash": FlashBackend,
    "torch_varlen": TorchVarlenBackend,
    "npu": NpuBackend,
}
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "npu": ("npu", "sdpa"),
    "cuda": ("flash", "torch_varlen", "sdpa"),
}


def backend_available(
    backend: str | type[AttentionBackend], device: torch.device | str | None = None
) -> tuple[bool, str]:
    """(usable on `device`, reason) for a backend name or class."""
    cls = BACKENDS[backend] if isinstance(backend, str) else backend
    return cls.is_available(device if device is not None else device_type(device))


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """A backend instance by name ("auto", "sdpa", "flash", "torch_varlen", "npu")."""
    if name == "auto":
        kind = device_type(device)
        for candidate in AUTO_ORDER.get(kind, ("sdpa",)):
            if backend_available(candidate, device if device is not None else kind)[0]:
                return BACKENDS[candidate]()
        return SdpaBackend()
    if name not in BACKENDS:
        raise AttentionBackendError(
            f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}"
        )
    ok, reason = backend_available(name, device)
    if not ok:
        raise AttentionBackendError(
            f"attention backend {name!r} is unavailable on {device_type(device)!r}: {reason}. "
            "Use 'auto' or 'sdpa' (reference, any device) instead"
        )
    return BACKENDS[name]()


def assert_supports(
    backend: AttentionBackend | type[AttentionBackend],
    *,
    causal: bool = False,
    varlen: bool = False,
    lse: bool = False,
    block_backward: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Raise `AttentionBackendError` naming the first capability `backend` lacks."""
    caps = backend.capabilities
    needs = {"causal": causal, "varlen": varlen, "lse": lse, "block_backward": block_backward}
    for capability, needed in needs.items():
        if needed and not getattr(caps, capability):
            raise AttentionBackendError(
                f"attention backend {backend.name!r} lacks capability {capability!r}"
            )
    if dtype is not None and dtype not in caps.dtypes:
        raise AttentionBackendError(
            f"attention backend {backend.name!r} does not support dtype {dtype} "
            f"(supports {[str(d) for d in caps.dtypes]})"
        )
    if device is not None and device_type(device) not in caps.devices:
        raise AttentionBackendError(
            f"attention backend {backend.name!r} does not run on device "
            f"{device_type(device)!r} (runs on {list(caps.devices)})"
        )
