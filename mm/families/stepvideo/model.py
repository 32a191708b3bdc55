"""The Step-Video-T2V DiT: per-frame patch embedding, adaLN-single timestep conditioning, Step-LLM
caption and CLIP projections, DiT layers and adaLN head inside the shared pipelined-DiT shell
(``mm/models/predictor/dit.py``: stages, token sharding, recompute, the message between stages,
gather and unpatchify)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from mm.families.stepvideo.config import StepVideoDiTConfig
from mm.families.stepvideo.layers import STEPVIDEO_RECOMPUTE_MODULES, StepVideoLayer, modulate, rope_tables
from mm.families.stepvideo.weights import rule_for
from mm.models.predictor.common import FP32LayerNorm, TwoLayerMLP, mark_sequence_parallel, sinusoidal_embedding, upcast
from mm.models.predictor.dit import PipelinedDiT
from mm.models.predictor.pipeline import Hidden, PerSample
from mm.parallel.state import get_parallel_sizes

TIMESTEP_CHANNELS = 256  # the sinusoidal width of adaLN-single's timestep embedding
TIMESTEP_SCALE = 1000.0  # the DiT's timestep input t in [0, 1) is embedded as t * 1000


def _heads_problem(num_heads: int, tp: int) -> str | None:
    """Why ``num_heads`` cannot be split over this run's TP ranks x Ulysses degree (None: it can)."""
    try:
        u = get_parallel_sizes().ulysses_degree
    except RuntimeError:  # no parallel state: a model built outside a run
        return None
    if num_heads % (tp * u):
        return (f"predictor.num_heads = {num_heads} is not divisible by --tensor-model-parallel-size ({tp}) x "
                f"the Ulysses degree of context parallelism ({u}) = {tp * u}: every rank attends with whole heads")
    return None


