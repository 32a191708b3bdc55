"""Exponential moving average of the DiT weights (``--ema-decay``).

Each rank keeps an fp32 copy of its own model chunks' weights (its TP/PP/VPP shard, like the
model itself; replicated over DP x CP as the model is). After every optimizer step that was
taken (not after a skipped one)::

    ema = weights                                  iteration <= --ema-start-iter
    ema = decay * ema + (1 - decay) * weights      afterwards

``weights`` are the model's parameters as the forward uses them (bf16 under --bf16). Checkpoints
carry the average under ``ema.<global tensor name>`` with the model's own sharding, so it
reshards like the model (``sharded_state_dict``) and is kept per chunk in the torch format
(``state_dict``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mm.ckpt import unwrap

PREFIX = "ema."


class ModelEMA:
    """fp32 moving averages of ``model_chunks``' parameters, by each chunk's state-dict name."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], decay: float, start_iter: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay {decay}; valid: 0 < decay < 1 (e.g. 0.9999)")
        self.decay, self.start_iter = decay, start_iter
        self.chunks = [unwrap(c) for c in model_chunks]
        self.averages = [{name: p.detach().float().clone() for name, p in chunk.named_parameters()}
                         for chunk in self.chunks]

    @torch.no_grad()
    def reset(self) -> None:
        """Averages = the current weights (a start without an average to resume)."""
        for chunk, average in zip(self.chunks, self.averages):
            for name, p in chunk.named_parameters():
                average[name].copy_(p)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """After the optimizer step of ``iteration`` (1-based)."""
        for chunk, average in zip(self.chunks, self.averages):
            for name, p in chunk.named_parameters():
                if iteration <= self.start_iter:
                    average[name].copy_(p)
                else:
                    average[name].lerp_(p.float(), 1.0 - self.decay)

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        """One ``{name: tensor}`` per chunk (the torch format)."""
        return self.averages

    def load_state_dict(self, state: list[dict[str, torch.Tensor]]) -> None:
        if len(state) != len(self.averages):
            raise KeyError(f"the checkpoint's EMA has {len(state)} model chunk(s); this run has {len(self.averages)}")
        for average, loaded in zip(self.averages, state):
            missing = sorted(set(average) - set(loaded))
            if missing:
                raise KeyError(f"the checkpoint's EMA lacks {', '.join(missing[:10])}")
            for name, tensor in average.items():
                tensor.copy_(loaded[name])

    def sharded_state_dict(self, chunk_keys: list[str]) -> dict:
        """``{chunk key: {name: ShardedTensor/factory}}`` under ``ema.<global name>``: each chunk's own
        ``sharded_state_dict`` with the averages in place of the parameters."""
        out = {}
        for key, chunk, average in zip(chunk_keys, self.chunks, self.averages):
            entries = chunk.sharded_state_dict(prefix=PREFIX)
            out[key] = {}
            for name, entry in entries.items():
                local = name[len(PREFIX):]
                if local in average:
                    entry.data = average[local]
                    if hasattr(entry, "dtype"):  # a ShardedTensor records its data's dtype
                        entry.dtype = average[local].dtype
                    out[key][name] = entry
        return out

    def load_sharded(self, loaded: dict, chunk_keys: list[str]) -> None:
        """What ``dist_checkpointing.load`` returned for ``sharded_state_dict(chunk_keys)``."""
        for key, average in zip(chunk_keys, self.averages):
            for name, tensor in loaded[key].items():
                average[name[len(PREFIX):]].copy_(tensor.reshape(average[name[len(PREFIX):]].shape))
