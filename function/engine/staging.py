"""Host -> device copies that never wait for the GPU. The engine launches a step before it reads the previous
step's tokens, so a copy that synchronises the stream (a plain `.to(device)` or `torch.tensor(..., device=...)`
from pageable memory) would stall the host until the queued steps finish and leave the GPU idle after them."""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A list (or CPU tensor) on `device` without a stream sync: on CUDA through a pinned buffer from torch's
    caching host allocator, which is not reused before the copy has run."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
