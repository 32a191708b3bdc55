"""Context-parallel attention: each CP rank holds a contiguous shard of the sequence.

* Ulysses (``ulysses_cp_algo``): an all-to-all turns sequence shards into head shards, every rank
  attends over the whole sequence for ``n / U`` heads, a second all-to-all turns it back.
* Ring (``megatron_cp_algo``): queries stay; key/value shards travel around the ring in CP-1
  exchange steps; partial outputs are merged with their log-sum-exp in fp32. The backward sends
  the key/value shards around again with fp32 dK/dV accumulators that travel with them and finish
  at their owner. With ``overlap`` the next step's send/recv is in flight during this step's
  compute (a side stream on GPUs/NPUs: the p2p calls are asynchronous).
* Double ring (``cp_window_size = W > 1``): the forward circulates key/value shards inside windows
  of W consecutive ring members (an inner ring, on fast links) and moves them between windows once
  per window round (the outer ring). The backward uses the plain ring over the same ranks.
* Hybrid (``hybrid_cp_algo``): Ulysses inside each Ulysses group, ring across the ring group.

Non-causal attention (DiT), so no load-balancing zigzag. Padding at the end of the global
sequence is excluded from the keys by giving each shard its number of valid keys.

Tensors are ``[b, n, s, d]`` (batch, heads, sequence, head dim) inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mm.accelerator.attention_kernels import compute_dtype


# ------------------------------------------------------------------------------------------ Ulysses


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, n, s/U, d] sequence shard -> [b, n/U, s, d] head shard (rank order = sequence order)."""
    u = dist.get_world_size(group)
    b, n, s, d = x.shape
    send = x.reshape(b, u, n // u, s, d).transpose(0, 1).contiguous()  # [U, b, n/U, s/U, d] by head group
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my head group, rank j's tokens
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n // u, u * s, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, n/U, s, d] head shard -> [b, n, s/U, d] sequence shard."""
    u = dist.get_world_size(group)
    b, nu, s, d = x.shape
    send = x.reshape(b, nu, u, s // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, b, n/U, s/U, d] by token shard
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my tokens, head group j
    return recv.transpose(0, 1).reshape(b, u * nu, s // u, d)


class _UlyssesAllToAll(torch.autograd.Function):
    """Sequence shards -> head shards (``to_heads``) or back; the backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return _seq_to_heads(x, group) if to_heads else _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


# ------------------------------------------------------------------------------------------ ring


@dataclass
class RingSpec:
    """One ring: its group, this rank's place in it, and (double ring) the window groups."""

    group: dist.ProcessGroup
    ranks: list[int]  # global ranks in ring order
    window: int = 1
    inner_group: dist.ProcessGroup | None = None
    inner_ranks: list[int] | None = None
    outer_group: dist.ProcessGroup | None = None
    outer_ranks: list[int] | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        return self.ranks.index(dist.get_rank())


P2P_STATS = {"exchanges": 0}  # exchange steps issued (send + recv pairs); tests count them


def _exchange(tensors: list[torch.Tensor], send_to: int, recv_from: int, group: dist.ProcessGroup):
    """Start sending ``tensors`` to global rank ``send_to`` and receiving same-shaped ones from
    ``recv_from``; returns (received buffers, requests). Posting both in one batch avoids the
    send/send deadlock of blocking p2p on rings of any size."""
    P2P_STATS["exchanges"] += 1
    flat = torch.cat([t.reshape(-1) for t in tensors])
    recv = torch.empty_like(flat)
    ops = [dist.P2POp(dist.isend, flat, send_to, group), dist.P2POp(dist.irecv, recv, recv_from, group)]
    reqs = dist.batch_isend_irecv(ops)
    return (recv, [t.shape for t in tensors]), reqs


def _finish(pending) -> list[torch.Tensor]:
    (flat, shapes), reqs = pending
    for r in reqs:
        r.wait()
    out, offset = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(flat[offset:offset + n].view(shape))
        offset += n
    return out


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalised partial results by their log-sum-exps (fp32/fp64)."""
    if out is None:
        return block_out.to(block_lse.dtype), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out.to(new_lse.dtype) * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def _forward_schedule(spec: RingSpec):
    """Per step: which ring index's K/V this rank holds, and the exchange that brings the next one
    (send_to, recv_from, group) or None after the last step."""
    r, size, w = spec.index, spec.size, spec.window
    if w == 1:
        for step in range(size):
            nxt = (spec.ranks[(r + 1) % size], spec.ranks[(r - 1) % size], spec.group) if step < size - 1 else None
            yield (r - step) % size, nxt
        return
    win, pos = divmod(r, w)
    windows = size // w
    for outer in range(windows):
        src_win = (win - outer) % windows
        for inner in range(w):
            holder = src_win * w + (pos - inner) % w
            if inner < w - 1:
                inner_ranks = spec.inner_ranks
                nxt = (inner_ranks[(pos + 1) % w], inner_ranks[(pos - 1) % w], spec.inner_group)
            elif outer < windows - 1:
                nxt = "outer"
            else:
                nxt = None
            yield holder, nxt


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec, kernel, scale: float, valid: list[int], overlap: bool):
        """``valid[j]``: number of real (non-padding) keys in ring index j's shard."""
        out = lse = None
        kv = [k, v]
        w, windows = spec.window, spec.size // spec.window
        outer_pending = None
        for step, (holder, nxt) in enumerate(_forward_schedule(spec)):
            if w > 1 and step % w == 0 and step // w < windows - 1:
                # a window round starts: pass this round's K/V on to the next window meanwhile
                outer, o = spec.outer_ranks, spec.index // w
                outer_pending = _exchange(kv, outer[(o + 1) % windows], outer[(o - 1) % windows], spec.outer_group)
            inner = nxt if nxt not in (None, "outer") else None
            pending = _exchange(kv, *inner) if overlap and inner is not None else None
            if valid[holder] > 0:
                n = valid[holder]
                block_out, block_lse = kernel.forward(q, kv[0][:, :, :n], kv[1][:, :, :n], scale)
                out, lse = _merge(out, lse, block_out, block_lse)
            if inner is not None:
                kv = _finish(pending if overlap else _exchange(kv, *inner))
            elif nxt == "outer":
                kv, outer_pending = _finish(outer_pending), None
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.spec, ctx.kernel, ctx.scale, ctx.valid, ctx.overlap = spec, kernel, scale, valid, overlap
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec, kernel, scale, valid, overlap = ctx.spec, ctx.kernel, ctx.scale, ctx.valid, ctx.overlap
        size, r = spec.size, spec.index
        send_to, recv_from = spec.ranks[(r + 1) % size], spec.ranks[(r - 1) % size]
        dt = compute_dtype(q)
        dq = torch.zeros_like(q, dtype=dt)
        kv = [k, v]
        dkv = [torch.zeros_like(k, dtype=dt), torch.zeros_like(v, dtype=dt)]
        for step in range(size):
            holder = (r - step) % size
            pending = _exchange(kv, send_to, recv_from, spec.group) if overlap and step < size - 1 else None
            n_valid = valid[holder]
            if n_valid > 0:
                kk, vv = kv[0][:, :, :n_valid], kv[1][:, :, :n_valid]
                bdq, bdk, bdv = kernel.backward(dout, q, kk, vv, out, lse, scale)
                dq += bdq.to(dt)
                dkv[0][:, :, :n_valid] += bdk.to(dt)
                dkv[1][:, :, :n_valid] += bdv.to(dt)
            # the accumulators follow their K/V; after the last step one more hop brings them home
            dkv = _finish(_exchange(dkv, send_to, recv_from, spec.group))
            if step < size - 1:
                kv = _finish(pending) if overlap else _finish(_exchange(kv, send_to, recv_from, spec.group))
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, spec: RingSpec, kernel, scale: float, valid: list[int], overlap: bool = False):
    """Attention of this rank's queries over every ring member's keys/values, [b, n, s_local, d]."""
    return _RingAttention.apply(q, k, v, spec, kernel, scale, valid, overlap)


def ulysses_attention(q, k, v, group, kernel, scale: float, valid_total: int, ring: RingSpec | None = None,
                      ring_valid: list[int] | None = None, overlap: bool = False):
    """Ulysses all-to-all around attention over the whole (Ulysses-gathered) sequence; with ``ring``,
    that attention is itself ring attention across the ring group (hybrid)."""
    q, k, v = (_UlyssesAllToAll.apply(t, group, True) for t in (q, k, v))
    if ring is None:
        out = _LocalAttention.apply(q, k[:, :, :valid_total], v[:, :, :valid_total], kernel, scale)
    else:
        out = ring_attention(q, k, v, ring, kernel, scale, ring_valid, overlap)
    return _UlyssesAllToAll.apply(out, group, False)


class _LocalAttention(torch.autograd.Function):
    """A kernel's forward/backward as an autograd function (no communication)."""

    @staticmethod
    def forward(ctx, q, k, v, kernel, scale):
        out, lse = kernel.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.scale = kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None, None


def local_attention(q, k, v, kernel, scale: float):
    return _LocalAttention.apply(q, k, v, kernel, scale)


def shard_valid_counts(valid_tokens: int, shard_len: int, shards: int) -> list[int]:
    """Real (non-padding) tokens in each of ``shards`` consecutive shards of ``shard_len``."""
    return [max(0, min(shard_len, valid_tokens - i * shard_len)) for i in range(shards)]


class _GatherSequence(torch.autograd.Function):
    """All-gather ``[s_local, ...]`` shards along dim 0; backward keeps this rank's slice (the
    gathered tensor is used whole, identically, on every rank of the group)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = dist.get_world_size(group)
        out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)].contiguous(), None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherSequence.apply(x, group)
