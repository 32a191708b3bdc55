"""The Step-Video VAE oracle fixture (tests/fixtures/stepvideo/, made by the reference Step-Video-T2V at
675e08c): the deterministic weights and inputs it was made from, reading it back, and importing the
reference from a checkout (``MM_STEP_VIDEO_REF``) for the live tests.

Weights and videos are not stored (a tiny model's weights are megabytes): they are made from their
names by ``hashed_uniform``, integer arithmetic only, so every machine gets the same numbers; the
fixture records their names, shapes and sums so a test can tell they were re-made exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys
import types
import zlib
from pathlib import Path

import torch

from tests.module_stubs import modules_replaced

FIXTURES = Path(__file__).parent / "fixtures" / "stepvideo"
REF_ENV = "MM_STEP_VIDEO_REF"
REF_COMMIT = "675e08c0dd08aaf60b4da1a2ce57e9bd0d8af31c"

_MASK = 2**31 - 1  # values stay below 2**31, so x * 1103515245 stays below 2**61: exact in int64


def hashed_uniform(name: str, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Numbers in [-1, 1) of the given shape, a fixed function of ``name`` (CRC-32 seed; per element index,
    three rounds of a 31-bit linear congruential step and an xor-shift)."""
    n = math.prod(shape)
    x = (torch.arange(n, dtype=torch.int64) + zlib.crc32(name.encode()) + 1) & _MASK
    for _ in range(3):
        x = (x * 1103515245 + 12345) & _MASK
        x ^= x >> 13
    return (x.to(torch.float64) / 2**30 - 1).reshape(shape).to(dtype)


def fill_value(name: str, shape) -> torch.Tensor:
    """The fixture's value of the parameter ``name`` (release names): convolution weights uniform with
    variance 1 / fan-in, GroupNorm gains 1 +- 0.2, biases +- 0.05 (float64)."""
    u = hashed_uniform(name, shape)
    if len(shape) > 1:
        return u * math.sqrt(3.0 / math.prod(shape[1:]))
    if name.endswith(".weight"):
        return 1.0 + 0.2 * u
    return 0.05 * u


def filled_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Every weight of ``shapes`` (release names) as ``fill_value`` makes it (fresh tensors each call)."""
    key = json.dumps(shapes)
    return {name: value.clone() for name, value in _filled(key).items()}


@functools.lru_cache(maxsize=4)
def _filled(key: str) -> dict[str, torch.Tensor]:
    return {name: fill_value(name, tuple(shape)) for name, shape in json.loads(key).items()}


def fixture_meta() -> dict:
    return json.loads((FIXTURES / "vae_fixture.json").read_text())


def fixture_outputs() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "vae_outputs.safetensors"))


def case_video(case: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The case's input video [b, 3, t, h, w] in [-1, 1)."""
    return hashed_uniform(f"video/{case['name']}", tuple(case["video_shape"]), dtype)


