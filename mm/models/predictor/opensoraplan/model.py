"""The Open-Sora-Plan v1.3 DiT: 2-D patch embedding (I2V: plus masked-video and mask embeddings),
adaLN-single timestep conditioning, caption projection, sparse DiT layers, adaLN head, unpatchify."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig
from mm.models.predictor.opensoraplan.layers import MASKED_BIAS, PADDING_BIAS, OpenSoraPlanLayer, rope_tables
from mm.models.predictor.pipeline import StageMessage, from_rows, to_rows
from mm.models.predictor.wan.layers import FP32LayerNorm, mark_sequence_parallel, sinusoidal_embedding, upcast
from mm.models.predictor.wan.model import _TwoLayerMLP
from mm.parallel.context_parallel import gather_sequence

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


class OpenSoraPlanDiT(MegatronModule):
    """Open-Sora-Plan v1.3 diffusion transformer (``videoditsparse`` / ``videoditsparsei2v``).

    ``forward(latents [b, C, f, H, W], timestep [b], context [b, L, caption_channels],
    context_mask [b, L] (1 = real token) or None, video_mask [b, f, H, W] (1 = real latent) or None)
    -> [b, out_channels, f, H, W]``. For I2V, ``C = 2 * in_channels + vae_scale_factor_t``: noisy
    latents, masked-video latents, mask. Inside, ``[s, b, hidden]`` with ``s = f * H/p * W/p``
    tokens (frame, row, column); the sequence is padded to a multiple of CP x (SP: TP) x
    ``sparse_n**2`` and each CP rank holds a contiguous shard (see layers.py for why that keeps the
    sparse groups intact). A non-trivial ``video_mask`` needs CP 1.
    """

    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(config)
        if osp.num_heads % config.tensor_model_parallel_size:
            raise ValueError(f"predictor.num_heads = {osp.num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {config.tensor_model_parallel_size}")
        self.osp = osp
        dtype = config.params_dtype
        h, p = osp.hidden_size, osp.patch_size[1]
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset  # global index of blocks[0]
        num_layers = osp.num_layers if num_layers is None else num_layers
        self.patch_embedding = self.masked_video_embedding = self.mask_embedding = None
        self.time_embedder = self.time_projection = self.caption_projection = None
        self.norm_out = self.scale_shift_table = self.proj_out = None
        if pre_process:
            self.patch_embedding = PatchEmbed2D(osp.in_channels, h, p, dtype)
            if osp.is_i2v:
                self.masked_video_embedding = _ConditionEmbed(osp.in_channels, h, p, dtype)
                self.mask_embedding = _ConditionEmbed(osp.vae_scale_factor_t, h, p, dtype)
            self.time_embedder = _TwoLayerMLP(TIMESTEP_CHANNELS, h, h, F.silu, dtype)
            self.time_projection = torch.nn.Linear(h, 6 * h, dtype=dtype)
            self.caption_projection = _TwoLayerMLP(osp.caption_channels, h, h,
                                                   lambda x: F.gelu(x, approximate="tanh"), dtype)
        self.blocks = torch.nn.ModuleList(OpenSoraPlanLayer(osp, config, layer_offset + i) for i in range(num_layers))
        if post_process:
            self.norm_out = FP32LayerNorm(h, eps=1e-6, elementwise_affine=False)
            self.scale_shift_table = torch.nn.Parameter(torch.randn(2, h, dtype=dtype) / h**0.5)
            self.proj_out = torch.nn.Linear(h, osp.out_dim * math.prod(osp.patch_size), dtype=dtype)
        # used on sequence shards under SP: their gradients are partial sums over TP ranks
        for part in (self.time_embedder, self.time_projection, self.scale_shift_table, self.proj_out):
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None
        self.carried = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core distributed-checkpoint view of this stage's weights under layout-independent
        global names and shapes (the Wan DiT's scheme, ``wan/sharding.py``, with this model's table)."""
        from mm.models.predictor.opensoraplan.weights import rule_for
        from mm.models.predictor.wan.sharding import wan_sharded_state_dict

        return wan_sharded_state_dict(self, prefix, sharded_offsets, metadata, rule_for=rule_for)

    def set_input_tensor(self, tensor) -> None:
        """megatron-core's pipeline hook: a later stage's input (stage 0's input is the batch)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    # ------------------------------------------------------------------ sequence layout

    def _max_sparse_n(self) -> int:
        return self.osp.sparse_n if self.osp.sparse1d and self.osp.num_layers > 2 else 1

    def _split_multiple(self) -> int:
        """The sequence is padded to a multiple of this: CP x (under SP) TP x sparse_n**2."""
        cfg = self.config
        tp = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        return cfg.context_parallel_size * tp * self._max_sparse_n() ** 2

    def _padded(self, tokens: int) -> int:
        m = self._split_multiple()
        return -(-tokens // m) * m

    def _token_shard(self, t: torch.Tensor, tp_slice: bool) -> torch.Tensor:
        """This rank's part of a whole-sequence ``[s, ...]`` tensor: padded, its CP shard and
        (``tp_slice``) that shard's TP slice."""
        cfg = self.config
        pad = self._padded(t.shape[0]) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)
        if cfg.context_parallel_size > 1:
            t = t.chunk(cfg.context_parallel_size)[mpu.get_context_parallel_rank()]
        if tp_slice and cfg.tensor_model_parallel_size > 1:
            t = t.chunk(cfg.tensor_model_parallel_size)[mpu.get_tensor_model_parallel_rank()]
        return t

    # ------------------------------------------------------------------ stage 0

    def _embed(self, latents, timestep, context, context_mask, video_mask) -> dict:
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
        x = self._token_shard(x, tp_slice=False)
        if cfg.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
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
            elif cfg.context_parallel_size > 1:
                raise ValueError("a video_mask with padded latents needs --context-parallel-size 1 "
                                 f"(got {cfg.context_parallel_size})")
        return {"x": x, "time_emb": time_emb, "time_mod": time_mod, "context": context, "text_mask": text_mask,
                "token_mask": token_mask, "grid": grid}

    _MESSAGE = StageMessage(("x", "time_emb", "time_mod", "context", "text_mask", "token_mask", "carry"),
                            ("f", "gh", "gw", "text_len", "tokens", "carry_c", "carry_f", "carry_h", "carry_w"))

    def _pack(self, state: dict, carry: torch.Tensor | None) -> torch.Tensor:
        h = self.osp.hidden_size
        t = state["time_mod"]
        masks = {k: None if state[k] is None else to_rows(state[k], h) for k in ("text_mask", "token_mask")}
        tensors = dict(x=state["x"], time_emb=state["time_emb"],
                       time_mod=t.permute(0, 2, 1, 3).reshape(-1, t.shape[1], h),  # [n*6, b, h]
                       context=state["context"], carry=None if carry is None else to_rows(carry, h), **masks)
        shape = list(carry.shape[1:]) if carry is not None else []
        if len(shape) > 4:
            raise ValueError(f"carry of shape {tuple(carry.shape)}: at most [b, c, f, h, w]")
        shape = [1] * (4 - len(shape)) + shape if carry is not None else [0] * 4
        f, gh, gw = state["grid"]
        ints = dict(f=f, gh=gh, gw=gw, text_len=state["context"].shape[0], tokens=f * gh * gw)
        ints.update(zip(("carry_c", "carry_f", "carry_h", "carry_w"), shape))
        return self._MESSAGE.pack(tensors, ints, self.config.pipeline_dtype or state["x"].dtype)

    def _unpack(self, packed: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        t, ints = self._MESSAGE.unpack(packed)
        b, h = packed.shape[1], self.osp.hidden_size
        time_mod = t["time_mod"].reshape(-1, 6, b, h).permute(0, 2, 1, 3)
        carry_shape = [ints[k] for k in ("carry_c", "carry_f", "carry_h", "carry_w")]
        state = {"x": t["x"], "time_emb": t["time_emb"], "time_mod": time_mod, "context": t["context"],
                 "text_mask": None if t["text_mask"] is None else from_rows(t["text_mask"], [ints["text_len"]]),
                 "token_mask": None if t["token_mask"] is None else from_rows(t["token_mask"], [ints["tokens"]]),
                 "grid": (ints["f"], ints["gh"], ints["gw"])}
        return state, from_rows(t["carry"], carry_shape) if t["carry"] is not None else None

    # ------------------------------------------------------------------ layers and head

    def _run_blocks(self, x, args: tuple, kwargs: dict):
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training:
            for block in self.blocks:
                x = block(x, *args, **kwargs)
            return x
        n, chunk = len(self.blocks), cfg.recompute_num_layers

        def run(start, end):
            def fn(x_, *args_):
                for block in self.blocks[start:end]:
                    x_ = block(x_, *args_, **kwargs)
                return x_
            return fn

        # megatron's methods: "uniform" checkpoints groups of recompute_num_layers layers,
        # "block" checkpoints the first recompute_num_layers layers one by one
        start = 0
        while start < n:
            end = min(start + chunk, n) if cfg.recompute_method == "uniform" else start + 1
            if cfg.recompute_method == "uniform" or start < chunk:
                x = tensor_parallel.checkpoint(run(start, end), False, x, *args)
            else:
                x = run(start, end)(x, *args)
            start = end
        return x

    def _head(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        mod = upcast(self.scale_shift_table) + upcast(time_emb).unsqueeze(2)  # [1, b, 2, h]
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        return self.proj_out((upcast(self.norm_out(x)) * (1 + scale) + shift).type_as(x))

    def forward(self, latents: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                video_mask: torch.Tensor | None = None, carry: torch.Tensor | None = None) -> torch.Tensor:
        """The first stage takes the batch; a later stage reads the previous one's message (set by
        ``set_input_tensor``). Stages other than the last return their message; ``carry`` rides
        along to the last stage, which finds it in ``self.carried``."""
        osp, cfg = self.osp, self.config
        if self.pre_process:
            state = self._embed(latents, timestep, context, context_mask, video_mask)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a later pipeline stage ran without its input (set_input_tensor)")
            state, carry = self._unpack(self.input_tensor)
        f, gh, gw = state["grid"]
        tokens = f * gh * gw
        padded = self._padded(tokens)
        valid_tokens = tokens if padded != tokens else None
        rope = tuple(self._token_shard(t, tp_slice=False) for t in rope_tables(osp, f, gh, gw, state["x"].device))
        text_bias = None
        if state["text_mask"] is not None:
            text_bias = ((1 - state["text_mask"]) * MASKED_BIAS)[:, None, None, :]  # [b, 1, 1, L]
        key_bias = None
        if state["token_mask"] is not None:  # CP 1: this rank holds the whole (padded) sequence
            real = (1 - state["token_mask"]) * MASKED_BIAS
            key_bias = torch.cat([real, real.new_full((real.shape[0], padded - tokens), PADDING_BIAS)], dim=1)
        x = self._run_blocks(state["x"], (state["time_mod"], state["context"], text_bias, *rope),
                             dict(valid_tokens=valid_tokens, padded_tokens=padded, key_bias=key_bias))
        if not self.post_process:
            return self._pack(dict(state, x=x), carry)
        self.carried = carry
        b = x.shape[1]
        pt, ph, pw = osp.patch_size
        x = self._head(x, state["time_emb"])
        if cfg.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        if cfg.context_parallel_size > 1:
            x = gather_sequence(x, mpu.get_context_parallel_group())
        x = x[:tokens]
        x = x.transpose(0, 1).reshape(b, f, gh, gw, pt, ph, pw, osp.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, osp.out_dim, f * pt, gh * ph, gw * pw)
