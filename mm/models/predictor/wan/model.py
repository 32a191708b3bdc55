"""The Wan DiT: patch embedding, time/text/image conditioning, DiT layers, adaLN head, unpatchify."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from mm.models.predictor.pipeline import StageMessage, from_rows, to_rows
from mm.models.predictor.wan.config import WanDiTConfig
from mm.parallel.context_parallel import gather_sequence
from mm.models.predictor.wan.layers import (
    FP32LayerNorm,
    WanLayer,
    mark_sequence_parallel,
    modulate,
    rope_dtype,
    rope_tables,
    sinusoidal_embedding,
    upcast,
)


class _TwoLayerMLP(torch.nn.Module):
    def __init__(self, in_size: int, hidden: int, out_size: int, activation, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_size, hidden, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden, out_size, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


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


class WanDiT(MegatronModule):
    """Wan2.1 / Wan2.2 diffusion transformer.

    ``forward(latents [b, c, f, h, w], timestep [b] or [b, s], context [b, L, text_dim],
    context_image [b, Li, image_dim] or None) -> [b, out_dim, f, h, w]``; for FLF2V ``context_image``
    holds the first frame's CLIP tokens followed by the last frame's. A ``[b, s]`` timestep gives every
    video token its own noise level (Wan2.2 TI2V-5B keeps the conditioning frame's tokens at 0). Inside, activations are
    ``[s, b, hidden]`` with ``s = f/pt * h/ph * w/pw`` tokens in (frame, row, column) order; under
    sequence parallelism each TP rank holds ``s / tp`` of them between the layers.
    """

    def __init__(self, wan: WanDiTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(config)
        if wan.num_heads % config.tensor_model_parallel_size:
            raise ValueError(f"predictor.num_heads = {wan.num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {config.tensor_model_parallel_size}")
        self.wan = wan
        dtype = config.params_dtype
        h = wan.hidden_size
        # a pipeline stage: the first holds the embeddings, the last the head, each a slice of the layers
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset  # global index of blocks[0]
        num_layers = wan.num_layers if num_layers is None else num_layers
        self.patch_embedding = self.time_embedder = self.time_projection = None
        self.text_embedder = self.image_embedder = self.head = None
        if pre_process:
            self.patch_embedding = torch.nn.Conv3d(wan.in_dim, h, kernel_size=wan.patch_size, stride=wan.patch_size,
                                                   dtype=dtype)
            self.time_embedder = _TwoLayerMLP(wan.freq_dim, h, h, F.silu, dtype)
            self.time_projection = torch.nn.Linear(h, 6 * h, dtype=dtype)
            self.text_embedder = _TwoLayerMLP(wan.text_dim, h, h, lambda x: F.gelu(x, approximate="tanh"), dtype)
            self.image_embedder = WanImageEmbedder(wan, dtype) if wan.image_dim is not None else None
        self.blocks = torch.nn.ModuleList(WanLayer(wan, config, layer_offset + i) for i in range(num_layers))
        if post_process:
            self.head = WanHead(wan, dtype)
        # used on sequence shards under SP: their gradients are partial sums over TP ranks
        for part in (self.time_embedder, self.time_projection, self.head):
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)
        # what megatron-core's schedules and finalize_model_grads ask of a model
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None  # a later stage's input: the previous stage's StageMessage
        self.carried = None  # on the last stage: the tensor stage 0 passed along (``carry``)

    def compile_blocks(self, **options) -> None:
        """Regional compilation (``--compile-dit-blocks``): ``torch.compile`` each DiT layer in place,
        so that its elementwise work (adaLN, norms, RoPE, GELU, gated residuals) fuses into few
        kernels. The layers share one compiled graph (same code, parameters as inputs); parameter
        names and the state dict are unchanged. Embeddings, head and the recompute wrappers stay eager."""
        for block in self.blocks:
            block.compile(**options)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core distributed-checkpoint view of this stage's weights, in layout-independent
        (TP/PP/VPP-free) global names and shapes; see ``sharding.py``."""
        from mm.models.predictor.wan.sharding import wan_sharded_state_dict

        return wan_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def set_input_tensor(self, tensor) -> None:
        """megatron-core's pipeline hook: a later stage's input (stage 0's input is the batch)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def _run_blocks(self, x, time_mod, context, context_img, rope, valid_tokens):
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training:
            for block in self.blocks:
                x = block(x, time_mod, context, context_img, rope, valid_tokens)
            return x
        n, chunk = len(self.blocks), cfg.recompute_num_layers

        def run(start, end):
            def fn(x_, time_mod_, context_, context_img_, cos_, sin_):
                for block in self.blocks[start:end]:
                    x_ = block(x_, time_mod_, context_, context_img_, (cos_, sin_), valid_tokens)
                return x_
            return fn

        # megatron's methods: "uniform" checkpoints groups of recompute_num_layers layers,
        # "block" checkpoints the first recompute_num_layers layers one by one
        start = 0
        while start < n:
            if cfg.recompute_method == "uniform":
                end = min(start + chunk, n)
                x = tensor_parallel.checkpoint(run(start, end), False, x, time_mod, context, context_img, *rope)
            else:
                end = start + 1
                if start < chunk:
                    x = tensor_parallel.checkpoint(run(start, end), False, x, time_mod, context, context_img, *rope)
                else:
                    x = run(start, end)(x, time_mod, context, context_img, *rope)
            start = end
        return x

    def _time_embedding(self, timestep: torch.Tensor, batch: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """[b] -> [1, b, h]; per-token [b, s] -> [s, b, h], this rank's shard of it under SP."""
        per_token = timestep.dim() == 2
        if per_token and timestep.shape != (batch, tokens):
            raise ValueError(f"per-token timestep has shape {tuple(timestep.shape)}; expected ({batch}, {tokens})")
        steps = timestep.reshape(batch, -1)
        emb = self.time_embedder(sinusoidal_embedding(steps.flatten(), self.wan.freq_dim).to(dtype))
        emb = emb.view(batch, steps.shape[1], -1).transpose(0, 1)
        if per_token:
            emb = self._token_shard(emb, tp_slice=self.config.sequence_parallel)
        return emb

    def _split_multiple(self) -> int:
        """The sequence is padded to a multiple of this: CP ranks x (under SP) TP ranks."""
        cfg = self.config
        return cfg.context_parallel_size * (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)

    def _token_shard(self, t: torch.Tensor, tp_slice: bool) -> torch.Tensor:
        """This rank's tokens of a whole-sequence ``[s, ...]`` tensor: the sequence padded to
        ``_split_multiple()``, this rank's CP shard of it, and (``tp_slice``) its TP slice of that.

        Plain slicing: each rank's gradient covers its own tokens; parameters behind the tensor get
        partial gradients, summed by DDP over CP and (for ``sequence_parallel`` ones) over TP."""
        cfg = self.config
        multiple = self._split_multiple()
        if t.shape[0] % multiple:
            t = torch.cat([t, t.new_zeros(multiple - t.shape[0] % multiple, *t.shape[1:])], dim=0)
        if cfg.context_parallel_size > 1:
            t = t.chunk(cfg.context_parallel_size)[mpu.get_context_parallel_rank()]
        if tp_slice and cfg.tensor_model_parallel_size > 1:
            t = t.chunk(cfg.tensor_model_parallel_size)[mpu.get_tensor_model_parallel_rank()]
        return t

    def _embed(self, latents, timestep, context, context_image) -> dict:
        """Stage 0: the batch -> this rank's token shard and the conditioning every layer uses."""
        wan, cfg = self.wan, self.config
        b, _, frames, height, width = latents.shape
        pt, ph, pw = wan.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {frames}x{height}x{width} is not divisible by patch_size {wan.patch_size}")
        f, gh, gw = frames // pt, height // ph, width // pw
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).permute(2, 0, 1).contiguous()  # [s, b, h]
        # CP / SP: this rank's part of the sequence, padded to a multiple of CP (x TP under SP);
        # padded keys take no part in attention and padded outputs are dropped at the end
        x = self._token_shard(x, tp_slice=False)
        if cfg.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        time_emb = self._time_embedding(timestep, b, f * gh * gw, x.dtype)  # [1|s, b, h]
        time_mod = self.time_projection(F.silu(time_emb)).unflatten(-1, (6, wan.hidden_size))  # [1|s, b, 6, h]
        context = self.text_embedder(context.to(x.dtype)).transpose(0, 1).contiguous()  # [L, b, h]
        context_img = None
        if self.image_embedder is not None:
            if context_image is None:
                raise ValueError("this Wan DiT has an image branch (predictor.image_dim): pass context_image")
            context_img = self.image_embedder(context_image.to(x.dtype)).transpose(0, 1).contiguous()
        return {"x": x, "time_emb": time_emb, "time_mod": time_mod, "context": context, "context_img": context_img,
                "grid": (f, gh, gw)}

    # what one stage hands the next (see mm/models/predictor/pipeline.py)
    _MESSAGE = StageMessage(("x", "time_emb", "time_mod", "context", "context_img", "carry"),
                            ("f", "gh", "gw", "carry_c", "carry_f", "carry_h", "carry_w"))

    def _pack(self, state: dict, carry: torch.Tensor | None) -> torch.Tensor:
        h = self.wan.hidden_size
        t = state["time_mod"]
        tensors = {"x": state["x"], "time_emb": state["time_emb"],
                   "time_mod": t.permute(0, 2, 1, 3).reshape(-1, t.shape[1], h),  # [n*6, b, h]
                   "context": state["context"], "context_img": state["context_img"],
                   "carry": None if carry is None else to_rows(carry, h)}
        shape = list(carry.shape[1:]) if carry is not None else []
        if len(shape) > 4:
            raise ValueError(f"carry of shape {tuple(carry.shape)}: at most [b, c, f, h, w]")
        shape = [1] * (4 - len(shape)) + shape if carry is not None else [0] * 4
        ints = dict(zip(("f", "gh", "gw"), state["grid"]))
        ints.update(zip(("carry_c", "carry_f", "carry_h", "carry_w"), shape))
        return self._MESSAGE.pack(tensors, ints, self.config.pipeline_dtype or state["x"].dtype)

    def _unpack(self, packed: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        t, ints = self._MESSAGE.unpack(packed)
        b, h = packed.shape[1], self.wan.hidden_size
        time_mod = t["time_mod"].reshape(-1, 6, b, h).permute(0, 2, 1, 3)  # [n, b, 6, h]
        carry_shape = [ints[k] for k in ("carry_c", "carry_f", "carry_h", "carry_w")]
        carry = from_rows(t["carry"], carry_shape) if t["carry"] is not None else None
        state = {"x": t["x"], "time_emb": t["time_emb"], "time_mod": time_mod, "context": t["context"],
                 "context_img": t["context_img"], "grid": (ints["f"], ints["gh"], ints["gw"])}
        return state, carry

    def forward(self, latents: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_image: torch.Tensor | None = None,
                carry: torch.Tensor | None = None) -> torch.Tensor:
        """The first stage takes the batch; a later stage reads the previous one's message (set by
        ``set_input_tensor``) and ignores the arguments. Stages other than the last return their
        message; ``carry`` (a ``[b, ...]`` tensor, e.g. the training target) rides along to the last
        stage, which finds it in ``self.carried``."""
        wan, cfg = self.wan, self.config
        if self.pre_process:
            state = self._embed(latents, timestep, context, context_image)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a later pipeline stage ran without its input (set_input_tensor)")
            state, carry = self._unpack(self.input_tensor)
        f, gh, gw = state["grid"]
        tokens = f * gh * gw
        valid_tokens = tokens if tokens % self._split_multiple() else None
        # RoPE of this CP shard's global positions (attention sees the whole shard on each TP rank)
        rope = tuple(self._token_shard(t.to(rope_dtype(state["x"])), tp_slice=False)
                     for t in rope_tables(wan, f, gh, gw, state["x"].device))
        x = self._run_blocks(state["x"], state["time_mod"], state["context"], state["context_img"], rope,
                             valid_tokens)
        if not self.post_process:
            return self._pack(dict(state, x=x), carry)
        self.carried = carry
        b = x.shape[1]
        pt, ph, pw = wan.patch_size
        x = self.head(x, state["time_emb"])  # [s(/cp)(/tp), b, out * pt * ph * pw]
        if cfg.sequence_parallel:
            # the unpatchified output is used whole on every TP rank: backward keeps this rank's slice
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        if cfg.context_parallel_size > 1:
            x = gather_sequence(x, mpu.get_context_parallel_group())
        x = x[:tokens]
        x = x.transpose(0, 1).reshape(b, f, gh, gw, pt, ph, pw, wan.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, wan.out_dim, f * pt, gh * ph, gw * pw)
