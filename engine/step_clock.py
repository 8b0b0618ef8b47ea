"""When the device starts each engine step, so that a step's cost is the time from its start to the next one's.

Costs taken that way tile the device's timeline whichever steps follow which, host gaps included where the device
waited for the host. The host's clock cannot tell when the device started a step queued behind another (the host
may be busy launching a third meanwhile), so on the GPU a step's start is a CUDA event queued before its work; on the
CPU, which runs a step's work as it is launched, it is the launch's start.
"""

from __future__ import annotations

import time

import torch

StepMark = torch.cuda.Event | float


class StepClock:
    def __init__(self, device: torch.device):
        self._device = device
        self._cuda = device.type == "cuda"

    def mark(self) -> StepMark:
        """Call before queuing a step's first device work."""
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))  # the stream the step's work is queued on
        return event

    def seconds(self, start: StepMark, end: StepMark) -> float:
        """From one mark to a later one that the device has passed (a step queued after it was read)."""
        if isinstance(start, float) and isinstance(end, float):
            return end - start
        return start.elapsed_time(end) / 1e3
