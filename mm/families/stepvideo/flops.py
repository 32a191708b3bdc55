"""Model FLOPs of a Step-Video-T2V DiT training step, with the conventions of
``mm.families.wan.flops``: matrix products only (every linear layer, the patch embedding as a
linear over patches, and the attention products ``q k^T`` and ``softmax(.) v``), each ``2 * m * n *
k``; training is 3x the forward (model FLOPs), ``recompute`` adds what activation recompute runs
again for a hardware count.

Shapes are those the DiT sees: the latent video (e.g. 36 x 34 x 62 for 204 x 544 x 992 frames
through the Step-Video VAE: 75,888 tokens), the Step-LLM tokens the cross-attention keeps (the
DiT cuts the context to the batch's longest prompt: at most 320) and the CLIP tokens (77).
"""

from __future__ import annotations

from mm.families.flops import training_flops
from mm.families.stepvideo.config import StepVideoDiTConfig

TIMESTEP_CHANNELS = 256


def stepvideo_forward_flops(config: StepVideoDiTConfig, frames: int, height: int, width: int, llm_len: int,
                            clip_len: int = 77, batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of one micro-batch through the whole DiT (all layers, all ranks together), by part.

    ``frames``, ``height``, ``width``: latent sizes; ``llm_len``: Step-LLM tokens attended;
    ``clip_len``: CLIP tokens (0 for a DiT without the CLIP projection). Parts named ``*_core`` are
    the attention products, the others linear layers; parts of the layers are totals over all
    ``config.num_layers`` layers. The sequence padding CP/SP add is not counted (not model work)."""
    p = config.patch_size[1]
    if min(frames, height, width) < 1 or height % p or width % p:
        raise ValueError(f"latent size {frames}x{height}x{width}: expected positive sizes divisible by "
                         f"predictor.patch_size {p}")
    if llm_len < 1 or batch_size < 1 or clip_len < 0:
        raise ValueError(f"llm_len = {llm_len}, clip_len = {clip_len}, batch_size = {batch_size}: expected "
                         "llm_len >= 1, clip_len >= 0, batch_size >= 1")
    if (config.clip_channels is None) != (clip_len == 0):
        raise ValueError(f"clip_len = {clip_len}: a DiT with predictor.caption_channels {config.caption_channels!r} "
                         + ("reads no CLIP tokens (give 0)" if config.clip_channels is None else
                            "reads CLIP tokens (77 in the release)"))
    b, h, n = batch_size, config.hidden_size, config.num_layers
    s = frames * (height // p) * (width // p)
    kv = llm_len + clip_len

    def mm(rows: int, inner: int, cols: int) -> int:
        return 2 * rows * inner * cols

    return {
        "patch_embedding": mm(b * s, config.in_channels * p * p, h),
        # two-layer MLP on the sinusoidal embedding, then the projection to the 6 adaLN vectors
        "time_embedding": mm(b, TIMESTEP_CHANNELS, h) + mm(b, h, h) + mm(b, h, 6 * h),
        # Step-LLM: caption projection (two linears); CLIP: one linear
        "text_embedding": (mm(b * llm_len, config.llm_channels, h) + mm(b * llm_len, h, h)
                           + mm(b * clip_len, config.clip_channels or 0, h)),
        # fused q/k/v and the output projection
        "self_attention_linear": n * (mm(b * s, h, 3 * h) + mm(b * s, h, h)),
        # q k^T and p v over all heads: each 2 * s * s * head_dim per head
        "self_attention_core": n * 2 * mm(b * s, h, s),
        # q from the video, fused k/v from the context, output projection
        "cross_attention_linear": n * (mm(b * s, h, h) + mm(b * kv, h, 2 * h) + mm(b * s, h, h)),
        "cross_attention_core": n * 2 * mm(b * s, h, kv),
        "ffn": n * (mm(b * s, h, 4 * h) + mm(b * s, 4 * h, h)),
        "head": mm(b * s, h, config.out_dim * p * p),
    }


def stepvideo_training_flops(config: StepVideoDiTConfig, frames: int, height: int, width: int, llm_len: int,
                             clip_len: int = 77, batch_size: int = 1, recompute: str | None = None,
                             recompute_layers: int | None = None) -> int:
    """FLOPs of forward + backward of one micro-batch: 3x the forward (model FLOPs).

    ``recompute`` (None, "full" or "selective", as --recompute-granularity) adds what activation
    recompute runs again in the backward, for a hardware count: "full" the forward of
    ``recompute_layers`` layers (default all), "selective" the attention products of every layer.
    Leave it None for the logged throughput."""
    parts = stepvideo_forward_flops(config, frames, height, width, llm_len, clip_len, batch_size)
    return training_flops(parts, config.num_layers, recompute, recompute_layers)
