"""The Open-Sora-Plan v1.3 DiT: 2-D patch embedding (I2V: plus masked-video and mask embeddings),
adaLN-single timestep conditioning, caption projection, sparse DiT layers and adaLN head inside the
shared pipelined-DiT shell (``mm/models/predictor/dit.py``: stages, token sharding, recompute, the
message between stages, gather and unpatchify)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from mm.models.predictor.common import (
    FP32LayerNorm,
    TwoLayerMLP,
    mark_sequence_parallel,
    sinusoidal_embedding,
    upcast,
)
from mm.models.predictor.dit import PipelinedDiT
from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig
from mm.models.predictor.opensoraplan.layers import (
    MASKED_BIAS,
    OSP_RECOMPUTE_MODULES,
    PADDING_BIAS,
    OpenSoraPlanLayer,
    rope_tables,
)
from mm.models.predictor.opensoraplan.weights import rule_for
from mm.models.predictor.pipeline import Hidden, PerSample
from mm.parallel.dynamic_cp import context_parallel_size

TIMESTEP_CHANNELS = 256  # adaLN-single's sinusoidal width (diffusers' AdaLayerNormSingle)


class PatchEmbed2D(torch.nn.Module):
    """Each frame's ``p x p`` patches -> hidden: ``[b, c, t, H, W] -> [t*h*w, b, hidden]``."""

    def __init__(self, in_channels: int, hidden: int, patch: int, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[2]
        y = self.proj(x.transpose(1, 2).flatten(0, 1))  # [(b t), hidden, h, w]
        return y.unflatten(0, (b, t)).permute(1, 3, 4, 0, 2).flatten(0, 2)  # [t*h*w, b, hidden]


class _ConditionEmbed(torch.nn.Module):
    """I2V: patch embedding of a condition (masked video or mask) followed by a bias-free linear."""

    def __init__(self, in_channels: int, hidden: int, patch: int, dtype: torch.dtype):
        super().__init__()
        self.patch = PatchEmbed2D(in_channels, hidden, patch, dtype)
        self.linear = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.patch(x))


