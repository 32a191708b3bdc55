"""The Wan video VAE (Wan2.1: 16 latent channels, 4x8x8; Wan2.2: 48 channels, 4x16x16 with a 2x2
patchify and residual up/down blocks).

Everything temporal is causal, and a video is processed in temporal chunks (encode: the first
frame, then 4 frames at a time; decode: one latent frame at a time) with a ``CausalCache`` that
carries each causal convolution's last input frames from one chunk to the next, so memory stays
bounded for long videos and the result equals processing the whole video with causal padding.
The first chunk is special in two places: temporal downsampling passes the first frame through
(1 + 4k frames -> 1 + k latents) and temporal upsampling leaves the first latent frame unrepeated.

Module and parameter names follow diffusers' ``AutoencoderKLWan`` so its checkpoints load as they are.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mm.models.ae.vae_cp import HaloCache, check_frames, gather_frames, split_counts

CACHED_FRAMES = 2  # a kernel-3 causal convolution needs the two frames before a chunk

WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# Wan2.2's TI2V-5B VAE (48 channels), as Wan2.2's Wan2_2_VAE wrapper (wan/modules/vae2_2.py) sets them
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                      -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                      -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                      -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                      -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                      0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                     0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                     0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                     0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                     0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]


@dataclass
class WanVAEConfig:
    """diffusers' ``AutoencoderKLWan`` config keys (the model JSON's ``ae`` section, ``model_id: wan_vae``)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_scales: list[float] = field(default_factory=list)
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    # spatial tiling for large frames (mm's keys): tiles of this many (patchified) pixels, this far
    # apart; overlaps are blended linearly, as diffusers' tiled encode/decode do
    use_tiling: bool = False
    tile_sample_min_size: int = 256
    tile_sample_stride: int = 192

    @classmethod
    def from_json(cls, params: dict) -> "WanVAEConfig":
        """From the model JSON's ``ae`` keys (or a diffusers config.json); unknown keys are an error."""
        valid = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in params.items() if not k.startswith("_")}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"ae keys {unknown} are not Wan VAE parameters; valid: {sorted(valid)}")
        return cls(**values)


class CausalCache:
    """What comes before the frames a module is processing: the end of the previous temporal
    chunk's input to the same module (``None`` at the start of the video)."""

    def __init__(self) -> None:
        self.state: dict[int, torch.Tensor] = {}
        self.started: set[int] = set()

    def previous(self, module: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor | None:
        """Up to ``frames`` frames that precede ``x`` for ``module``; remembers ``x``'s tail."""
        prev = self.state.get(id(module))
        joined = x if prev is None else torch.cat([prev, x], dim=2)
        self.state[id(module)] = joined[:, :, -frames:].detach().clone()
        return prev

    def at_start(self, module: nn.Module) -> bool:
        """True the first time ``module`` asks: its input begins with the video's first frame."""
        first = id(module) not in self.started
        self.started.add(id(module))
        return first


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only in the past along time (2 x the time padding in front, none behind)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.time_pad, self.space_pad = 2 * pt, (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        prev = cache.previous(self, x, self.time_pad) if cache is not None and self.time_pad else None
        if prev is not None:
            x = torch.cat([prev, x], dim=2)
        front = self.time_pad - (prev.shape[2] if prev is not None else 0)
        return super().forward(F.pad(x, (*self.space_pad, front, 0)))


class RMSNorm(nn.Module):
    """Normalise over channels (dim 1), times sqrt(dim) and a learned gain."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if low else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache=None):
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(self.dropout(F.silu(self.norm2(x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention inside each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).transpose(-1, -2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(-1, -2).reshape(b * t, c, h, w)
        y = self.proj(y).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + y


class _NearestUp2x(nn.Upsample):
    """2x nearest-exact upsampling in fp32, result in the input dtype."""

    def __init__(self):
        super().__init__(scale_factor=(2.0, 2.0), mode="nearest-exact")

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial 2x down/up-sampling per frame, with (3d modes) causal temporal 2x down/up-sampling."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out = dim // 2 if upsample_out_dim is None else upsample_out_dim
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, out, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache: CausalCache):
        if self.mode == "upsample3d":
            # the video's first latent frame stays one frame; every later one becomes two
            first, rest = (x[:, :, :1], x[:, :, 1:]) if cache.at_start(self) else (None, x)
            if rest.shape[2]:
                b, c, t, h, w = rest.shape
                rest = self.time_conv(rest, cache).reshape(b, 2, c, t, h, w)
                rest = torch.stack((rest[:, 0], rest[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)
            x = rest if first is None else torch.cat([first, rest], dim=2)
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            # the video's first frame passes through; later frames merge in pairs with the frame before
            prev = cache.previous(self, x, 1)
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
            elif x.shape[2] > 1:
                x = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return x


class AvgDown3D(nn.Module):
    """Wan2.2 shortcut: space/time-to-channel then group mean down to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x):
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Wan2.2 shortcut: repeat channels, then channel-to-space/time (inverse of AvgDown3D)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x, first_chunk: bool = False):
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache=None):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)


class ResidualDownBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                     for i in range(num_res_blocks))
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x, cache=None):
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    def __init__(self, in_dim, out_dim, num_res_blocks, dropout, upsample_mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                     for i in range(num_res_blocks + 1))
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x, cache=None, first_chunk=False):
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class ResidualUpBlock(nn.Module):
    def __init__(self, in_dim, out_dim, num_res_blocks, dropout, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if up else None
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                     for i in range(num_res_blocks + 1))
        self.upsampler = Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim) \
            if up else None

    def forward(self, x, cache=None, first_chunk=False):
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is not None:
            x = self.upsampler(x, cache)
        if self.avg_shortcut is not None:
            x = x + self.avg_shortcut(shortcut, first_chunk=first_chunk)
        return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig, in_channels: int):
        super().__init__()
        dims = [cfg.base_dim * u for u in [1] + cfg.dim_mult]
        levels = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == levels - 1
            if cfg.is_residual:
                blocks.append(ResidualDownBlock(in_dim, out_dim, cfg.dropout, cfg.num_res_blocks,
                                                temporal=cfg.temperal_downsample[i] if not last else False,
                                                down=not last))
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if not last:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    def forward(self, x, cache=None):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig, out_channels: int):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in [cfg.dim_mult[-1]] + cfg.dim_mult[::-1]]
        temporal_up = cfg.temperal_downsample[::-1]
        levels = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != levels - 1
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout,
                                              temporal=temporal_up[i] if up else False, up=up))
            else:
                in_dim = in_dim // 2 if i > 0 else in_dim  # the previous upsampler halved the channels
                mode = ("upsample3d" if temporal_up[i] else "upsample2d") if up else None
                blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x, cache=None, first_chunk=False):
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache, first_chunk=first_chunk)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[b, c, t, h, w] -> [b, c * p * p, t, h / p, w / p] (Wan2.2's channel order)."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Fade ``a``'s last ``extent`` rows/columns (``dim`` -2 or -1) into ``b``'s first, in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    w = torch.arange(extent, dtype=b.dtype, device=b.device) / extent
    w = w.view(-1, 1) if dim == -2 else w
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)


def _stitch(rows: list[list[torch.Tensor]], blend: int, stride: int, height: int, width: int) -> torch.Tensor:
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, -2)
            if j > 0:
                _blend(row[j - 1], tile, blend, -1)
            pieces.append(tile[..., :stride, :stride])
        out_rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., :height, :width]


