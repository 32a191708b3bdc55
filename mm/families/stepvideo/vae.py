"""The Step-Video-T2V video VAE: version 2 (the release's ``vae_v2.safetensors``: 64 latent channels,
16x spatial compression) and version 1 (``vae.safetensors``: 16 channels, 8x).

A video is cut into chunks of ``frame_len`` = 17 frames that are encoded and decoded independently (no
state passes from one chunk to the next), as the reference Step-Video-T2V VAE does:

* encode: each 17-frame chunk -> 3 latent frames (version 2; version 1: 5). Inside a chunk everything
  temporal is causal: convolutions are zero-padded in front only, temporal downsampling keeps the
  first frame (17 -> 9 -> 5), version 2's 2x space-time pixel-unshuffle pads one zero frame in front
  (5 -> 3), and the mid-block attention (one head as wide as the block) is causal over the chunk's
  (t, h, w) token order. GroupNorm(32) normalises each frame on its own in version 2 and the whole
  chunk in version 1;
* decode: each group of 3 (5) latent frames -> 17 frames (the decoder makes 20 and drops the first
  3); then the two frames at every chunk boundary are cross-faded: the next chunk's first frame
  becomes 0.6 x itself + 0.4 x the previous chunk's last frame, and that last frame 0.6 x itself +
  0.4 x the already-faded first frame. The output is not clamped (the reference's decode is not; mm's
  runner clamps to [-1, 1] when it writes a video).

Frame counts. mm's usual ``latent = (frames - 1) // temporal + 1`` does not describe this VAE: it
holds for one chunk only (17 -> 3 with temporal 8; version 1: 17 -> 5 with 4), while every further 17
frames add 3 (5) latent frames: 34 -> 6, 204 -> 36. Use ``latent_frames`` / ``check_frames`` (frames a
positive multiple of 17, height and width multiples of ``scale_factor_spatial``); ``scale_factor_temporal``
is the compression inside one chunk.

Latents need no scaling: ``normalize`` / ``denormalize`` are the identity (the release's scale factor
1.0).

Layout: mm's channels-first ``[b, c, f, h, w]`` throughout (the reference keeps frames before channels,
``[b, f, c, h, w]``, at its interface). Module and parameter names follow the release checkpoint's, except
``decoder.conv_out.*``, which is ``decoder.conv_out.conv.*`` here (the loader renames it, as the reference's
loader does).

VAE-CP (``vae_cp = (group, ranks)``): chunks are independent, so the ranks of the group split the chunks
(consecutive runs in rank order, the first ranks taking one more when they do not divide evenly),
encode or decode their own and all-gather the results; the chunk
boundaries are cross-faded after the gather, on the whole video, so every rank returns the whole result,
equal to one process's. A rank with no chunk (fewer chunks than ranks) only takes part in the gather.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm.models.ae.vae_cp import gather_frames, split_counts

FRAME_LEN = 17  # frames per chunk (the release's)
LATENT_LEN = {1: 5, 2: 3}  # latent frames per chunk, by version
SPATIAL = {1: 8, 2: 16}
TEMPORAL = {1: 4, 2: 8}  # inside one chunk: 1 + t*k frames -> 1 + k latent frames
RELEASE_FILES = {1: "vae.safetensors", 2: "vae_v2.safetensors"}
RELEASE_Z = {1: 16, 2: 64}
GROUPS = 32  # GroupNorm groups everywhere: every width must be a multiple of 32
KEEP = 0.6  # the share a boundary frame keeps of itself in the chunk cross-fade
DOWN_3D_LEVELS = (1, 2)  # encoder levels whose downsampling also halves time (level 0: space only)
UP_3D_LEVELS = (2, 3)  # decoder levels whose upsampling also doubles time (level 1: space only)
DECODER_CROP = 3  # the decoder makes 4n - 3 + 3 frames; the first 3 are dropped
PATCH = 2  # version 2's space-time pixel-(un)shuffle factor
# a causal convolution whose input or output reaches this many elements runs in pieces of frames
# (same result, smaller kernels' workspaces), as the reference does for full-resolution video
SPLIT_ELEMENTS = 2**30


@dataclass
class StepVideoVAEConfig:
    """The model JSON's ``ae`` keys for ``model_id`` ``stepvideovae`` (defaults: the release's version 2
    VAE). ``z_channels`` defaults to the release's for the version (2: 64, 1: 16); the widths and
    block counts exist for tiny test models (the level layout, 4 levels, is fixed)."""

    version: int = 2
    z_channels: int | None = None
    frame_len: int = FRAME_LEN
    num_res_blocks: int = 2
    encoder_ch: int = 32
    encoder_ch_mult: list[int] = field(default_factory=lambda: [4, 8, 16, 16])
    decoder_ch: int = 128
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])

    def __post_init__(self) -> None:
        problems = []
        if self.version not in (1, 2):
            problems.append(f"ae.version = {self.version!r}; valid: 1 (vae.safetensors) or 2 (vae_v2.safetensors)")
        elif self.z_channels is None:
            self.z_channels = RELEASE_Z[self.version]
        if self.z_channels is not None and (not _is_int(self.z_channels) or self.z_channels < 1):
            problems.append(f"ae.z_channels = {self.z_channels!r}; valid: an integer >= 1 (release: 64 for "
                            f"version 2, 16 for version 1)")
        if self.frame_len != FRAME_LEN:
            problems.append(f"ae.frame_len = {self.frame_len!r}; valid: {FRAME_LEN} (the VAE's chunk length)")
        if not _is_int(self.num_res_blocks) or self.num_res_blocks < 0:
            problems.append(f"ae.num_res_blocks = {self.num_res_blocks!r}; valid: an integer >= 0")
        for part in ("encoder", "decoder"):
            ch, mult = getattr(self, f"{part}_ch"), getattr(self, f"{part}_ch_mult")
            if not _is_int(ch) or ch < 1:
                problems.append(f"ae.{part}_ch = {ch!r}; valid: an integer >= 1")
            elif not isinstance(mult, (list, tuple)) or len(mult) != 4 or not all(_is_int(m) and m > 0 for m in mult):
                problems.append(f"ae.{part}_ch_mult = {mult!r}; valid: 4 positive integers (one per level)")
            elif any(ch * m % GROUPS for m in mult):
                problems.append(f"ae.{part}_ch = {ch} x ae.{part}_ch_mult = {list(mult)} gives widths "
                                f"{[ch * m for m in mult]}; valid: every width a multiple of {GROUPS} (GroupNorm)")
            elif self.version == 2 and _is_int(self.z_channels) and (ch * mult[-1]) % (4 * self.z_channels):
                problems.append(f"ae.{part}_ch x {part}_ch_mult[-1] = {ch * mult[-1]}; valid with version 2: a "
                                f"multiple of 4 x z_channels = {4 * self.z_channels} (the patchify shortcut "
                                f"averages / repeats whole channel groups)")
        if problems:
            raise ValueError("; ".join(problems))
        self.encoder_ch_mult, self.decoder_ch_mult = list(self.encoder_ch_mult), list(self.decoder_ch_mult)

    @classmethod
    def from_json(cls, params: dict) -> "StepVideoVAEConfig":
        """From the model JSON's ``ae`` keys (besides model_id, from_pretrained, dtype, vae_cp_size);
        unknown keys are an error."""
        valid = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in params.items() if not k.startswith("_")}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"ae keys {unknown} are not Step-Video VAE parameters; valid: {sorted(valid)}")
        return cls(**values)

    @property
    def scale_factor_spatial(self) -> int:
        return SPATIAL[self.version]

    @property
    def scale_factor_temporal(self) -> int:
        """Compression inside one chunk (17 -> 3: 8; version 1, 17 -> 5: 4); not valid across chunks
        (see ``latent_frames``)."""
        return TEMPORAL[self.version]

    @property
    def latent_len(self) -> int:
        """Latent frames per 17-frame chunk."""
        return LATENT_LEN[self.version]

    @property
    def release_file(self) -> str:
        return RELEASE_FILES[self.version]

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.version)

    def check_frames(self, num_frames: int, height: int | None = None, width: int | None = None,
                     prefix: str = "") -> None:
        check_frames(num_frames, height, width, self.version, prefix)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def video_problems(num_frames: int, height: int | None = None, width: int | None = None, version: int = 2,
                   prefix: str = "") -> list[str]:
    """What is wrong with a video of this size for the VAE (``prefix`` names the keys' section, e.g.
    ``"inference."``)."""
    problems = []
    if not _is_int(num_frames) or num_frames < FRAME_LEN or num_frames % FRAME_LEN:
        problems.append(f"{prefix}num_frames = {num_frames!r}; valid: a positive multiple of {FRAME_LEN} "
                        f"({FRAME_LEN}, {2 * FRAME_LEN}, {3 * FRAME_LEN}, ...: the Step-Video VAE works on "
                        f"{FRAME_LEN}-frame chunks)")
    step = SPATIAL[version]
    for key, size in (("height", height), ("width", width)):
        if size is not None and (not _is_int(size) or size < step or size % step):
            problems.append(f"{prefix}{key} = {size!r}; valid: a positive multiple of {step} (the Step-Video VAE's "
                            f"spatial compression)")
    return problems


def check_frames(num_frames: int, height: int | None = None, width: int | None = None, version: int = 2,
                 prefix: str = "") -> None:
    """Raise ``ValueError`` naming every bad size (see ``video_problems``)."""
    problems = video_problems(num_frames, height, width, version, prefix)
    if problems:
        raise ValueError("; ".join(problems))


def latent_frames(num_frames: int, version: int = 2) -> int:
    """Latent frames of a ``num_frames``-frame video: 3 (version 1: 5) per 17 frames (17 -> 3, 34 -> 6,
    204 -> 36)."""
    check_frames(num_frames, version=version)
    return num_frames // FRAME_LEN * LATENT_LEN[version]


# --------------------------------------------------------------------------------------------- layers


class CausalConv3d(nn.Module):
    """Conv3d zero-padded with ``kernel_t - 1`` frames in front (none behind) and ``kernel // 2`` pixels on
    each side; the weights live in ``.conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)
        kt, kh, kw = self.conv.kernel_size
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad)
        kt, st = self.conv.kernel_size[0], self.conv.stride[0]
        frames = x.shape[2] - kt + 1  # output frames at time stride 1
        biggest = x.numel() * max(1.0, self.conv.out_channels / self.conv.in_channels)
        if st != 1 or biggest < SPLIT_ELEMENTS or frames < 2:
            return self.conv(x)
        pieces = min(frames, max(2, -(-int(biggest) // SPLIT_ELEMENTS)))
        bounds = [frames * i // pieces for i in range(pieces + 1)]
        return torch.cat([self.conv(x[:, :, a:b + kt - 1]) for a, b in zip(bounds[:-1], bounds[1:])], dim=2)


class GroupNorm(nn.GroupNorm):
    """GroupNorm(32) over each frame separately (version 2) or over the whole clip (version 1)."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__(GROUPS, channels)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t = x.shape[:3]
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
        return y.view(b, t, c, *x.shape[3:]).transpose(1, 2)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """A 2-D ``fn`` on every frame of ``x`` [b, c, t, h, w]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus the input (through a 1x1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, per_frame: bool):
        super().__init__()
        self.norm1 = GroupNorm(in_channels, per_frame)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = GroupNorm(out_channels, per_frame)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class CausalAttention(nn.Module):
    """One-head self-attention over all (t, h, w) positions of a chunk, causal in that order (w fastest)."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.norm = GroupNorm(channels, per_frame)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj_out(out.squeeze(1).transpose(1, 2).reshape(x.shape)) + x


class SpaceDownsample(nn.Module):
    """Per frame: pad one zero row and column at the bottom / right, 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class SpaceTimeDownsample(nn.Module):
    """Causal 3x3x3 conv with stride 2 in time, height and width (t -> (t - 1) // 2 + 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpaceUpsample(nn.Module):
    """Per frame: nearest 2x, 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class UpsampleResBlock(nn.Module):
    """conv -> norm -> SiLU -> conv -> norm, then SiLU(that + x) + x."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm1 = GroupNorm(channels, per_frame)
        self.conv2 = CausalConv3d(channels, channels, 3)
        self.norm2 = GroupNorm(channels, per_frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + x) + x


class SpaceTimeUpsample(nn.Module):
    """Nearest 2x in time, height and width, then ``UpsampleResBlock``."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.conv3d = UpsampleResBlock(channels, per_frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[b, c, t, h, w] -> [b, c * f^3, (t + f - 1) / f, h / f, w / f]: ``f - 1`` zero frames in front,
    then every f x f x f block into channels, channel index ``c * f^3 + (dt * f + dh) * f + dw``."""
    x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor**3, t // factor, h // factor, w // factor)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse arrangement of ``pixel_unshuffle_3d``, then the first ``f - 1`` frames dropped."""
    b, c, t, h, w = x.shape
    c //= factor**3
    x = x.view(b, c, factor, factor, factor, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, t * factor, h * factor, w * factor)[:, :, factor - 1:]


def average_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Means of consecutive groups of channels: [b, c, ...] -> [b, out_channels, ...]."""
    return x.view(x.shape[0], out_channels, x.shape[1] // out_channels, *x.shape[2:]).mean(dim=2)


class PatchifyConv(nn.Module):
    """Causal conv to ``out / f^3`` channels, then ``pixel_unshuffle_3d``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels // PATCH**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_3d(self.conv(x), PATCH)


class UnpatchifyConv(nn.Module):
    """Causal conv to ``out * f^3`` channels, then ``pixel_shuffle_3d``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels * PATCH**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), PATCH)


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks) and, where the level resamples, ``downsample`` or
    ``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, per_frame)
        self.attn_1 = CausalAttention(channels, per_frame)
        self.block_2 = ResnetBlock(channels, channels, per_frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """One chunk [b, 3, 17, H, W] -> [b, 2 z, 3 (version 1: 5), H / 16 (8), W / 16 (8)] (mean | log-variance)."""

    def __init__(self, cfg: StepVideoVAEConfig):
        super().__init__()
        self.version, per_frame = cfg.version, cfg.version == 2
        ch, mult, z = cfg.encoder_ch, cfg.encoder_ch_mult, cfg.z_channels
        self.conv_in = CausalConv3d(3, ch, 3)
        self.down = nn.ModuleList()
        width = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(width, ch * m, per_frame))
                width = ch * m
            level = _Level(blocks)
            if i < len(mult) - 1:
                level.downsample = SpaceTimeDownsample(width) if i in DOWN_3D_LEVELS else SpaceDownsample(width)
            self.down.append(level)
        self.mid = _Mid(width, per_frame)
        self.norm_out = GroupNorm(width, per_frame)
        if cfg.version == 2:
            self.patched = 4 * z * PATCH**3
            self.conv_patchify = PatchifyConv(width, self.patched)
            self.conv_out = CausalConv3d(self.patched, 2 * z, 3)
        else:
            self.conv_out = CausalConv3d(width, 2 * z, 3)
        self.out_channels = 2 * z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = F.silu(self.norm_out(self.mid(h)))
        if self.version == 1:
            return self.conv_out(h)
        h = self.conv_patchify(h) + average_channels(pixel_unshuffle_3d(h, PATCH), self.patched)
        return self.conv_out(h) + average_channels(h, self.out_channels)


class Decoder(nn.Module):
    """One chunk of latents [b, z, 3 (5), h, w] -> [b, 3, 17, 16 h (8 h), 16 w (8 w)]."""

    def __init__(self, cfg: StepVideoVAEConfig):
        super().__init__()
        self.version, per_frame = cfg.version, cfg.version == 2
        ch, mult, z = cfg.decoder_ch, cfg.decoder_ch_mult, cfg.z_channels
        width = ch * mult[-1]
        if cfg.version == 2:
            self.patched = 4 * z * PATCH**3
            self.conv_in = CausalConv3d(z, self.patched, 3)
            self.conv_unpatchify = UnpatchifyConv(self.patched, width)
        else:
            self.conv_in = CausalConv3d(z, width, 3)
        self.block_in = width
        self.mid = _Mid(width, per_frame)
        levels: list[_Level] = [None] * len(mult)  # type: ignore[list-item]
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * mult[i], per_frame))
                width = ch * mult[i]
            level = _Level(blocks)
            if i > 0:
                level.upsample = SpaceTimeUpsample(width, per_frame) if i in UP_3D_LEVELS else SpaceUpsample(width)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm(width, per_frame)
        self.conv_out = CausalConv3d(width, 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.version == 2:
            h = h + z.repeat_interleave(self.patched // z.shape[1], dim=1)
            repeated = h.repeat_interleave(self.block_in * PATCH**3 // self.patched, dim=1)
            h = self.conv_unpatchify(h) + pixel_shuffle_3d(repeated, PATCH)
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[:, :, DECODER_CROP:]


def blend_chunks(video: torch.Tensor, frame_len: int = FRAME_LEN) -> torch.Tensor:
    """Cross-fade the frames on both sides of every chunk boundary of ``video`` [b, c, t, h, w], in place:
    first the next chunk's first frame (KEEP of itself, the rest from the previous chunk's last frame),
    then that last frame (KEEP of itself, the rest from the faded first frame)."""
    last = torch.arange(frame_len - 1, video.shape[2] - 1, frame_len, device=video.device)
    if last.numel() == 0:
        return video
    first = last + 1
    faded_first = video[:, :, first] * KEEP + video[:, :, last] * (1.0 - KEEP)
    video[:, :, first] = faded_first
    video[:, :, last] = video[:, :, last] * KEEP + faded_first * (1.0 - KEEP)
    return video


class StepVideoVAE(nn.Module):
    """``encode(video [b, 3, 17 k, H, W] in [-1, 1]) -> (mean, logvar)`` of the latent distribution
    ``[b, z, 3 k, H / 16, W / 16]`` (version 1: ``5 k``, ``/ 8``); ``decode(z) -> video [b, 3, 17 k, H, W]``
    (cross-faded chunks, not clamped); ``normalize`` / ``denormalize`` are the identity."""

    def __init__(self, cfg: StepVideoVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def scale_factor_spatial(self) -> int:
        return self.cfg.scale_factor_spatial

    @property
    def scale_factor_temporal(self) -> int:
        return self.cfg.scale_factor_temporal

    def latent_frames(self, num_frames: int) -> int:
        return self.cfg.latent_frames(num_frames)

    def check_frames(self, num_frames: int, height: int | None = None, width: int | None = None,
                     prefix: str = "") -> None:
        self.cfg.check_frames(num_frames, height, width, prefix)

    def _dtype(self) -> torch.dtype:
        return self.decoder.conv_out.conv.weight.dtype

    @staticmethod
    def _share(chunks: int, vae_cp: tuple | None) -> tuple[int, int, list[int] | None]:
        """(first chunk, end) of this rank's chunks, and every rank's chunk count (None without VAE-CP)."""
        if vae_cp is None:
            return 0, chunks, None
        group, ranks = vae_cp
        counts = split_counts(chunks, len(ranks))
        index = ranks.index(dist.get_rank())
        start = sum(counts[:index])
        return start, start + counts[index], counts

    def encode(self, video: torch.Tensor, vae_cp: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``video`` [b, 3, 17 k, H, W]; ``vae_cp = (group, ranks)`` shares the chunks over a VAE-CP group
        (every rank passes the same video and gets the whole result). The log-variance is clamped to
        [-30, 20]."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"Step-Video VAE encode: video of shape {tuple(video.shape)}; valid: [b, 3, frames, "
                             f"height, width]")
        b, _, frames, height, width = video.shape
        self.check_frames(frames, height, width, prefix="video ")
        video = video.to(self._dtype())
        start, end, counts = self._share(frames // FRAME_LEN, vae_cp)
        pieces = [self.encoder(video[:, :, i * FRAME_LEN:(i + 1) * FRAME_LEN]) for i in range(start, end)]
        s = self.scale_factor_spatial
        h = torch.cat(pieces, dim=2) if pieces else video.new_empty(
            (b, self.encoder.out_channels, 0, height // s, width // s))
        if counts is not None:
            h = gather_frames(h, [n * self.cfg.latent_len for n in counts], vae_cp[0])
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, vae_cp: tuple | None = None) -> torch.Tensor:
        """``z`` [b, z_channels, 3 k, h, w] -> [b, 3, 17 k, 16 h, 16 w]; ``vae_cp`` as in ``encode``."""
        step = self.cfg.latent_len
        if z.dim() != 5 or z.shape[1] != self.cfg.z_channels or z.shape[2] < step or z.shape[2] % step:
            raise ValueError(f"Step-Video VAE decode: latents of shape {tuple(z.shape)}; valid: [b, "
                             f"{self.cfg.z_channels} (ae.z_channels), a positive multiple of {step} frames, h, w]")
        b, _, frames, height, width = z.shape
        z = z.to(self._dtype())
        start, end, counts = self._share(frames // step, vae_cp)
        pieces = [self.decoder(z[:, :, i * step:(i + 1) * step]) for i in range(start, end)]
        s = self.scale_factor_spatial
        video = torch.cat(pieces, dim=2) if pieces else z.new_empty((b, 3, 0, height * s, width * s))
        if counts is not None:
            video = gather_frames(video, [n * FRAME_LEN for n in counts], vae_cp[0])
        return blend_chunks(video)

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the latent distribution: ``mean + exp(logvar / 2) * randn``."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


# --------------------------------------------------------------------------------------------- weights

_RELEASE_CONV_OUT = "decoder.conv_out."  # the release file's name for what is decoder.conv_out.conv.* here
_OURS_CONV_OUT = "decoder.conv_out.conv."


def from_release_name(name: str) -> str:
    """A release checkpoint's parameter name -> ours (``decoder.conv_out.X`` -> ``decoder.conv_out.conv.X``;
    a name already in our form is kept)."""
    if name.startswith(_RELEASE_CONV_OUT) and not name.startswith(_OURS_CONV_OUT):
        return _OURS_CONV_OUT + name[len(_RELEASE_CONV_OUT):]
    return name


def to_release_name(name: str) -> str:
    if name.startswith(_OURS_CONV_OUT):
        return _RELEASE_CONV_OUT + name[len(_OURS_CONV_OUT):]
    return name


def stepvideo_vae_config(from_pretrained: str | None = None, params: dict | None = None) -> StepVideoVAEConfig:
    """The config of ``ae``: a ``config.json`` next to the weights (mm's tiny models; the release has
    none), updated with the model JSON's ``ae`` keys (``params``)."""
    values: dict = {}
    if from_pretrained:
        path = Path(from_pretrained)
        config = (path if path.is_dir() else path.parent) / "config.json"
        if config.is_file():
            values.update(json.loads(config.read_text()))
    values.update(params or {})
    return StepVideoVAEConfig.from_json(values)


def vae_factors(from_pretrained: str | None = None, params: dict | None = None) -> tuple[int, int]:
    """(spatial, temporal inside a chunk) compression, known before the VAE is built (version 2: 16, 8;
    version 1: 8, 4). Frame counts: ``latent_frames``."""
    cfg = stepvideo_vae_config(from_pretrained, params)
    return cfg.scale_factor_spatial, cfg.scale_factor_temporal


def _weights_file(from_pretrained: str, cfg: StepVideoVAEConfig) -> Path:
    path = Path(from_pretrained)
    if path.is_dir():
        weights = path / cfg.release_file
        if not weights.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: no {cfg.release_file} there (the "
                                    f"release's file for ae.version = {cfg.version}; found {found})")
        return weights
    if path.is_file() and path.suffix == ".safetensors":
        return path
    raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: not a directory holding "
                            f"{cfg.release_file} nor a .safetensors file")


def load_stepvideo_vae(from_pretrained: str, dtype: torch.dtype = torch.float32,
                       params: dict | None = None) -> StepVideoVAE:
    """A Step-Video VAE from ``ae.from_pretrained``: the release's ``vae`` directory (``vae_v2.safetensors``
    for version 2, ``vae.safetensors`` for version 1) or the ``.safetensors`` file itself. Parameter names
    are the release's (``decoder.conv_out.*`` is renamed); a missing, unexpected or misshapen weight is an
    error that lists them all."""
    from safetensors.torch import load_file

    cfg = stepvideo_vae_config(from_pretrained, params)
    weights = _weights_file(from_pretrained, cfg)
    with torch.device("meta"):  # shapes first; the weights then take the file's tensors (assign)
        vae = StepVideoVAE(cfg)
    expected = {name: tuple(p.shape) for name, p in vae.state_dict().items()}
    state = {from_release_name(k): v for k, v in load_file(str(weights)).items()}
    missing = sorted(to_release_name(k) for k in expected.keys() - state.keys())
    unexpected = sorted(k for k in state.keys() - expected.keys())
    misshapen = sorted(f"{to_release_name(k)} {tuple(state[k].shape)} (expected {expected[k]})"
                       for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshapen:
        raise KeyError(f"ae.from_pretrained = {from_pretrained!r}: {weights.name} does not match ae.version = "
                       f"{cfg.version}, ae.z_channels = {cfg.z_channels} (and the widths): missing {missing}, "
                       f"unexpected {unexpected}, wrong shape {misshapen}")
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.to(dtype).eval().requires_grad_(False)


def save_stepvideo_vae(vae: StepVideoVAE, directory: str, config: bool = True) -> Path:
    """Write ``vae`` in the release layout (``vae_v2.safetensors`` or ``vae.safetensors`` under the release's
    names) to ``directory``; with ``config``, also a ``config.json`` of its ``ae`` keys (for models other than
    the release's, which ``load_stepvideo_vae`` reads back). Returns the weights file."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(vae.cfg), indent=1))
    weights = path / vae.cfg.release_file
    save_file({to_release_name(k): v.detach().contiguous() for k, v in vae.state_dict().items()}, str(weights))
    return weights