def import_reference(root: str | os.PathLike):
    """The reference's ``stepvideo/vae/vae.py`` as a module, from a checkout at 675e08c. The package
    ``__init__`` files are skipped (``stepvideo/__init__.py`` imports the DiT pipeline, which needs xfuser
    and CUDA; ``stepvideo/utils/__init__.py`` imports imageio for video files): ``stepvideo.utils`` is
    ``stepvideo/utils/utils.py`` itself, which holds the ``with_empty_init`` the VAE imports. Nothing else
    is replaced: the VAE runs on the CPU as it is."""
    root = Path(root)
    source = root / "stepvideo" / "vae" / "vae.py"
    if not source.is_file():
        raise FileNotFoundError(f"{REF_ENV} = {str(root)!r}: no stepvideo/vae/vae.py there (a checkout of "
                                f"stepfun-ai/Step-Video-T2V at {REF_COMMIT[:7]})")
    name = "_stepvideo_ref_vae"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location("_stepvideo_ref_utils", root / "stepvideo" / "utils" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    # the VAE's "from stepvideo.utils import with_empty_init", for the duration of its import only
    package = types.ModuleType("stepvideo")
    package.__path__ = [str(root / "stepvideo")]
    with modules_replaced({"stepvideo": package, "stepvideo.utils": utils}):
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def reference_vae(ref, config: dict, weights_file: str, dtype: torch.dtype = torch.float64):
    """The reference's ``AutoencoderKL`` with the widths of ``config`` (mm's ``ae`` keys) in ``dtype``,
    loading ``weights_file`` (release names) through its own loader (``init_from_ckpt``: the rename;
    ``load_from_dict``: a strict load). The reference builds its encoder and decoder with their default
    widths, so the two classes are given the config's widths for the duration; it is built without
    weights, cast, then loaded, so that float64 weights stay float64."""
    encoder, decoder = ref.VideoEncoder, ref.VideoDecoder
    ref.VideoEncoder = functools.partial(encoder, ch=config["encoder_ch"], ch_mult=tuple(config["encoder_ch_mult"]))
    ref.VideoDecoder = functools.partial(decoder, ch=config["decoder_ch"], ch_mult=tuple(config["decoder_ch_mult"]))
    try:
        model = ref.AutoencoderKL(z_channels=config["z_channels"], num_res_blocks=config["num_res_blocks"],
                                  version=config["version"])
    finally:
        ref.VideoEncoder, ref.VideoDecoder = encoder, decoder
    model = model.to(dtype).eval()
    model.load_from_dict(model.init_from_ckpt(weights_file))
    return model


def reference_shapes(ref, config: dict | None = None) -> dict[str, list[int]]:
    """Names (the release file's) and shapes of the reference's VAE weights, built on the meta device:
    the released VAE of ``config["version"]`` when ``config`` gives no widths, else that tiny one."""
    config = dict(config or {})
    version = config.get("version", 2)
    z = config.get("z_channels") or {1: 16, 2: 64}[version]
    encoder, decoder = ref.VideoEncoder, ref.VideoDecoder
    if "encoder_ch" in config:
        ref.VideoEncoder = functools.partial(encoder, ch=config["encoder_ch"], ch_mult=tuple(config["encoder_ch_mult"]))
        ref.VideoDecoder = functools.partial(decoder, ch=config["decoder_ch"], ch_mult=tuple(config["decoder_ch_mult"]))
    try:
        model = ref.AutoencoderKL.__new__(ref.AutoencoderKL)
        with torch.device("meta"):  # the constructor without its empty-init wrapper, which forces the CPU
            ref.AutoencoderKL.__init__.__wrapped__(model, z_channels=z, version=version,
                                                   num_res_blocks=config.get("num_res_blocks", 2))
    finally:
        ref.VideoEncoder, ref.VideoDecoder = encoder, decoder
    return {to_release(k): list(v.shape) for k, v in model.state_dict().items()}


def to_release(name: str) -> str:
    """The reference model's parameter name -> the release file's (the inverse of its loader's rename)."""
    return name.replace("decoder.conv_out.conv.", "decoder.conv_out.", 1) if name.startswith("decoder.conv_out.conv.") \
        else name


def run_reference(ref, model, video: torch.Tensor, decode_rows: int) -> dict[str, torch.Tensor]:
    """The reference's encode (its posterior's mean and clamped log-variance, read from the
    ``DiagonalGaussianDistribution`` its ``encode`` builds) of ``video`` [b, 3, t, h, w], and its decode of
    the first ``decode_rows`` means; all channels-first like mm's."""
    made = []

    class Recording(ref.DiagonalGaussianDistribution):
        def __init__(self, parameters, *args, **kwargs):
            super().__init__(parameters, *args, **kwargs)
            made.append(self)

    original = ref.DiagonalGaussianDistribution
    ref.DiagonalGaussianDistribution = Recording
    try:
        ref.base_group_norm.spatial = model.encoder.version == 2  # a module-wide switch the constructor sets
        model.encode(video.transpose(1, 2).contiguous())  # the reference takes [b, t, c, h, w]
    finally:
        ref.DiagonalGaussianDistribution = original
    (posterior,) = made
    mean, logvar = posterior.mean.clone(), posterior.logvar.clone()
    decoded = model.decode(mean[:decode_rows].clone()).clone()
    return {"mean": mean.transpose(1, 2).contiguous(), "logvar": logvar.transpose(1, 2).contiguous(),
            "decoded": decoded.transpose(1, 2).contiguous()}


def mm_vae_from_fixture(case: dict, directory: Path, dtype: torch.dtype = torch.float64):
    """mm's VAE for a fixture case, loaded by ``load_stepvideo_vae`` from a release-layout file written to
    ``directory`` from the re-made weights (release names)."""
    from safetensors.torch import save_file

    from mm.families.stepvideo.vae import RELEASE_FILES, load_stepvideo_vae

    config = case["config"]
    directory.mkdir(parents=True, exist_ok=True)
    save_file(filled_state(case["weights"]), str(directory / RELEASE_FILES[config["version"]]))
    return load_stepvideo_vae(str(directory), dtype, config)