class WanVAE(nn.Module):
    """``encode(video [b, 3, 1 + 4k, H, W] in [-1, 1]) -> (mean, logvar)`` of the latent distribution
    ``[b, z, 1 + k, H / s, W / s]``; ``decode(z) -> video`` clamped to [-1, 1]; ``normalize`` /
    ``denormalize`` apply the per-channel latent statistics the DiT is trained on."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        self.cfg = cfg
        # in/out_channels count the patchified channels (Wan2.2: 3 x 2 x 2 = 12)
        self.encoder = Encoder3d(cfg, cfg.in_channels)
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg, cfg.out_channels)
        # on the CPU even when the model is built on the meta device (a loader that assigns the weights)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, device="cpu").view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, device="cpu").view(1, -1, 1, 1, 1),
                             persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of its weights, which ``encode`` and ``decode`` cast their input to."""
        return self.post_quant_conv.weight.dtype

    def encode(self, video: torch.Tensor, vae_cp: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``vae_cp = (group, ranks)``: share the frames over a VAE-CP group (every rank passes the
        same video and gets the whole result)."""
        video = video.to(self.compute_dtype)  # the VAE computes in its own dtype (patch.ae_float32)
        frames = video.shape[2]
        if self.cfg.patch_size:
            video = patchify(video, self.cfg.patch_size)
        chunks = (frames - 1) // 4  # the first frame alone, then 4 frames per chunk; the rest is unused
        tile = self.cfg.tile_sample_min_size
        if vae_cp is None and self.cfg.use_tiling and max(video.shape[-2:]) > tile:
            h = self._tiled_encode(video, chunks)
        elif vae_cp is None:
            h = self._encode_chunks(video, chunks)
        else:
            group, ranks = vae_cp
            check_frames(frames, len(ranks), "video")
            halo = HaloCache(group, ranks)
            counts = split_counts(chunks, len(ranks))
            start = 1 + 4 * sum(counts[: halo.index]) if halo.index else 0
            end = 1 + 4 * sum(counts[: halo.index + 1])
            h = gather_frames(self.encoder(video[:, :, start:end], halo),
                              [n + (1 if i == 0 else 0) for i, n in enumerate(counts)], group)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _encode_chunks(self, video: torch.Tensor, chunks: int) -> torch.Tensor:
        cache = CausalCache()
        pieces = [video[:, :, :1]] + [video[:, :, 1 + 4 * i: 5 + 4 * i] for i in range(chunks)]
        return torch.cat([self.encoder(piece, cache) for piece in pieces], dim=2)

    def _tiled_encode(self, video: torch.Tensor, chunks: int) -> torch.Tensor:
        size, stride = self.cfg.tile_sample_min_size, self.cfg.tile_sample_stride
        ratio = self.cfg.scale_factor_spatial // (self.cfg.patch_size or 1)
        height, width = video.shape[-2:]
        rows = [[self._encode_chunks(video[..., i:i + size, j:j + size], chunks) for j in range(0, width, stride)]
                for i in range(0, height, stride)]
        return _stitch(rows, (size - stride) // ratio, stride // ratio, height // ratio, width // ratio)

    def _decode_frames(self, x: torch.Tensor) -> torch.Tensor:
        cache = CausalCache()
        return torch.cat([self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])], dim=2)

    def _tiled_decode(self, x: torch.Tensor) -> torch.Tensor:
        size, stride, p = self.cfg.tile_sample_min_size, self.cfg.tile_sample_stride, self.cfg.patch_size or 1
        ratio = self.cfg.scale_factor_spatial
        height, width = x.shape[-2:]
        rows = [[self._decode_frames(x[..., i:i + size // ratio, j:j + size // ratio])
                 for j in range(0, width, stride // ratio)] for i in range(0, height, stride // ratio)]
        return _stitch(rows, size // p - stride // p, stride // p, height * ratio // p, width * ratio // p)

    def decode(self, z: torch.Tensor, vae_cp: tuple | None = None, clamp: bool = True) -> torch.Tensor:
        """``clamp=False`` (training): the decoder's output as it is, so pixels outside [-1, 1] still
        get a gradient."""
        x = self.post_quant_conv(z.to(self.compute_dtype))
        if vae_cp is None and self.cfg.use_tiling and max(x.shape[-2:]) > self.cfg.tile_sample_min_size // self.cfg.scale_factor_spatial:
            out = self._tiled_decode(x)
        elif vae_cp is None:
            out = self._decode_frames(x)
        else:
            group, ranks = vae_cp
            check_frames(x.shape[2], len(ranks), "latent")
            halo = HaloCache(group, ranks)
            counts = split_counts(x.shape[2] - 1, len(ranks))
            counts[0] += 1  # rank 0 also decodes the first latent frame
            start = sum(counts[: halo.index])
            piece = self.decoder(x[:, :, start:start + counts[halo.index]], halo, first_chunk=halo.index == 0)
            out = gather_frames(piece, [4 * n - (3 if i == 0 else 0) for i, n in enumerate(counts)], group)
        if self.cfg.patch_size:
            out = unpatchify(out, self.cfg.patch_size)
        return out.clamp(-1.0, 1.0) if clamp else out

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latents_mean.to(latents)) / self.latents_std.to(latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latents_std.to(latents) + self.latents_mean.to(latents)


# the model JSON's ae keys that set how a VAE runs, over its config.json; any other key must repeat it
RUNTIME_KEYS = ("use_tiling", "tile_sample_min_size", "tile_sample_stride")


def with_json_keys(cfg: WanVAEConfig, params: dict | None, prefix: str = "ae.") -> WanVAEConfig:
    """``cfg`` (a directory's config.json) with the model JSON's ``ae`` keys: the tiling keys set, any other
    Wan VAE key only repeating the config's value; an unknown key or a different value is an error."""
    params = {k: v for k, v in (params or {}).items() if not k.startswith("_")}
    valid = {f.name for f in dataclasses.fields(WanVAEConfig)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"{[prefix + k for k in unknown]} are not Wan VAE parameters; valid: {sorted(valid)}")
    for key in sorted(set(params) - set(RUNTIME_KEYS)):
        given, held = params[key], getattr(cfg, key)
        same = [float(v) for v in given] == [float(v) for v in held] if isinstance(held, list) else given == held
        if not same:
            raise ValueError(f"{prefix}{key} = {given!r}, but ae.from_pretrained's config.json has {key} = {held!r} "
                             f"(leave {prefix}{key} out, or edit the config.json)")
    return dataclasses.replace(cfg, **{k: params[k] for k in RUNTIME_KEYS if k in params})


def load_wan_vae(from_pretrained: str, dtype: torch.dtype = torch.float32, params: dict | None = None) -> WanVAE:
    """A Wan VAE from a diffusers-format directory (config.json + diffusion_pytorch_model*.safetensors) or from
    Wan's original release file (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``: ``mm.models.ae.wan_vae_original``, where
    ``params``, the model JSON's ``ae`` keys, may give the latent statistics and mm's tiling keys; a directory's
    config.json gives everything, and ``params`` its tiling keys: ``with_json_keys``). Missing or unexpected
    weights are an error that lists them."""
    from safetensors.torch import load_file

    from mm.models.ae.wan_vae_original import is_original_vae, load_original_vae

    if is_original_vae(from_pretrained):
        return load_original_vae(from_pretrained, dtype, params)
    path = Path(from_pretrained)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: no config.json there")
    vae = WanVAE(with_json_keys(WanVAEConfig.from_json(json.loads((path / "config.json").read_text())), params))
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: no diffusion_pytorch_model*.safetensors")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"ae.from_pretrained = {from_pretrained!r}: weights do not match the config: "
                       f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return vae.to(dtype).eval().requires_grad_(False)


def save_wan_vae(vae: WanVAE, directory: str) -> None:
    """Write ``vae`` as a diffusers-format directory that ``load_wan_vae`` (and diffusers) read; the
    latent statistics are those of ``vae.cfg``."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dataclasses.asdict(vae.cfg).items()
              if k not in ("use_tiling", "tile_sample_min_size", "tile_sample_stride")}
    (path / "config.json").write_text(json.dumps(dict(config, _class_name="AutoencoderKLWan"), indent=1))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "diffusion_pytorch_model.safetensors"))
