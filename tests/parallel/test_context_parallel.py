"""Context-parallel attention on gloo against single-process attention (fp64 and fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed

B, N, D = 2, 8, 8

# (algo, cp, ulysses degree, window, overlap, sequence length, dtype)
CASES = {
    2: [("ulysses_cp_algo", 2, 2, 1, False, 12, torch.float64), ("ulysses_cp_algo", 2, 2, 1, False, 11, torch.float64),
        ("megatron_cp_algo", 2, 1, 1, False, 12, torch.float64), ("megatron_cp_algo", 2, 1, 1, True, 11, torch.float64),
        ("megatron_cp_algo", 2, 1, 1, True, 12, torch.float32), ("ulysses_cp_algo", 2, 2, 1, False, 9, torch.float32)],
    4: [("ulysses_cp_algo", 4, 4, 1, False, 13, torch.float64), ("megatron_cp_algo", 4, 1, 1, False, 16, torch.float64),
        ("megatron_cp_algo", 4, 1, 1, True, 13, torch.float64), ("megatron_cp_algo", 4, 1, 2, False, 16, torch.float64),
        ("megatron_cp_algo", 4, 1, 2, True, 14, torch.float64), ("hybrid_cp_algo", 4, 2, 1, True, 16, torch.float64),
        ("hybrid_cp_algo", 4, 2, 1, False, 13, torch.float64), ("megatron_cp_algo", 4, 1, 2, True, 13, torch.float32)],
    8: [("ulysses_cp_algo", 8, 8, 1, False, 16, torch.float64), ("megatron_cp_algo", 8, 1, 1, True, 21, torch.float64),
        ("megatron_cp_algo", 8, 1, 2, True, 24, torch.float64), ("megatron_cp_algo", 8, 1, 2, False, 19, torch.float64),
        ("hybrid_cp_algo", 8, 2, 1, True, 24, torch.float64), ("hybrid_cp_algo", 8, 4, 1, False, 21, torch.float64),
        ("hybrid_cp_algo", 8, 2, 2, True, 19, torch.float64)],
}


def _full_inputs(seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, seq, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]  # q k v probe


def _reference(seq, dtype):
    q, k, v, probe = _full_inputs(seq, dtype)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = torch.softmax((q @ k.transpose(-1, -2)) / D**0.5, dim=-1) @ v
    (out * probe).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _cp_worker(rank, world, cases):
    import torch.nn.functional as F
    from megatron.core import parallel_state as mpu

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.parallel import context_parallel as cp
    from mm.parallel.attention import context_parallel_attention

    results = []
    for algo, cp_size, u, window, overlap, seq, dtype in cases:
        initialize_parallel(ParallelSizes(world_size=world, context_parallel=cp_size, ulysses_degree=u,
                                          cp_window_size=window), cp_algo=algo, cp_overlap=overlap)
        c = mpu.get_context_parallel_rank()
        padded = -(-seq // cp_size) * cp_size
        s_local = padded // cp_size
        local = []
        for t in _full_inputs(seq, dtype):
            t = F.pad(t, (0, 0, 0, padded - seq))
            local.append(t[:, :, c * s_local:(c + 1) * s_local].clone())
        q, k, v, probe = local
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        cp.P2P_STATS["exchanges"] = 0
        out = context_parallel_attention(q, k, v, valid_tokens=seq)
        forward_exchanges = cp.P2P_STATS["exchanges"]
        (out * probe).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad, forward_exchanges, c, s_local))
        destroy_parallel()
    return results


@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_attention_matches_single_process(world):
    per_rank = run_distributed(world, _cp_worker, CASES[world])
    for i, (algo, cp_size, u, window, overlap, seq, dtype) in enumerate(CASES[world]):
        refs = _reference(seq, dtype)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        name = f"{algo} cp={cp_size} u={u} w={window} overlap={overlap} seq={seq} {dtype}"
        pieces = [[None] * cp_size for _ in range(4)]
        for results in per_rank:
            out, dq, dk, dv, exchanges, c, s_local = results[i]
            for j, t in enumerate((out, dq, dk, dv)):
                pieces[j][c] = t
            ring = cp_size // u if algo != "ulysses_cp_algo" else 1
            assert exchanges == ring - 1, f"{name}: {exchanges} p2p exchange steps in the forward, expected {ring - 1}"
        for j, label in enumerate(("out", "dq", "dk", "dv")):
            got = torch.cat(pieces[j], dim=2)
            if label in ("dk", "dv"):  # padded keys take no part
                assert torch.count_nonzero(got[:, :, seq:]) == 0, f"{name}: padded {label}"
            got, ref = got[:, :, :seq].double(), refs[j].double()
            rel = ((got - ref).norm() / ref.norm()).item()
            assert rel <= tol, f"{name}: {label} relative error {rel:.3g}"
