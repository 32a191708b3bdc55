"""WFVAE, the wavelet-flow video VAE of OpenSoraPlan 1.3 (``WFVAEModel_D8_4x8x8``: 8 latent channels, 4x8x8).

A 3-D Haar transform splits the video into 8 sub-bands (2x in time and space); the encoder's main path
downsamples them twice more in space and once in time, and two side paths ("energy flow") carry
further Haar transforms of the low band (2-D, then 3-D) into it. The decoder mirrors that, adding
inverse-Haar reconstructions of its side paths to the low band before each inverse transform.

Everything temporal is causal (convolutions pad the past with copies of the first frame, strided
ones consume aligned pairs), except the decoder's trilinear 2x time upsampling, whose odd output
frames blend in the *next* input frame. A video can therefore be processed as consecutive chunks,
or as slices over a VAE-CP group, through the ``CausalCache`` interface of ``wan_vae`` /
``vae_cp``: each module takes what precedes its chunk from the cache. The upsampler emits each
chunk's last (look-ahead) frame with the next chunk, so the decoder runs one frame late from
there on, and the side path joining after it is held back by one frame to match; the chunk that
ends the video (``at_end``) flushes both, with the end frame clamped as ``F.interpolate`` does.
Chunked, VAE-CP and whole-video results agree up to fp32 rounding (different conv shapes), for any
number of latent frames; the reference's tiled decode does not for an even number, and mm follows its
whole-video decode there (docs/opensoraplan.md).

Parameter names are the reference's (``opensora/models/causalvideovae`` at 4b14d58), so its state
dict loads after ``wfvae_checkpoint.wfvae_state_dict_from_reference`` drops the fixed Haar filters it stores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm.models.ae.vae_cp import HaloCache, check_frames, gather_frames, split_counts
from mm.models.ae.wan_vae import CausalCache

HAAR_GAIN = 0.3536  # the reference's rounded 1 / (2 * sqrt(2)); its weights were trained with this value

# the released VAE's block choices: 2-D first side path, 3-D second, (4, 8, 8) compression
_FIXED_CHOICES = {
    "attention_type": "AttnBlock3DFix",
    "l1_dowmsample_block": "Downsample",
    "l1_downsample_wavelet": "HaarWaveletTransform2D",
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l1_upsample_block": "Upsample",
    "l1_upsample_wavelet": "InverseHaarWaveletTransform2D",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
}


@dataclass
class WFVAEConfig:
    """The reference ``WFVAEModel`` config keys (the model JSON's ``ae`` section, ``model_id: wfvae``).
    Defaults are the released v1.3 VAE's."""

    latent_dim: int = 8
    base_channels: int = 128
    encoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 64
    decoder_num_resblocks: int = 2
    decoder_energy_flow_hidden_size: int = 128
    connect_res_layer_num: int = 2
    use_attention: bool = True
    dropout: float = 0.0
    norm_type: str = "layernorm"
    t_interpolation: str = "trilinear"
    # latents the DiT sees: (z - shift) * scale, per channel (the OpenSoraPlan pipeline's normalisation)
    scale: list[float] = field(default_factory=lambda: [0.18215] * 8)
    shift: list[float] = field(default_factory=lambda: [0.0] * 8)
    attention_type: str = "AttnBlock3DFix"
    l1_dowmsample_block: str = "Downsample"
    l1_downsample_wavelet: str = "HaarWaveletTransform2D"
    l2_dowmsample_block: str = "Spatial2xTime2x3DDownsample"
    l2_downsample_wavelet: str = "HaarWaveletTransform3D"
    l1_upsample_block: str = "Upsample"
    l1_upsample_wavelet: str = "InverseHaarWaveletTransform2D"
    l2_upsample_block: str = "Spatial2xTime2x3DUpsample"
    l2_upsample_wavelet: str = "InverseHaarWaveletTransform3D"
    # temporal chunking (the reference's "tiling"): encode this many frames after the first at a time,
    # decode this many latent frames at a time; equal to the whole video at once, less memory
    use_tiling: bool = False
    t_chunk_enc: int = 8
    t_chunk_dec: int = 2

    scale_factor_temporal = 4
    scale_factor_spatial = 8

    def __post_init__(self) -> None:
        problems = []
        if self.norm_type == "aelayernorm":  # MindSpeed-MM's name for the same layer norm
            self.norm_type = "layernorm"
        if self.norm_type != "layernorm":
            problems.append(f"ae.norm_type = {self.norm_type!r}; valid: layernorm (or aelayernorm). groupnorm "
                            "normalises over time, so chunked or VAE-CP encoding could not equal the whole video")
        if self.t_interpolation != "trilinear":
            problems.append(f"ae.t_interpolation = {self.t_interpolation!r}; valid: trilinear (the released v1.3 VAE's)")
        for key, valid in _FIXED_CHOICES.items():
            if getattr(self, key) != valid:
                problems.append(f"ae.{key} = {getattr(self, key)!r}; valid: {valid!r} (the v1.3 4x8x8 layout)")
        for key in ("latent_dim", "base_channels", "encoder_energy_flow_hidden_size", "decoder_energy_flow_hidden_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"ae.{key} = {getattr(self, key)!r}; valid: an integer >= 1")
        for key in ("encoder_num_resblocks", "decoder_num_resblocks", "connect_res_layer_num"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                problems.append(f"ae.{key} = {getattr(self, key)!r}; valid: an integer >= 0")
        for key in ("scale", "shift"):
            value = getattr(self, key)
            if not isinstance(value, list) or len(value) != self.latent_dim:
                problems.append(f"ae.{key} = {value!r}; valid: a list of latent_dim = {self.latent_dim} numbers")
        if 0.0 in (self.scale if isinstance(self.scale, list) else []):
            problems.append(f"ae.scale = {self.scale!r}; valid: non-zero numbers (latents are divided by them)")
        if not isinstance(self.t_chunk_enc, int) or self.t_chunk_enc < 4 or self.t_chunk_enc % 4:
            problems.append(f"ae.t_chunk_enc = {self.t_chunk_enc!r}; valid: a positive multiple of 4 (frames)")
        if not isinstance(self.t_chunk_dec, int) or self.t_chunk_dec < 1:
            problems.append(f"ae.t_chunk_dec = {self.t_chunk_dec!r}; valid: an integer >= 1 (latent frames)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_json(cls, params: dict) -> "WFVAEConfig":
        """From the model JSON's ``ae`` keys or the reference's config.json; unknown keys are an error."""
        valid = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in params.items() if not k.startswith("_")}
        # MindSpeed-MM's statements of the 4x8x8 compression (ae.vae_scale_factor, and the I2V processor's, which
        # mm's Open-Sora-Plan I2V conditioning is): checked, not configurable
        factors = [cls.scale_factor_temporal, cls.scale_factor_spatial, cls.scale_factor_spatial]
        if "vae_scale_factor" in values and values.pop("vae_scale_factor") != factors:
            raise ValueError(f"ae.vae_scale_factor = {params['vae_scale_factor']!r}; valid: {factors} (WFVAE's)")
        processor = values.pop("i2v_processor", None)
        if processor is not None:
            expected = {"processor_id": "opensoraplan_i2v_processor", "vae_scale_factor": factors}
            if not isinstance(processor, dict) or any(processor.get(k, v) != v for k, v in expected.items()) \
                    or set(processor) - set(expected):
                raise ValueError(f"ae.i2v_processor = {processor!r}; valid: {expected} (Open-Sora-Plan's I2V "
                                 "conditioning, which mm builds from the I2V predictor)")
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"ae keys {unknown} are not WFVAE parameters; valid: {sorted(valid)}")
        return cls(**values)


class ChunkCache(CausalCache):
    """``CausalCache`` for a video fed in consecutive chunks; ``last`` is set before the chunk that ends it."""

    def __init__(self, last: bool = False) -> None:
        super().__init__()
        self.last = last

    def at_end(self, module: nn.Module) -> bool:
        return self.last


def _frames_as_images(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``fn`` to every frame of ``x`` [b, c, t, h, w]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d whose time axis is padded only in the past, with ``kernel - 1`` copies of the video's first
    frame; later chunks take ``kernel - stride`` frames from the cache instead (strided ones assume
    chunks that start at a stride boundary)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=(0, *padding[1:]))
        self.time_kernel, self.handed_on = kernel[0], kernel[0] - stride[0]

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        if cache.at_start(self):
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1), x], dim=2)
            if self.handed_on:
                cache.previous(self, x, self.handed_on)
        elif self.handed_on:
            x = torch.cat([cache.previous(self, x, self.handed_on), x], dim=2)
        return self.conv(x)


