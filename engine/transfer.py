"""Host values to the device without waiting for it: a blocking copy waits for all work queued before it, which
on the GPU is the step in flight (and a step launched ahead must be queued before that step is read)."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
