"""Encoder interleaved offload (``encoder_offload_interval: N > 1``): the frozen encoders live in
host memory; every N steps they are brought to the device, encode the next N steps' batches at
once, and go back to (pinned) host memory, so they never sit on the device while the DiT trains.
It moves each parameter's storage whole: the configuration check refuses it with ``text_encoder_fsdp``
(FSDP2 keeps its own sharded storage, which this would bypass).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

import torch

Batch = TypeVar("Batch")
Encoded = TypeVar("Encoded")


class InterleavedEncoderOffload:
    def __init__(self, encoders: list[torch.nn.Module], interval: int, device: torch.device):
        if interval < 1:
            raise ValueError(f"encoder_offload_interval = {interval}; valid: an integer >= 1")
        self.encoders, self.interval, self.device = encoders, interval, device
        self.offloading = interval > 1
        self.host = torch.device("cpu")
        if self.offloading:
            self._move(self.host)

    def _move(self, device: torch.device) -> None:
        pin = device.type == "cpu" and self.device.type != "cpu"
        for module in self.encoders:
            for tensor in (*module.parameters(), *module.buffers()):
                moved = tensor.data.to(device, non_blocking=True)
                tensor.data = moved.pin_memory() if pin else moved

    def encode_ahead(self, batches: list[Batch], encode: Callable[[Batch], Encoded]) -> list[Encoded]:
        """Encode ``batches`` with the encoders on the device, then offload them again."""
        if self.offloading:
            self._move(self.device)
        try:
            with torch.no_grad():
                return [encode(batch) for batch in batches]
        finally:
            if self.offloading:
                self._move(self.host)

    def iterate(self, batches: Iterable[Batch], encode: Callable[[Batch], Encoded]) -> Iterator[Encoded]:
        """Encoded batches in order, encoded ``interval`` at a time."""
        pending: list[Batch] = []
        for batch in batches:
            pending.append(batch)
            if len(pending) == self.interval:
                yield from self.encode_ahead(pending, encode)
                pending = []
        if pending:
            yield from self.encode_ahead(pending, encode)