class FrameConv2d(nn.Conv2d):
    """Conv2d applied to every frame."""

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return _frames_as_images(super().forward, x)


class LayerNorm(nn.Module):
    """LayerNorm over channels at every position (eps 1e-6)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ResnetBlock2D(nn.Module):
    """Per-frame residual block (encoder's first level)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = LayerNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = LayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return _frames_as_images(self._image, x)


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = LayerNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = LayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        return (x if self.nin_shortcut is None else self.nin_shortcut(x, cache)) + h


class AttnBlock3DFix(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = LayerNorm(channels)
        self.q, self.k, self.v, self.proj_out = (CausalConv3d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        h = self.norm(x)
        b, c, t, hh, ww = x.shape
        q, k, v = (m(h, cache).permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(out, cache)


class Downsample(nn.Module):
    """Per-frame 2x spatial downsampling: pad right/bottom by one, 3x3 convolution with stride 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return _frames_as_images(lambda y: self.conv(F.pad(y, (0, 1, 0, 1))), x)


class Spatial2xTime2x3DDownsample(nn.Module):
    """2x in time and space: pad right/bottom by one, causal 3x3x3 convolution with stride 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)), cache)


class Upsample(nn.Module):
    """Per-frame 2x nearest spatial upsampling and a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return _frames_as_images(lambda y: self.conv(F.interpolate(y, scale_factor=2.0, mode="nearest")), x)


class Spatial2xTime2x3DUpsample(nn.Module):
    """t -> 2t - 1 frames (the first frame stays one), 2x space, then a causal 3x3x3 convolution.

    Time follows ``F.interpolate(mode="trilinear", scale 2)`` on frames 1.. of the video: output 2j is
    ``y[j-1] / 4 + 3 y[j] / 4`` and 2j + 1 is ``3 y[j] / 4 + y[j+1] / 4``, clamped at both ends. The
    latter needs the next frame, so a chunk that does not end the video leaves its last one for the
    next chunk, which takes the frame it needs from the cache."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        start, end = cache.at_start(self), cache.at_end(self)
        before = cache.previous(self, x, 1)
        frames, y = ([x[:, :, :1]], x[:, :, 1:]) if start else ([], x)
        if start and not end and y.shape[2] == 0:
            raise ValueError("WFVAE decode: the first chunk must hold at least 2 latent frames")
        if y.shape[2]:
            if before is None:  # frame 1 of the video: clamped, nothing pending
                frames.append(y[:, :, :1])
                pairs = (y[:, :, :-1], y[:, :, 1:])
            else:
                pairs = (torch.cat([before, y[:, :, :-1]], dim=2), y)
            late, early = 0.75 * pairs[0] + 0.25 * pairs[1], 0.25 * pairs[0] + 0.75 * pairs[1]
            frames.append(torch.stack([late, early], dim=3).flatten(2, 3))
            if end:
                frames.append(y[:, :, -1:])
        x = torch.cat(frames, dim=2)
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear"), cache)


class FrameDelay(nn.Module):
    """Holds a stream back by one frame until the video's end (matches the upsampler's look-ahead)."""

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        end = cache.at_end(self)
        before = cache.previous(self, x, 1)
        x = x if before is None else torch.cat([before, x], dim=2)
        return x if end else x[:, :, :-1]


def haar_filters(dims: int) -> torch.Tensor:
    """The reference's sub-band filters, in its order: [bands, 1, 2, ...] with bands = 2 ** dims."""
    low, high = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    if dims == 3:  # band = 4 * time_high + 2 * height_high + width_high
        bands = [torch.einsum("i,j,k->ijk", t, h, w) * HAAR_GAIN
                 for t in (low, high) for h in (low, high) for w in (low, high)]
    else:  # band order: low-low, height-high, width-high, both high
        bands = [torch.outer(h, w) / 2 for w in (low, high) for h in (low, high)]
    return torch.stack(bands).unsqueeze(1)


class HaarWavelet3D(nn.Module):
    """[b, c, t, h, w] -> [b, 8c, (t + 1) / 2, h / 2, w / 2] (channel = band * c + channel); causal in time:
    the first frame is paired with a copy of itself."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filters", haar_filters(3), persistent=False)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        if cache.at_start(self):
            x = torch.cat([x[:, :, :1], x], dim=2)
        b, c = x.shape[:2]
        y = F.conv3d(x.reshape(b * c, 1, *x.shape[2:]), self.filters.to(x.dtype), stride=2)
        return y.view(b, c, 8, *y.shape[2:]).transpose(1, 2).reshape(b, 8 * c, *y.shape[2:])


class InverseHaarWavelet3D(nn.Module):
    """[b, 8c, t, h, w] -> [b, c, 2t - 1, 2h, 2w] (the copy of the first frame is dropped)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filters", haar_filters(3), persistent=False)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        b, c8 = x.shape[:2]
        y = x.view(b, 8, c8 // 8, *x.shape[2:]).transpose(1, 2).reshape(b * c8 // 8, 8, *x.shape[2:])
        y = F.conv_transpose3d(y, self.filters.to(x.dtype), stride=2)
        y = y.view(b, c8 // 8, *y.shape[2:])
        return y[:, :, 1:] if cache.at_start(self) else y


class HaarWavelet2D(nn.Module):
    """Per frame: [b, c, t, h, w] -> [b, 4c, t, h / 2, w / 2]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filters", haar_filters(2), persistent=False)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), self.filters.to(x.dtype), stride=2)
        return y.view(n, c, 4, *y.shape[2:]).transpose(1, 2).reshape(n, 4 * c, *y.shape[2:])

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return _frames_as_images(self._image, x)


class InverseHaarWavelet2D(HaarWavelet2D):
    """Per frame: [b, 4c, t, h, w] -> [b, c, t, 2h, 2w]."""

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        n, c4 = x.shape[:2]
        y = x.view(n, 4, c4 // 4, *x.shape[2:]).transpose(1, 2).reshape(n * c4 // 4, 4, *x.shape[2:])
        y = F.conv_transpose2d(y, self.filters.to(x.dtype), stride=2)
        return y.view(n, c4 // 4, *y.shape[2:])


def _run(blocks: nn.ModuleList, x: torch.Tensor, cache) -> torch.Tensor:
    for block in blocks:
        x = block(x, cache)
    return x


def _mid(in_channels: int, channels: int, out_channels: int, dropout: float, attention: bool) -> nn.ModuleList:
    layers = [ResnetBlock3D(in_channels, channels, dropout), ResnetBlock3D(channels, out_channels, dropout)]
    if attention:
        layers.insert(1, AttnBlock3DFix(channels))
    return nn.ModuleList(layers)


class Encoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        base, flow, n, p = cfg.base_channels, cfg.encoder_energy_flow_hidden_size, cfg.encoder_num_resblocks, cfg.dropout
        self.down1 = nn.ModuleList([FrameConv2d(24, base, 3, padding=1),
                                    *(ResnetBlock2D(base, base, p) for _ in range(n)), Downsample(base, base)])
        self.down2 = nn.ModuleList([FrameConv2d(base + flow, 2 * base, 3, padding=1),
                                    *(ResnetBlock3D(2 * base, 2 * base, p) for _ in range(n)),
                                    Spatial2xTime2x3DDownsample(2 * base, 2 * base)])
        self.connect_l1 = FrameConv2d(12, flow, 3, padding=1)
        self.connect_l2 = FrameConv2d(24, flow, 3, padding=1)
        self.mid = _mid(2 * base + flow, 4 * base, 4 * base, p, cfg.use_attention)
        self.norm_out = LayerNorm(4 * base)
        self.conv_out = CausalConv3d(4 * base, 2 * cfg.latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWavelet3D()
        self.wavelet_transform_l1 = HaarWavelet2D()
        self.wavelet_transform_l2 = HaarWavelet3D()

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        """[b, 3, 1 + 4k, H, W] -> [b, 2 * latent_dim, 1 + k, H / 8, W / 8] (mean and log-variance)."""
        coeffs = self.wavelet_transform_in(x, cache)
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3])
        l2_coeffs = self.wavelet_transform_l2(l1_coeffs[:, :3], cache)
        h = torch.cat([_run(self.down1, coeffs, cache), self.connect_l1(l1_coeffs)], dim=1)
        h = torch.cat([_run(self.down2, h, cache), self.connect_l2(l2_coeffs)], dim=1)
        h = _run(self.mid, h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        base, flow, n, p = cfg.base_channels, cfg.decoder_energy_flow_hidden_size, cfg.decoder_num_resblocks, cfg.dropout
        self.flow = flow
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * base, 3, padding=1)
        self.mid = _mid(4 * base, 4 * base, 4 * base + flow, p, cfg.use_attention)
        self.up2 = nn.ModuleList([*(ResnetBlock3D(4 * base, 4 * base, p) for _ in range(n)),
                                  Spatial2xTime2x3DUpsample(4 * base, 4 * base),
                                  ResnetBlock3D(4 * base, 4 * base + flow, p)])
        self.up1 = nn.ModuleList([*(ResnetBlock3D(4 * base if i == 0 else 2 * base, 2 * base, p) for i in range(n)),
                                  Upsample(2 * base, 2 * base), ResnetBlock3D(2 * base, 2 * base, p)])
        self.layer = nn.ModuleList([ResnetBlock3D(2 * base, base, p), ResnetBlock3D(base, base, p)])
        self.connect_l1 = nn.ModuleList([*(ResnetBlock3D(flow, flow, p) for _ in range(cfg.connect_res_layer_num)),
                                         FrameConv2d(flow, 12, 3, padding=1)])
        self.connect_l2 = nn.ModuleList([*(ResnetBlock3D(flow, flow, p) for _ in range(cfg.connect_res_layer_num)),
                                         FrameConv2d(flow, 24, 3, padding=1)])
        self.norm_out = LayerNorm(base)
        self.conv_out = FrameConv2d(base, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWavelet3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWavelet2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWavelet3D()
        self.l2_delay = FrameDelay()

    def forward(self, z: torch.Tensor, cache) -> torch.Tensor:
        """[b, latent_dim, 1 + k, h, w] -> [b, 3, 1 + 4k, 8h, 8w] (streamed: see the module docstring)."""
        h = _run(self.mid, self.conv_in(z, cache), cache)
        l2 = self.inverse_wavelet_transform_l2(_run(self.connect_l2, h[:, -self.flow:], cache), cache)
        l2 = self.l2_delay(l2, cache)
        h = _run(self.up2, h[:, :-self.flow], cache)
        l1_coeffs = _run(self.connect_l1, h[:, -self.flow:], cache)
        l1 = self.inverse_wavelet_transform_l1(torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1))
        h = _run(self.layer, _run(self.up1, h[:, :-self.flow], cache), cache)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.inverse_wavelet_transform_out(torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1), cache)


class WFVAE(nn.Module):
    """``encode(video [b, 3, 1 + 4k, H, W] in [-1, 1]) -> (mean, logvar)`` of the latent distribution
    ``[b, latent_dim, 1 + k, H / 8, W / 8]``; ``decode(z) -> video`` (not clamped, as the reference);
    ``normalize`` / ``denormalize`` apply the pipeline's ``(z - shift) * scale``."""

    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("scale", torch.tensor(cfg.scale).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(cfg.shift).view(1, -1, 1, 1, 1), persistent=False)

    def encode(self, video: torch.Tensor, vae_cp: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``vae_cp = (group, ranks)``: share the frames over a VAE-CP group (every rank passes the same
        video and gets the whole result)."""
        video = video.to(self.compute_dtype)  # the VAE computes in its own dtype (patch.ae_float32)
        frames = video.shape[2]
        if (frames - 1) % 4:
            raise ValueError(f"WFVAE encodes 1 + 4k frames; got {frames}")
        if vae_cp is not None:
            group, ranks = vae_cp
            check_frames(frames, len(ranks), "video")
            halo = HaloCache(group, ranks)
            counts = split_counts((frames - 1) // 4, len(ranks))
            start = 1 + 4 * sum(counts[: halo.index]) if halo.index else 0
            end = 1 + 4 * sum(counts[: halo.index + 1])
            h = gather_frames(self.encoder(video[:, :, start:end], halo),
                              [n + (1 if i == 0 else 0) for i, n in enumerate(counts)], group)
        elif self.cfg.use_tiling:
            cache, bounds = ChunkCache(), [0, *range(1, frames, self.cfg.t_chunk_enc), frames]
            h = torch.cat([self.encoder(video[:, :, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
        else:
            h = self.encoder(video, ChunkCache(last=True))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of its weights, which ``encode`` and ``decode`` cast their input to."""
        return next(self.parameters()).dtype

    def decode(self, z: torch.Tensor, vae_cp: tuple | None = None) -> torch.Tensor:
        z = z.to(self.compute_dtype)  # the VAE computes in its own dtype (patch.ae_float32)
        latents = z.shape[2]
        if vae_cp is not None:
            group, ranks = vae_cp
            check_frames(latents, len(ranks), "latent")
            halo = HaloCache(group, ranks)
            counts = split_counts(latents - 1, len(ranks))
            counts[0] += 1  # rank 0 also decodes the first latent frame
            start = sum(counts[: halo.index])
            piece = self.decoder(z[:, :, start:start + counts[halo.index]], halo)
            last = len(ranks) - 1
            # 4 frames per latent frame (1 for the first); the upsampler's look-ahead moves one upsampled
            # frame (2 output frames) from each rank to the next
            sizes = [4 * n - (3 if i == 0 else 0) - (2 if i < last else 0) + (2 if i > 0 else 0)
                     for i, n in enumerate(counts)]
            return gather_frames(piece, sizes, group)
        if self.cfg.use_tiling and latents > 1 + self.cfg.t_chunk_dec:
            cache, step, pieces = ChunkCache(), self.cfg.t_chunk_dec, []
            for s in range(0, latents - 1, step):
                chunk = z[:, :, s + (1 if s else 0):s + 1 + step]
                cache.last = s + 1 + step >= latents
                pieces.append(self.decoder(chunk, cache))
            return torch.cat(pieces, dim=2)
        return self.decoder(z, ChunkCache(last=True))

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the latent distribution (``torch.randn`` of ``mean``'s shape, as the reference)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift.to(latents)) * self.scale.to(latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale.to(latents) + self.shift.to(latents)