class OpenSoraPlanDiT(PipelinedDiT):
    """Open-Sora-Plan v1.3 diffusion transformer (``videoditsparse`` / ``videoditsparsei2v``).

    ``forward(latents [b, C, f, H, W], timestep [b], context [b, L, caption_channels],
    context_mask [b, L] (1 = real token) or None, video_mask [b, f, H, W] (1 = real latent) or None,
    carry=None) -> [b, out_channels, f, H, W]``. For I2V, ``C = 2 * in_channels + vae_scale_factor_t``:
    noisy latents, masked-video latents, mask. Inside, ``[s, b, hidden]`` with ``s = f * H/p * W/p``
    tokens (frame, row, column); the sequence is padded to a multiple of CP x (SP: TP) x
    ``sparse_n**2`` and each CP rank holds a contiguous shard (see layers.py for why that keeps the
    sparse groups intact). A non-trivial ``video_mask`` needs CP 1. Stages, sharding and recompute:
    ``PipelinedDiT``.
    """

    display_name = "the Open-Sora-Plan DiT"
    RECOMPUTE_MODULES = OSP_RECOMPUTE_MODULES
    # --compile-dit-blocks: a layer traces whole (its sparse pattern and lengths are Python ints,
    # one graph per pattern)
    COMPILES_BLOCKS = True
    # what travels between stages besides x and the grid: the raw time embedding (the head's), its
    # adaLN projection, the projected caption and the caption and video-token masks
    MESSAGE = {"time_emb": Hidden(), "time_mod": Hidden((6,)), "context": Hidden(), "text_mask": PerSample(1),
               "token_mask": PerSample(1)}

    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(osp, config, pre_process, post_process, layer_offset, num_layers)
        dtype = config.params_dtype
        h, p = osp.hidden_size, osp.patch_size[1]
        self.patch_embedding = self.masked_video_embedding = self.mask_embedding = None
        self.time_embedder = self.time_projection = self.caption_projection = None
        self.norm_out = self.scale_shift_table = self.proj_out = None
        if pre_process:
            self.patch_embedding = PatchEmbed2D(osp.in_channels, h, p, dtype)
            if osp.is_i2v:
                self.masked_video_embedding = _ConditionEmbed(osp.in_channels, h, p, dtype)
                self.mask_embedding = _ConditionEmbed(osp.vae_scale_factor_t, h, p, dtype)
            self.time_embedder = TwoLayerMLP(TIMESTEP_CHANNELS, h, h, F.silu, dtype)
            self.time_projection = torch.nn.Linear(h, 6 * h, dtype=dtype)
            self.caption_projection = TwoLayerMLP(osp.caption_channels, h, h,
                                                  lambda x: F.gelu(x, approximate="tanh"), dtype)
        self.blocks = torch.nn.ModuleList(OpenSoraPlanLayer(osp, self.layer_config(i), i) for i in self.layer_numbers)
        if post_process:
            self.norm_out = FP32LayerNorm(h, eps=1e-6, elementwise_affine=False)
            self.scale_shift_table = torch.nn.Parameter(torch.randn(2, h, dtype=dtype) / h**0.5)
            self.proj_out = torch.nn.Linear(h, osp.out_dim * math.prod(osp.patch_size), dtype=dtype)
        # used on sequence shards under SP: their gradients are partial sums over TP ranks
        for part in (self.time_embedder, self.time_projection, self.scale_shift_table, self.proj_out):
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)

    @property
    def osp(self) -> OpenSoraPlanDiTConfig:
        return self.arch

    def weight_rule(self, name: str):
        return rule_for(name)

    def token_multiple(self) -> int:
        """Sparse layers fold ``sparse_n**2``-token blocks of each CP shard (layers.py)."""
        n = self.osp.sparse_n if self.osp.sparse1d and self.osp.num_layers > 2 else 1
        return n * n

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              context_mask: torch.Tensor | None = None, video_mask: torch.Tensor | None = None) -> dict:
        """Stage 0: the batch -> this rank's token shard, the conditioning and the masks."""
        osp, cfg = self.osp, self.config
        b, c, frames, height, width = latents.shape
        p = osp.patch_size[1]
        if c != osp.input_channels:
            raise ValueError(f"latents have {c} channels; this DiT takes {osp.input_channels}"
                             + (" (noisy, masked video, mask)" if osp.is_i2v else ""))
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size_thw {list(osp.patch_size)}")
        grid = (frames, height // p, width // p)
        latents = latents.to(self.patch_embedding.proj.weight.dtype)
        x = self.patch_embedding(latents[:, :osp.in_channels])
        if osp.is_i2v:
            x = x + self.masked_video_embedding(latents[:, osp.in_channels:2 * osp.in_channels])
            x = x + self.mask_embedding(latents[:, 2 * osp.in_channels:])
        x = self.shard_sequence(x)
        steps = sinusoidal_embedding(timestep.reshape(b), TIMESTEP_CHANNELS).to(x.dtype)
        time_emb = self.time_embedder(steps)[None]  # [1, b, h]
        time_mod = self.time_projection(F.silu(time_emb)).unflatten(-1, (6, osp.hidden_size))  # [1, b, 6, h]
        context = self.caption_projection(context.to(x.dtype)).transpose(0, 1).contiguous()  # [L, b, h]
        text_mask = None
        if context_mask is not None:
            if context_mask.shape != (b, context.shape[0]):
                raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; "
                                 f"expected ({b}, {context.shape[0]})")
            text_mask = context_mask.to(x.dtype)
        token_mask = None
        if video_mask is not None:
            if video_mask.shape != (b, frames, height, width):
                raise ValueError(f"video_mask has shape {tuple(video_mask.shape)}; "
                                 f"expected {(b, frames, height, width)}")
            pooled = F.max_pool2d(video_mask.to(torch.float32).flatten(0, 1)[:, None], kernel_size=p)
            token_mask = (pooled.reshape(b, -1) != 0).to(x.dtype)  # [b, tokens]: a patch is real if any latent is
            if bool(token_mask.all()):
                token_mask = None
            elif context_parallel_size(cfg.context_parallel_size) > 1:
                raise ValueError("a video_mask with padded latents needs --context-parallel-size 1 "
                                 f"(got {context_parallel_size(cfg.context_parallel_size)})")
        return {"x": x, "time_emb": time_emb, "time_mod": time_mod, "context": context, "text_mask": text_mask,
                "token_mask": token_mask, "grid": grid}

    def layer_inputs(self, state: dict) -> dict:
        f, gh, gw = state["grid"]
        tokens = f * gh * gw
        padded = self.padded_tokens(tokens)
        rope_cos, rope_sin = (self.shard_tokens(t, tp_slice=False)
                              for t in rope_tables(self.osp, f, gh, gw, state["x"].device))
        text_bias = None
        if state["text_mask"] is not None:
            text_bias = ((1 - state["text_mask"]) * MASKED_BIAS)[:, None, None, :]  # [b, 1, 1, L]
        key_bias = None
        if state["token_mask"] is not None:  # CP 1: this rank holds the whole (padded) sequence
            real = (1 - state["token_mask"]) * MASKED_BIAS
            key_bias = torch.cat([real, real.new_full((real.shape[0], padded - tokens), PADDING_BIAS)], dim=1)
        return {"time_mod": state["time_mod"], "context": state["context"], "text_bias": text_bias,
                "rope_cos": rope_cos, "rope_sin": rope_sin, "valid_tokens": self.valid_tokens(tokens),
                "padded_tokens": padded, "key_bias": key_bias}

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        mod = upcast(self.scale_shift_table) + upcast(state["time_emb"]).unsqueeze(2)  # [1, b, 2, h]
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        return self.proj_out((upcast(self.norm_out(x)) * (1 + scale) + shift).type_as(x))
