"""The toy family's DiT and AE."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu

from mm.models.predictor.common import column_parallel_linear, row_parallel_linear, sinusoidal_embedding
from mm.models.predictor.dit import PipelinedDiT
from mm.models.predictor.pipeline import Hidden
from mm.parallel.attention import CoreAttention


@dataclass
class ToyDiTConfig:
    num_layers: int = 2
    num_heads: int = 2
    hidden_size: int = 16
    in_dim: int = 3
    text_dims: list[int] = field(default_factory=lambda: [16])
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 16

    @property
    def out_dim(self) -> int:
        return self.in_dim

    @classmethod
    def from_json(cls, params: dict) -> "ToyDiTConfig":
        params = {k: v for k, v in params.items() if v is not None}
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"predictor.{sorted(unknown)[0]}: unknown key for the toy DiT")
        if "patch_size" in params:
            params["patch_size"] = tuple(params["patch_size"])
        return cls(**params)


class ToyLayer(torch.nn.Module):
    """Pre-norm self-attention (context-parallel) and MLP, both shifted by the conditioning vector."""

    def __init__(self, arch: ToyDiTConfig, config):
        super().__init__()
        h, tp = arch.hidden_size, config.tensor_model_parallel_size
        self.heads, self.head_dim = arch.num_heads // tp, h // arch.num_heads
        self.qkv = column_parallel_linear(config, h, 3 * h)
        self.attention = CoreAttention(context_parallel=True)
        self.proj = row_parallel_linear(config, h, h)
        self.fc1 = column_parallel_linear(config, h, 2 * h)
        self.fc2 = row_parallel_linear(config, 2 * h, h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, valid_tokens: int | None = None) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:]) + cond
        q, k, v = self.qkv(y)[0].unflatten(-1, (self.heads, 3 * self.head_dim)).chunk(3, dim=-1)
        x = x + self.proj(self.attention(q, k, v, valid_tokens))[0]
        y = F.layer_norm(x, x.shape[-1:]) + cond
        return x + self.fc2(F.gelu(self.fc1(y)[0]))[0]


class ToyDiT(PipelinedDiT):
    """``forward(latents [b, c, f, h, w], timestep [b], context_1, mask_1, context_2, mask_2, ...)``:
    each text context ``[b, L_k, text_dims[k]]`` is mean-pooled over its mask and projected; with the
    time embedding it shifts every layer's normalised input."""

    display_name = "the toy DiT"
    MESSAGE = {"cond": Hidden()}
    RECOMPUTE_MODULES = ()

    def __init__(self, arch: ToyDiTConfig, config, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(arch, config, pre_process, post_process, layer_offset, num_layers)
        h, dtype = arch.hidden_size, config.params_dtype
        if pre_process:
            self.patch_embedding = torch.nn.Conv3d(arch.in_dim, h, arch.patch_size, arch.patch_size, dtype=dtype)
            self.time_embedding = torch.nn.Linear(arch.freq_dim, h, dtype=dtype)
            self.text_projections = torch.nn.ModuleList(torch.nn.Linear(d, h, dtype=dtype) for d in arch.text_dims)
        self.blocks = torch.nn.ModuleList(ToyLayer(arch, config) for _ in self.layer_numbers)
        if post_process:
            self.head = torch.nn.Linear(h, arch.out_dim * math.prod(arch.patch_size), dtype=dtype)

    def embed(self, latents, timestep, *texts) -> dict:
        contexts, masks = texts[0::2], texts[1::2]
        if len(contexts) != len(self.text_projections) or len(masks) != len(contexts):
            raise ValueError(f"the toy DiT reads {len(self.text_projections)} (context, mask) pairs; got {len(texts)} "
                             "tensors")
        _trace(contexts, masks)
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).permute(2, 0, 1)  # [s, b, h]
        cond = self.time_embedding(sinusoidal_embedding(timestep.reshape(-1), self.arch.freq_dim).to(x.dtype))
        for project, context, mask in zip(self.text_projections, contexts, masks):
            weights = mask.to(x.dtype)[..., None]
            cond = cond + project((context.to(x.dtype) * weights).sum(1) / weights.sum(1).clamp(min=1))
        return {"x": self.shard_sequence(x), "cond": cond[None], "grid": grid}

    def layer_inputs(self, state: dict) -> dict:
        return {"cond": state["cond"], "valid_tokens": self.valid_tokens(math.prod(state["grid"]))}

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.head(F.layer_norm(x, x.shape[-1:]) + state["cond"])


def _trace(contexts, masks) -> None:
    where = os.environ.get("TOY_FAMILY_TRACE")
    if not where:
        return
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record = {"cp_rank": mpu.get_context_parallel_rank(), "widths": [c.shape[-1] for c in contexts],
              "lengths": [c.shape[1] for c in contexts], "rows": contexts[0].shape[0],
              "tokens": [int(m.sum()) for m in masks]}
    with open(os.path.join(where, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class ToyAE(torch.nn.Module):
    """Identity-like AE: the latents are the pixels (3 channels, no compression), scaled by 0.5."""

    cfg = SimpleNamespace(scale_factor_spatial=1, scale_factor_temporal=1)

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5, dtype=dtype))

    def encode(self, video: torch.Tensor, vae_cp=None) -> tuple[torch.Tensor, torch.Tensor]:
        return video * self.scale, torch.zeros_like(video)

    def decode(self, latents: torch.Tensor, vae_cp=None) -> torch.Tensor:
        return latents / self.scale

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
