"""What the Step-Video DiT tests share with the script that made their golden fixtures
(``tests/fixtures/stepvideo/make_dit_fixtures.py``): the tiny reference configurations, the
deterministic weights (numpy's legacy ``RandomState``, whose streams never change, so the weights
are regenerated instead of stored), the inputs, and the random sketches that stand for large
weight gradients in the fixture."""

from __future__ import annotations

import zlib

import numpy as np
import torch

FIXTURES = "tests/fixtures/stepvideo"
WEIGHT_SEED = 20250317
SKETCH_COLUMNS = 8  # random projections kept of a weight gradient larger than FULL_GRADIENT
FULL_GRADIENT = 4096  # gradients of at most this many elements are stored whole

# the reference StepVideoModel's keyword arguments of each golden case: 2 heads of 128 channels (the
# reference's RoPE split [64, 32, 32] fixes the head size), both text encoders (CLIP first) with a
# padded Step-LLM prompt; and a 2 x 2 patch with the Step-LLM context only
REFERENCE_CASES = {
    "t2v": dict(num_attention_heads=2, attention_head_dim=128, in_channels=8, out_channels=8, num_layers=2,
                patch_size=1, caption_channels=[16, 12], norm_eps=1e-6, norm_elementwise_affine=False,
                attention_type="torch"),
    "patch2_llm_only": dict(num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=6,
                            num_layers=1, patch_size=2, caption_channels=16, norm_eps=1e-6,
                            norm_elementwise_affine=False, attention_type="torch"),
}
# (batch, frames, height, width, Step-LLM tokens, CLIP tokens, real Step-LLM tokens per sample)
CASE_SHAPES = {"t2v": (2, 3, 4, 2, 6, 5, [5, 3]), "patch2_llm_only": (2, 2, 4, 6, 5, 0, [5, 2])}
TIMESTEPS = [0.037, 0.912]


def predictor_params(reference: dict) -> dict:
    """mm's predictor keys (MindSpeed-MM's names) for a reference configuration."""
    return dict(num_layers=reference["num_layers"], num_heads=reference["num_attention_heads"],
                head_dim=reference["attention_head_dim"], in_channels=reference["in_channels"],
                out_channels=reference["out_channels"], patch_size=reference["patch_size"],
                caption_channels=reference["caption_channels"], norm_eps=reference["norm_eps"],
                norm_elementwise_affine=reference["norm_elementwise_affine"])


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a release tensor: norm gains about 1, biases small, adaLN tables large
    enough that the gates open, matrices 1 / sqrt(fan_in)."""
    if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
        return 1.0, 0.2
    if name.endswith("scale_shift_table"):
        return 0.0, 0.3
    if len(shape) == 1:
        return 0.0, 0.2
    return 0.0, 1.0 / float(np.prod(shape[1:])) ** 0.5


def release_weights(shapes: dict[str, tuple[int, ...]], seed: int = WEIGHT_SEED,
                    dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Deterministic release tensors of the given names and shapes (names in sorted order, one
    ``RandomState`` stream)."""
    rs = np.random.RandomState(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        mean, std = _std(name, shape)
        out[name] = torch.from_numpy(mean + std * rs.standard_normal(shape)).to(dtype)
    return out


def inputs(case: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A case's DiT inputs in mm's layout (fp64): latents [b, c, f, H, W], timestep [b],
    llm_context, llm_mask, clip_context (None without CLIP) and the loss probe."""
    ref = REFERENCE_CASES[case]
    b, f, h, w, length, clip_len, real = CASE_SHAPES[case]
    rs = np.random.RandomState(seed)
    llm_channels = ref["caption_channels"] if isinstance(ref["caption_channels"], int) else ref["caption_channels"][0]
    out = {"latents": rs.standard_normal((b, ref["in_channels"], f, h, w)),
           "timestep": np.array(TIMESTEPS[:b]),
           "llm_context": rs.standard_normal((b, length, llm_channels)),
           "llm_mask": (np.arange(length)[None, :] < np.array(real)[:, None]).astype(np.float64),
           "clip_context": (rs.standard_normal((b, clip_len, ref["caption_channels"][1])) if clip_len else None),
           "probe": rs.standard_normal((b, ref["out_channels"], f, h, w))}
    return {k: None if v is None else torch.from_numpy(v) for k, v in out.items()}


def sketch_matrix(name: str, numel: int) -> torch.Tensor:
    """The fixed ``[numel, SKETCH_COLUMNS]`` Gaussian projection of a gradient's flattened values."""
    rs = np.random.RandomState(zlib.crc32(name.encode()))
    return torch.from_numpy(rs.standard_normal((numel, SKETCH_COLUMNS)))


def gradient_record(name: str, grad: torch.Tensor) -> torch.Tensor:
    """What the fixture keeps of a weight gradient: the whole tensor if small, else its sketch
    (``SKETCH_COLUMNS`` random projections) followed by its 2-norm."""
    g = grad.detach().double().flatten()
    if g.numel() <= FULL_GRADIENT:
        return grad.detach().double().clone()
    return torch.cat([g @ sketch_matrix(name, g.numel()), g.norm()[None]])


def release_shapes(num_layers: int, num_heads: int, head_dim: int, in_channels: int, out_channels: int,
                   caption_channels, patch_size: int = 1) -> dict[str, tuple[int, ...]]:
    """The release tensors of a Step-Video DiT (the reference StepVideoModel's state dict)."""
    h, p = num_heads * head_dim, patch_size
    llm, clip = (caption_channels, None) if isinstance(caption_channels, int) else caption_channels
    shapes = {"pos_embed.proj.weight": (h, in_channels, p, p), "pos_embed.proj.bias": (h,),
              "adaln_single.emb.timestep_embedder.linear_1.weight": (h, 256),
              "adaln_single.emb.timestep_embedder.linear_1.bias": (h,),
              "adaln_single.emb.timestep_embedder.linear_2.weight": (h, h),
              "adaln_single.emb.timestep_embedder.linear_2.bias": (h,),
              "adaln_single.linear.weight": (6 * h, h), "adaln_single.linear.bias": (6 * h,),
              "caption_projection.linear_1.weight": (h, llm), "caption_projection.linear_1.bias": (h,),
              "caption_projection.linear_2.weight": (h, h), "caption_projection.linear_2.bias": (h,),
              "scale_shift_table": (2, h), "proj_out.weight": (p * p * out_channels, h),
              "proj_out.bias": (p * p * out_channels,)}
    if clip is not None:
        shapes.update({"clip_projection.weight": (h, clip), "clip_projection.bias": (h,)})
    for i in range(num_layers):
        block = {"norm1.weight": (h,), "norm1.bias": (h,), "norm2.weight": (h,), "norm2.bias": (h,),
                 "attn1.wqkv.weight": (3 * h, h), "attn1.wo.weight": (h, h), "attn1.q_norm.weight": (head_dim,),
                 "attn1.k_norm.weight": (head_dim,), "attn2.wq.weight": (h, h), "attn2.wkv.weight": (2 * h, h),
                 "attn2.wo.weight": (h, h), "attn2.q_norm.weight": (head_dim,), "attn2.k_norm.weight": (head_dim,),
                 "ff.net.0.proj.weight": (4 * h, h), "ff.net.2.weight": (h, 4 * h), "scale_shift_table": (6, h)}
        shapes.update({f"transformer_blocks.{i}.{k}": v for k, v in block.items()})
    return shapes
