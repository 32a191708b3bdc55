"""The Wan DiT: patch embedding, time/text/image conditioning, DiT layers and adaLN head inside the
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
from mm.models.predictor.pipeline import Hidden
from mm.models.predictor.wan.config import WanDiTConfig
from mm.models.predictor.wan.layers import WAN_RECOMPUTE_MODULES, WanLayer, modulate, rope_dtype, rope_tables
from mm.models.predictor.wan.weights import rule_for


class WanImageEmbedder(torch.nn.Module):
    """CLIP image tokens -> hidden: LayerNorm, Linear, GELU, Linear, LayerNorm (+ FLF2V position embedding)."""

    def __init__(self, wan: WanDiTConfig, dtype: torch.dtype):
        super().__init__()
        d = wan.image_dim
        self.norm1 = FP32LayerNorm(d, eps=1e-5, dtype=dtype)
        self.linear_1 = torch.nn.Linear(d, d, dtype=dtype)
        self.linear_2 = torch.nn.Linear(d, wan.hidden_size, dtype=dtype)
        self.norm2 = FP32LayerNorm(wan.hidden_size, eps=1e-5, dtype=dtype)
        self.pos_embed = (torch.nn.Parameter(torch.zeros(1, wan.pos_embed_seq_len, d, dtype=dtype))
                          if wan.pos_embed_seq_len is not None else None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: first- and last-frame CLIP tokens, concatenated
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"FLF2V image context has {image.shape[1]} tokens; predictor.pos_embed_seq_len "
                                 f"= {self.pos_embed.shape[1]} (first-frame then last-frame tokens)")
            image = image + self.pos_embed
        return self.norm2(self.linear_2(F.gelu(self.linear_1(self.norm1(image)))))


class WanHead(torch.nn.Module):
    """adaLN (its own ``[1, 2, h]`` shift/scale table on the raw time embedding) + linear to patches."""

    def __init__(self, wan: WanDiTConfig, dtype: torch.dtype):
        super().__init__()
        h = wan.hidden_size
        self.norm = FP32LayerNorm(h, eps=wan.eps, elementwise_affine=False)
        self.proj = torch.nn.Linear(h, wan.out_dim * math.prod(wan.patch_size), dtype=dtype)
        self.modulation = torch.nn.Parameter(torch.randn(1, 2, h, dtype=dtype) / h**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x: [s, b, h]; time_emb: [1, b, h] or, with per-token timesteps, [s, b, h]."""
        mod = upcast(self.modulation) + upcast(time_emb).unsqueeze(2)  # [1|s, b, 2, h]
        shift, scale = mod.unbind(2)
        return self.proj(modulate(self.norm, x, shift, scale))