class PatchEmbed(torch.nn.Module):
    """Each frame's ``p x p`` patches -> hidden (a Conv2d per frame): ``[b, c, f, H, W] ->
    [f * H/p * W/p, b, hidden]`` in (frame, row, column) order."""

    def __init__(self, in_channels: int, hidden: int, patch: int, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[0], x.shape[2]
        y = self.proj(x.transpose(1, 2).flatten(0, 1))  # [b*f, hidden, h, w]
        return y.unflatten(0, (b, f)).permute(1, 3, 4, 0, 2).flatten(0, 2)  # [f*h*w, b, hidden]


class AdaLayerNormSingle(torch.nn.Module):
    """adaLN-single: ``emb.timestep_embedder`` (Linear, SiLU, Linear on the 256-wide sinusoid of
    ``t * 1000``) gives the embedded timestep; ``linear(SiLU(.))`` its ``6 * hidden`` projection."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.emb = torch.nn.ModuleDict({"timestep_embedder": TwoLayerMLP(TIMESTEP_CHANNELS, hidden, hidden, F.silu,
                                                                         dtype)})
        self.linear = torch.nn.Linear(hidden, 6 * hidden, dtype=dtype)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [b] (t in [0, 1)) -> (projection [b, 6 * hidden], embedded timestep [b, hidden])."""
        steps = sinusoidal_embedding(timestep * TIMESTEP_SCALE, TIMESTEP_CHANNELS).to(dtype)
        embedded = self.emb["timestep_embedder"](steps)
        return self.linear(F.silu(embedded)), embedded


class StepVideoDiT(PipelinedDiT):
    """Step-Video-T2V diffusion transformer (``stepvideodit``).

    ``forward(latents [b, in_channels, f, H, W], timestep [b], llm_context [b, L, llm_channels],
    llm_mask [b, L] or None, clip_context [b, Lc, clip_channels] (with ``caption_channels`` of two
    widths; else None), carry=None) -> [b, out_channels, f, H, W]``.

    ``timestep`` is the sampler's ``t`` in [0, 1) (t = 0 noise, t -> 1 data); the DiT embeds
    ``t * 1000``, the product in ``t``'s dtype (the reference pipeline passes ``t`` in the DiT's
    dtype, bf16, so its product is rounded to bf16; pass ``t`` in that dtype to reproduce it).
    ``llm_mask``: 1 for the prompt's tokens, a prefix of each row (the Step-LLM tokenizer pads at
    the end); None means every token is real. The cross-attention context is ``[CLIP tokens ;
    Step-LLM tokens]``, the CLIP tokens always attended; as the reference, the context is cut to the
    longest prompt of the batch and the rest of the padding is masked.

    Inside, ``[s, b, hidden]`` with ``s = f * H/p * W/p`` tokens (frame, row, column); under SP each
    TP rank holds ``s / tp`` of them between the layers, under CP each CP rank a contiguous shard.
    Stages, sharding and recompute: ``PipelinedDiT``.
    """

    display_name = "the Step-Video DiT"
    RECOMPUTE_MODULES = STEPVIDEO_RECOMPUTE_MODULES
    # its layers trace without graph breaks (tests/gpu/test_stepvideo_gpu.py); --compile-dit-blocks
    COMPILES_BLOCKS = True
    # what travels between stages besides x and the grid: the embedded timestep (the head's), its
    # adaLN projection, the projected text context and its key mask
    MESSAGE = {"time_emb": Hidden(), "time_mod": Hidden((6,)), "context": Hidden(), "context_mask": PerSample(1)}

    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(arch, config, pre_process, post_process, layer_offset, num_layers)
        problem = _heads_problem(arch.num_heads, config.tensor_model_parallel_size)
        if problem:
            raise ValueError(problem)
        dtype, h = config.params_dtype, arch.hidden_size
        self.pos_embed = self.adaln_single = self.caption_norm = self.caption_projection = None
        self.clip_projection = self.norm_out = self.scale_shift_table = self.proj_out = None
        if pre_process:
            self.pos_embed = PatchEmbed(arch.in_channels, h, arch.patch_size[1], dtype)
            self.adaln_single = AdaLayerNormSingle(h, dtype)
            self.caption_norm = FP32LayerNorm(arch.llm_channels, eps=arch.norm_eps, elementwise_affine=False)
            self.caption_projection = TwoLayerMLP(arch.llm_channels, h, h, lambda x: F.gelu(x, approximate="tanh"),
                                                  dtype)
            if arch.clip_channels is not None:
                self.clip_projection = torch.nn.Linear(arch.clip_channels, h, dtype=dtype)
        self.blocks = torch.nn.ModuleList(StepVideoLayer(arch, self.layer_config(i), i) for i in self.layer_numbers)
        if post_process:
            self.norm_out = FP32LayerNorm(h, eps=arch.norm_eps, elementwise_affine=False)
            self.scale_shift_table = torch.nn.Parameter(torch.randn(2, h, dtype=dtype) / h**0.5)
            p = arch.patch_size[1]
            self.proj_out = torch.nn.Linear(h, p * p * arch.out_dim, dtype=dtype)
        # used on sequence shards under SP: their gradients are partial sums over TP ranks
        for part in (self.adaln_single, self.scale_shift_table, self.proj_out):
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)

    def weight_rule(self, name: str):
        return rule_for(name)

    # ------------------------------------------------------------------ stage 0

    def _context(self, llm_context: torch.Tensor, llm_mask: torch.Tensor | None, clip_context: torch.Tensor | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-attention context ``[L, b, h]`` (CLIP then Step-LLM tokens) and its key mask
        ``[b, L]`` (None when every key is real)."""
        arch = self.arch
        if llm_context.dim() != 3 or llm_context.shape[2] != arch.llm_channels:
            raise ValueError(f"llm_context has shape {tuple(llm_context.shape)}; expected [b, L, "
                             f"{arch.llm_channels}] (predictor.caption_channels)")
        b, length = llm_context.shape[0], llm_context.shape[1]
        if (clip_context is None) != (arch.clip_channels is None):
            raise ValueError("clip_context is required with predictor.caption_channels [Step-LLM, CLIP] widths and "
                             "must be None with one width" if clip_context is None else
                             "clip_context given, but predictor.caption_channels names no CLIP width")
        if clip_context is not None and (clip_context.dim() != 3 or clip_context.shape[0] != b
                                         or clip_context.shape[2] != arch.clip_channels):
            raise ValueError(f"clip_context has shape {tuple(clip_context.shape)}; expected [{b}, Lc, "
                             f"{arch.clip_channels}]")
        mask = None
        if llm_mask is not None:
            if llm_mask.shape != (b, length):
                raise ValueError(f"llm_mask has shape {tuple(llm_mask.shape)}; expected ({b}, {length})")
            real = llm_mask != 0
            lengths = real.sum(dim=1)
            prefix = torch.arange(length, device=real.device)[None, :] < lengths[:, None]
            stats = torch.cat([lengths, (real != prefix).any(dim=1).long()]).tolist()
            lengths, not_prefix = stats[:b], stats[b:]
            if any(not_prefix):
                raise ValueError(f"llm_mask rows {[i for i, bad in enumerate(not_prefix) if bad]} are not a run of "
                                 "ones followed by zeros (the Step-LLM tokenizer pads at the end)")
            if clip_context is None and min(lengths) == 0:
                raise ValueError("llm_mask has an all-zero row and there is no CLIP context: nothing to attend to")
            keep = max(lengths)
            llm_context = llm_context[:, :keep]
            if min(lengths) < keep:
                mask = real[:, :keep]
        context = self.caption_projection(self.caption_norm(llm_context.to(dtype)))  # [b, L', h]
        if clip_context is not None:
            clip = self.clip_projection(clip_context.to(dtype))
            context = torch.cat([clip, context], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, clip.shape[1]), mask], dim=1)
        return context.transpose(0, 1).contiguous(), mask

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, llm_context: torch.Tensor,
              llm_mask: torch.Tensor | None = None, clip_context: torch.Tensor | None = None) -> dict:
        """Stage 0: the batch -> this rank's token shard and the conditioning every layer uses."""
        arch = self.arch
        if latents.dim() != 5 or latents.shape[1] != arch.in_channels:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [b, {arch.in_channels}, f, H, W] "
                             "(predictor.in_channels)")
        b, _, frames, height, width = latents.shape
        p = arch.patch_size[1]
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by predictor.patch_size {p}")
        if timestep.numel() not in (1, b):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected [{b}] (t in [0, 1) per sample)")
        dtype = self.pos_embed.proj.weight.dtype
        x = self.shard_sequence(self.pos_embed(latents.to(dtype)))  # [s', b, h]
        time_mod, time_emb = self.adaln_single(timestep.reshape(-1).expand(b), x.dtype)
        context, mask = self._context(llm_context, llm_mask, clip_context, x.dtype)
        return {"x": x, "time_emb": time_emb[None], "time_mod": time_mod.unflatten(-1, (6, arch.hidden_size))[None],
                "context": context, "context_mask": None if mask is None else mask.to(x.dtype),
                "grid": (frames, height // p, width // p)}

    # ------------------------------------------------------------------ every stage

    def layer_inputs(self, state: dict) -> dict:
        f, gh, gw = state["grid"]
        x = state["x"]
        # RoPE of this CP shard's global positions (attention sees the whole shard on each TP rank)
        rope = tuple(self.shard_tokens(t, tp_slice=False) for t in rope_tables(self.arch, f, gh, gw, x.dtype, x.device))
        mask = state["context_mask"]
        key_mask = None if mask is None else (mask > 0.5)[:, None, None, :]
        return {"time_mod": state["time_mod"], "context": state["context"], "context_mask": key_mask,
                "rope": rope, "valid_tokens": self.valid_tokens(f * gh * gw)}

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """adaLN on the embedded timestep before its SiLU: ``norm_out(x) * (1 + scale) + shift``
        with ``(shift, scale) = scale_shift_table + time_emb``, then ``proj_out``."""
        mod = upcast(self.scale_shift_table) + upcast(state["time_emb"]).unsqueeze(2)  # [1, b, 2, h]
        shift, scale = mod.unbind(2)
        return self.proj_out(modulate(self.norm_out, x, shift, scale))
