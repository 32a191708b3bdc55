"""Model FLOPs of a Wan DiT training step, for the throughput (TFLOP/s/GPU) in the iteration log.

Only matrix products are counted, each as ``2 * m * n * k``: every linear layer (and the patch
embedding, a convolution whose kernel equals its stride, i.e. a linear over patches) and the two
attention products ``q k^T`` and ``softmax(.) v``. Norms, RoPE, adaLN modulation, activations and
softmax are elementwise and left out, as in Megatron-LM's ``num_floating_point_operations``; for
the Wan2.1-1.3B example of ``docs/flops.md`` they come to under 1% of the total.

Training FLOPs are model FLOPs: three forwards (the backward computes a data gradient and a weight
gradient for every product), whatever the recompute settings, so that throughputs of runs with and
without activation recompute compare directly (Megatron-LM's convention). ``recompute`` adds the
recomputed forward for a hardware count instead. The backward of the very first products (patch,
time, text and image embedders) needs no data gradient, since their inputs are not trained; the
3x convention counts it anyway, about 0.002% at full size (the tests measure it exactly).

Shapes are those the DiT sees: the latent video after the VAE (``frames x height x width``, e.g.
21 x 60 x 104 for an 81 x 480 x 832 clip through Wan's 4 x 8 x 8 VAE), the text length after the
tokenizer (512 for Wan's UMT5), and the CLIP image tokens of the Wan2.1 I2V/FLF2V image branch
(257 per image).
"""

from __future__ import annotations

import math

from mm.families.flops import training_flops
from mm.models.predictor.wan.config import WanDiTConfig



def _check_shape(config: WanDiTConfig, frames: int, height: int, width: int, text_len: int, image_len: int,
                 batch_size: int) -> None:
    pt, ph, pw = config.patch_size
    if min(frames, height, width) < 1 or frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {frames}x{height}x{width}: expected positive sizes divisible by "
                         f"predictor.patch_size {list(config.patch_size)}")
    if text_len < 1 or batch_size < 1:
        raise ValueError(f"text_len = {text_len}, batch_size = {batch_size}: both must be >= 1")
    if config.image_dim is None and image_len:
        raise ValueError(f"image_len = {image_len}, but this DiT has no image branch (predictor.image_dim unset)")
    if config.image_dim is not None and image_len < 1:
        raise ValueError("this DiT has an image branch (predictor.image_dim): give image_len, the CLIP image tokens "
                         "(257 per image in Wan2.1 I2V, 2 x 257 in FLF2V)")


def wan_forward_flops(config: WanDiTConfig, frames: int, height: int, width: int, text_len: int,
                      image_len: int = 0, batch_size: int = 1, per_token_timestep: bool = False) -> dict[str, int]:
    """Forward FLOPs of one micro-batch through the whole DiT (all layers, all ranks together), by part.

    ``frames``, ``height``, ``width``: latent sizes; ``text_len``: text tokens; ``image_len``: CLIP
    image tokens (only with ``config.image_dim``); ``per_token_timestep``: every video token has its
    own timestep (Wan2.2 TI2V-5B), so the time embedding runs per token. Parts named ``*_core`` are
    the attention products, the others linear layers; parts of the layers are totals over all
    ``config.num_layers`` layers.
    """
    _check_shape(config, frames, height, width, text_len, image_len, batch_size)
    b, h, f, n = batch_size, config.hidden_size, config.ffn_dim, config.num_layers
    patch = math.prod(config.patch_size)
    s = frames * height * width // patch  # video tokens
    steps = s if per_token_timestep else 1  # rows through the time embedder per sample
    L, Li = text_len, image_len

    def mm(rows: int, inner: int, cols: int) -> int:
        return 2 * rows * inner * cols

    parts = {
        "patch_embedding": mm(b * s, config.in_dim * patch, h),
        # two-layer MLP on the sinusoidal embedding, then the projection to the 6 adaLN vectors
        "time_embedding": mm(b * steps, config.freq_dim, h) + mm(b * steps, h, h) + mm(b * steps, h, 6 * h),
        "text_embedding": mm(b * L, config.text_dim, h) + mm(b * L, h, h),
        "image_embedding": (mm(b * Li, config.image_dim, config.image_dim) + mm(b * Li, config.image_dim, h)
                            if config.image_dim is not None else 0),
        # fused q/k/v and the output projection
        "self_attention_linear": n * (mm(b * s, h, 3 * h) + mm(b * s, h, h)),
        # q k^T and p v over all heads: each 2 * s * s * head_dim per head
        "self_attention_core": n * 2 * mm(b * s, h, s),
        # q from the video, k/v from the text (and the image), output projection
        "cross_attention_linear": n * (mm(b * s, h, h) + mm(b * L, h, 2 * h) + mm(b * Li, h, 2 * h)
                                       + mm(b * s, h, h)),
        "cross_attention_core": n * 2 * (mm(b * s, h, L) + mm(b * s, h, Li)),
        "ffn": n * (mm(b * s, h, f) + mm(b * s, f, h)),
        "head": mm(b * s, h, config.out_dim * patch),
    }
    return parts


def wan_training_flops(config: WanDiTConfig, frames: int, height: int, width: int, text_len: int,
                       image_len: int = 0, batch_size: int = 1, per_token_timestep: bool = False,
                       recompute: str | None = None, recompute_layers: int | None = None) -> int:
    """FLOPs of forward + backward of one micro-batch: 3x the forward (model FLOPs).

    ``recompute`` (None, "full" or "selective", as --recompute-granularity) adds what activation
    recompute runs again in the backward, for a hardware count: "full" the forward of
    ``recompute_layers`` layers (default all; with --recompute-method block, the layers it names),
    "selective" the attention products of every layer. Leave it None for the logged throughput.
    """
    parts = wan_forward_flops(config, frames, height, width, text_len, image_len, batch_size, per_token_timestep)
    return training_flops(parts, config.num_layers, recompute, recompute_layers)
