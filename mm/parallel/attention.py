"""Core attention: softmax(q k^T / sqrt(d)) v over local heads, the one slot context parallelism
plugs into.

Layers call ``CoreAttention`` with ``[s, b, n, d]`` query/key/value (``n`` = heads on this TP rank)
and get ``[s, b, n * d]`` back. Today it runs torch's scaled_dot_product_attention on the full
sequence; the context-parallel algorithms (Ulysses, ring, hybrid, double ring) replace what
happens inside ``forward`` without any change to the layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CoreAttention(torch.nn.Module):
    """Bidirectional attention over the local heads (DiT attention has no mask)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # [s, b, n, d] -> [b, n, s, d] for SDPA, and back to [s, b, n * d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
