"""Model FLOPs of an Open-Sora-Plan v1.3 DiT training step, with the conventions of
``mm.families.wan.flops`` (matrix products only, 3x the forward)."""

from __future__ import annotations


def opensoraplan_forward_flops(config, frames: int, height: int, width: int, text_len: int,
                               batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of one micro-batch through the whole Open-Sora-Plan v1.3 DiT (an
    ``OpenSoraPlanDiTConfig``), by part, with the conventions of ``wan_forward_flops``.

    A sparse layer (``config.layer_sparsity``) attends within ``sparse_n`` groups of ``s / sparse_n``
    tokens, so its attention products cost ``1 / sparse_n`` of a dense layer's. The I2V model also
    embeds the masked video and the mask (a patch embedding and a linear each). The sequence padding
    the model adds for CP/SP/sparse groups is not counted (it is not model work)."""
    from mm.models.predictor.opensoraplan.model import TIMESTEP_CHANNELS

    pt, ph, pw = config.patch_size
    if min(frames, height, width) < 1 or height % ph or width % pw:
        raise ValueError(f"latent size {frames}x{height}x{width}: expected positive sizes divisible by "
                         f"predictor.patch_size_thw {list(config.patch_size)}")
    if text_len < 1 or batch_size < 1:
        raise ValueError(f"text_len = {text_len}, batch_size = {batch_size}: both must be >= 1")
    b, h, n = batch_size, config.hidden_size, config.num_layers
    patch = ph * pw
    s = frames * height * width // patch
    L = text_len

    def mm(rows: int, inner: int, cols: int) -> int:
        return 2 * rows * inner * cols

    condition = 0
    if config.is_i2v:  # masked-video and mask embeddings: patch embedding + bias-free linear each
        condition = (mm(b * s, config.in_channels * patch, h) + mm(b * s, config.vae_scale_factor_t * patch, h)
                     + 2 * mm(b * s, h, h))
    attended = sum(s // config.layer_sparsity(i)[0] for i in range(n))  # keys per query, summed over layers
    return {
        "patch_embedding": mm(b * s, config.in_channels * patch, h) + condition,
        "time_embedding": mm(b, TIMESTEP_CHANNELS, h) + mm(b, h, h) + mm(b, h, 6 * h),
        "text_embedding": mm(b * L, config.caption_channels, h) + mm(b * L, h, h),
        "self_attention_linear": n * (mm(b * s, h, 3 * h) + mm(b * s, h, h)),
        "self_attention_core": 2 * mm(b * s, h, 1) * attended,
        "cross_attention_linear": n * (mm(b * s, h, h) + mm(b * L, h, 2 * h) + mm(b * s, h, h)),
        "cross_attention_core": n * 2 * mm(b * s, h, L),
        "ffn": n * (mm(b * s, h, 4 * h) + mm(b * s, 4 * h, h)),
        "head": mm(b * s, h, config.out_dim * patch),
    }


def opensoraplan_training_flops(config, frames: int, height: int, width: int, text_len: int,
                                batch_size: int = 1) -> int:
    """Model FLOPs of forward + backward of one micro-batch: 3x the forward."""
    return 3 * sum(opensoraplan_forward_flops(config, frames, height, width, text_len, batch_size).values())
