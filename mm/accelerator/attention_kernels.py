"""Attention kernels that return the log-sum-exp, behind one interface.

Context-parallel attention computes attention block by block and merges the partial results, so a
kernel must give, besides the output, the row-wise log-sum-exp of the scaled scores, and must have
a backward that takes the *final* output and log-sum-exp (after merging across blocks).

Shapes: ``q [b, n, sq, d]``, ``k, v [b, n, sk, d]``; ``forward -> (out [b, n, sq, d] in q's dtype,
lse [b, n, sq] in fp32, or fp64 for fp64 inputs)``; ``backward(dout, q, k, v, out, lse) -> dq, dk, dv``.

Kernels: ``math`` (pure PyTorch, any device, the reference), ``flash`` and ``cudnn`` (torch's aten
SDPA kernels on CUDA GPUs, which expose the log-sum-exp), ``flash3`` (flash-attention 3's Hopper
kernels, where the ``flash_attn_3`` package is installed), ``npu_fusion_attention`` (Ascend, through
torch_npu; import-guarded and not yet run on hardware here).
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch

from mm.accelerator.device import get_accelerator


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32 for scores and the log-sum-exp; fp64 stays fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class MathAttention:
    """Reference kernel in plain PyTorch: materialises the score matrix, so for tests and CPUs."""

    name = "math"
    # torch's SDPA dispatches to this kernel (or one of the same math): CoreAttention leaves it the choice
    torch_sdpa = True

    def forward(self, q, k, v, scale: float):
        dt = compute_dtype(q)
        scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(dt))
        # no .to() that would return ``out`` itself: traced by torch.compile inside an autograd
        # function (cp.local_attention), such a no-op cast left the inputs without gradients (torch 2.11)
        return (out if out.dtype == q.dtype else out.to(q.dtype)), lse

    @staticmethod
    def attention(q, k, v, scale: float):
        """The output alone, differentiable: torch's math SDPA and no other kernel."""
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, False, None, scale=scale)[0]

    def backward(self, dout, q, k, v, out, lse, scale: float):
        dt = compute_dtype(q)
        q_, k_, v_, do = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
        p = torch.exp(torch.matmul(q_, k_.transpose(-1, -2)) * scale - lse.to(dt).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v_.transpose(-1, -2))
        delta = (do * out.to(dt)).sum(dim=-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, k_) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q_) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention:
    """torch's flash-attention SDPA kernel (CUDA, fp16/bf16)."""

    name = "flash"
    torch_sdpa = True

    def forward(self, q, k, v, scale: float):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse

    @staticmethod
    def attention(q, k, v, scale: float):
        """The output alone, differentiable (aten's own backward): this kernel and no other."""
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[0]

    def backward(self, dout, q, k, v, out, lse, scale: float):
        sq, sk = q.shape[2], k.shape[2]
        no_cum_seq = None  # an undefined tensor: a dense batch, not variable-length sequences
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # unused without dropout
        rng_unused = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse.float().contiguous(), no_cum_seq, no_cum_seq, sq, sk, 0.0, False,
            rng_state, rng_unused, scale=scale)
        return dq, dk, dv


class CudnnAttention:
    """torch's cuDNN SDPA kernel (CUDA, fp16/bf16); the fastest at DiT sequence lengths on H100."""

    name = "cudnn"
    torch_sdpa = True

    def forward(self, q, k, v, scale: float):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
        return out, lse.reshape(q.shape[:3])

    @staticmethod
    def attention(q, k, v, scale: float):
        """The output alone, differentiable (aten's own backward): this kernel and no other."""
        # the log-sum-exp is what its backward reads: computed whenever a gradient will be asked for
        lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, False, False,
                                                                  scale=scale)[0]

    def backward(self, dout, q, k, v, out, lse, scale: float):
        sq, sk = q.shape[2], k.shape[2]
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # unused without dropout
        # no attention bias and no cumulative sequence lengths (undefined tensors: a dense batch)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout.contiguous(), q, k, v, out, lse.float().unsqueeze(-1).contiguous(), seed, seed, None,
            None, None, sq, sk, 0.0, False, scale=scale)
        return dq, dk, dv


class FlashAttention3:
    """flash-attention 3 (the ``flash_attn_3`` package, Hopper GPUs, fp16/bf16), through the custom ops
    of its ``flash_attn_interface`` module, which torch.compile can trace. The kernels take
    ``[b, s, n, d]`` with a unit stride in ``d`` only, so the ``[b, n, s, d]`` views of this interface
    pass through without copies; out and dq/dk/dv come back as ``[b, n, s, d]`` views of
    ``[b, s, n, d]`` storage."""

    name = "flash3"
    torch_sdpa = False  # torch's SDPA cannot dispatch to it: callers use forward/backward

    @staticmethod
    def _ops():
        import flash_attn_interface

        return flash_attn_interface

    def forward(self, q, k, v, scale: float):
        out, lse, *_ = self._ops()._flash_attn_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                        softmax_scale=scale)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, scale: float):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (qt, kt, vt))
        self._ops()._flash_attn_backward(dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2),
                                         lse.float().contiguous(), dq=dq, dk=dk, dv=dv, softmax_scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class NpuFusionAttention:
    """Ascend's fused attention through torch_npu, BNSD layout (not yet run on hardware here)."""

    name = "npu_fusion_attention"
    torch_sdpa = True

    def forward(self, q, k, v, scale: float):
        import torch_npu

        out, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
            q, k, v, q.shape[1], "BNSD", scale=scale, keep_prob=1.0)
        lse = (softmax_max[..., 0] + torch.log(softmax_sum[..., 0])).float()
        return out, lse

    def backward(self, dout, q, k, v, out, lse, scale: float):
        # the NPU kernel's backward wants its own (max, sum) pair; feed the merged lse as max with sum 1
        import torch_npu

        softmax_max = lse.float().unsqueeze(-1).expand(*lse.shape, 8).contiguous()
        softmax_sum = torch.ones_like(softmax_max)
        dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
            q, k, v, dout, q.shape[1], "BNSD", softmax_max=softmax_max, softmax_sum=softmax_sum,
            attention_in=out, scale_value=scale, keep_prob=1.0)
        return dq, dk, dv