class WanDiT(PipelinedDiT):
    """Wan2.1 / Wan2.2 diffusion transformer.

    ``forward(latents [b, c, f, h, w], timestep [b] or [b, s], context [b, L, text_dim],
    context_image [b, Li, image_dim] or None, carry=None) -> [b, out_dim, f, h, w]``; for FLF2V
    ``context_image`` holds the first frame's CLIP tokens followed by the last frame's. A ``[b, s]``
    timestep gives every video token its own noise level (Wan2.2 TI2V-5B keeps the conditioning
    frame's tokens at 0). Inside, activations are ``[s, b, hidden]`` with ``s = f/pt * h/ph * w/pw``
    tokens in (frame, row, column) order; under sequence parallelism each TP rank holds ``s / tp`` of
    them between the layers. Stages, sharding and recompute: ``PipelinedDiT``.
    """

    COMPILES_BLOCKS = True
    display_name = "the Wan DiT"
    RECOMPUTE_MODULES = WAN_RECOMPUTE_MODULES
    # what travels between stages besides x and the grid: the raw time embedding (the head's),
    # its adaLN projection and the embedded text (and image) context
    MESSAGE = {"time_emb": Hidden(), "time_mod": Hidden((6,)), "context": Hidden(), "context_img": Hidden()}

    def __init__(self, wan: WanDiTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(wan, config, pre_process, post_process, layer_offset, num_layers)
        dtype = config.params_dtype
        h = wan.hidden_size
        self.patch_embedding = self.time_embedder = self.time_projection = None
        self.text_embedder = self.image_embedder = self.head = None
        if pre_process:
            self.patch_embedding = torch.nn.Conv3d(wan.in_dim, h, kernel_size=wan.patch_size, stride=wan.patch_size,
                                                   dtype=dtype)
            self.time_embedder = TwoLayerMLP(wan.freq_dim, h, h, F.silu, dtype)
            self.time_projection = torch.nn.Linear(h, 6 * h, dtype=dtype)
            self.text_embedder = TwoLayerMLP(wan.text_dim, h, h, lambda x: F.gelu(x, approximate="tanh"), dtype)
            self.image_embedder = WanImageEmbedder(wan, dtype) if wan.image_dim is not None else None
        self.blocks = torch.nn.ModuleList(WanLayer(wan, self.layer_config(i), i) for i in self.layer_numbers)
        if post_process:
            self.head = WanHead(wan, dtype)
        # used on sequence shards under SP: their gradients are partial sums over TP ranks
        for part in (self.time_embedder, self.time_projection, self.head):
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)

    @property
    def wan(self) -> WanDiTConfig:
        return self.arch

    def weight_rule(self, name: str):
        return rule_for(name)

    def _time_embedding(self, timestep: torch.Tensor, batch: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """[b] -> [1, b, h]; per-token [b, s] -> [s, b, h], this rank's shard of it under SP."""
        per_token = timestep.dim() == 2
        if per_token and timestep.shape != (batch, tokens):
            raise ValueError(f"per-token timestep has shape {tuple(timestep.shape)}; expected ({batch}, {tokens})")
        steps = timestep.reshape(batch, -1)
        emb = self.time_embedder(sinusoidal_embedding(steps.flatten(), self.wan.freq_dim).to(dtype))
        emb = emb.view(batch, steps.shape[1], -1).transpose(0, 1)
        if per_token:
            emb = self.shard_tokens(emb, tp_slice=self.config.sequence_parallel)
        return emb

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              context_image: torch.Tensor | None = None) -> dict:
        """Stage 0: the batch -> this rank's token shard and the conditioning every layer uses."""
        wan = self.wan
        b, _, frames, height, width = latents.shape
        pt, ph, pw = wan.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {frames}x{height}x{width} is not divisible by patch_size {wan.patch_size}")
        f, gh, gw = frames // pt, height // ph, width // pw
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        x = self.shard_sequence(x.flatten(2).permute(2, 0, 1).contiguous())  # [s', b, h]
        time_emb = self._time_embedding(timestep, b, f * gh * gw, x.dtype)  # [1|s, b, h]
        time_mod = self.time_projection(F.silu(time_emb)).unflatten(-1, (6, wan.hidden_size))  # [1|s, b, 6, h]
        if wan.text_len is not None and context.shape[1] != wan.text_len:
            if context.shape[1] > wan.text_len:
                raise ValueError(f"text context of {context.shape[1]} tokens; predictor.text_len = {wan.text_len} is the "
                                 "most the DiT reads (lower the tokenizer's model_max_length)")
            context = F.pad(context, (0, 0, 0, wan.text_len - context.shape[1]))
        context = self.text_embedder(context.to(x.dtype)).transpose(0, 1).contiguous()  # [L, b, h]
        context_img = None
        if self.image_embedder is not None:
            if context_image is None:
                raise ValueError("this Wan DiT has an image branch (predictor.image_dim): pass context_image")
            context_img = self.image_embedder(context_image.to(x.dtype)).transpose(0, 1).contiguous()
        return {"x": x, "time_emb": time_emb, "time_mod": time_mod, "context": context, "context_img": context_img,
                "grid": (f, gh, gw)}

    def layer_inputs(self, state: dict) -> dict:
        f, gh, gw = state["grid"]
        # RoPE of this CP shard's global positions (attention sees the whole shard on each TP rank)
        rope = tuple(self.shard_tokens(t.to(rope_dtype(state["x"])), tp_slice=False)
                     for t in rope_tables(self.wan, f, gh, gw, state["x"].device))
        return {"time_mod": state["time_mod"], "context": state["context"], "context_img": state["context_img"],
                "rope": rope, "valid_tokens": self.valid_tokens(f * gh * gw)}

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.head(x, state["time_emb"])  # [s', b, out * pt * ph * pw]