KERNELS = {k.name: k for k in (MathAttention, FlashAttention, CudnnAttention, FlashAttention3, NpuFusionAttention)}
KERNEL_CHOICES = ("auto", *KERNELS)


# flash-attention 3's compiled ops, by its version: what flash_attn_interface needs at the first call
FLASH3_EXTENSIONS = ("flash_attn_3._C", "flash_attn_3_cuda")
_flash3: list[str | None] = []  # looked up once (kernels_for runs inside compiled regions)


def _find_flash3_problem() -> str | None:
    if importlib.util.find_spec("flash_attn_interface") is None:
        return "flash_attn_3 is not installed (scripts/build_flash_attn3.sh builds it)"
    try:
        importlib.import_module("flash_attn_interface")
    except Exception as e:  # noqa: BLE001 -- whatever a broken install raises, it cannot run
        return f"flash_attn_interface does not import: {type(e).__name__}: {e}"
    failures = []
    for name in FLASH3_EXTENSIONS:
        try:
            importlib.import_module(name)
            break
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__}: {e}")
    else:
        return f"its compiled extension does not load ({'; '.join(failures)})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"it runs on Hopper GPUs (sm_90); this GPU is sm_{major}{minor}"
    return None


def flash3_problem() -> str | None:
    """Why flash-attention 3 cannot run in this process (not installed, its compiled extension does
    not load, no Hopper GPU), or None; found once."""
    if not _flash3:
        _flash3.append(_find_flash3_problem())
    return _flash3[0]


def kernel_note(accelerator_name: str, kernel: str) -> str | None:
    """What the user should know, once, of --attention-kernel ``kernel`` on ``accelerator_name``: that
    ``auto`` takes cuDNN's kernel where flash-attention 3 is installed but cannot run; else None."""
    return flash3_fallback_note() if accelerator_name == "cuda" and kernel == "auto" else None


def flash3_fallback_note() -> str | None:
    """For the user, once: flash-attention 3 is installed but cannot run, so ``auto`` takes cuDNN's."""
    problem = flash3_problem()
    if problem is None or importlib.util.find_spec("flash_attn_interface") is None:
        return None
    return f"--attention-kernel auto: flash-attention 3 is installed but cannot run here ({problem}); using cudnn"


_KERNELS_FOR: dict[str, list[str]] = {}  # found once per accelerator


def kernels_for(accelerator_name: str) -> list[str]:
    """Kernels usable on an accelerator, fastest first (flash3 only where it can run). Found once per
    process: compiled layers call this, and the lookups behind it (``importlib.util.find_spec``) would
    break their graph, which inside a selectively checkpointed region runs the whole region eagerly.
    ``mm.parallel.initialize_parallel`` looks it up before any layer runs."""
    if accelerator_name not in _KERNELS_FOR:
        if accelerator_name == "cuda":
            found = (["flash3"] if flash3_problem() is None else []) + ["cudnn", "flash", "math"]
        elif accelerator_name == "npu" and importlib.util.find_spec("torch_npu") is not None:
            found = ["npu_fusion_attention", "math"]
        else:
            found = ["math"]
        _KERNELS_FOR[accelerator_name] = found
    return list(_KERNELS_FOR[accelerator_name])


def available_kernels() -> list[str]:
    """Kernels usable on this process's accelerator, fastest first."""
    return kernels_for(get_accelerator().name)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def get_kernel(name: str = "auto", dtype: torch.dtype | None = None):
    """The kernel ``name`` (``auto``: the fastest available here for ``dtype``; the fused GPU/NPU
    kernels take fp16/bf16 only, so fp32/fp64 inputs get the math kernel)."""
    if name == "auto":
        name = next(k for k in available_kernels() if k == "math" or dtype is None or dtype in LOW_PRECISION)
    if name not in KERNELS:
        raise ValueError(f"--attention-kernel {name!r}; valid: {', '.join(KERNEL_CHOICES)}")
    if name not in available_kernels():
        why = f" ({flash3_problem()})" if name == "flash3" else ""
        raise ValueError(f"--attention-kernel {name!r} is not available on {get_accelerator().name}{why}; "
                         f"available: {', '.join(available_kernels())}")
    return KERNELS[name]()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
