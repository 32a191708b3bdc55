"""The Wan CLIP oracle fixture (tests/fixtures/wan_original/clip_*, made by the reference Wan2.1 at
9737cba, ``wan/modules/clip.py``): the deterministic weights it was made from, writing them as the
release file lays them out, reading the fixture back, and importing the reference from a checkout
(``MM_WAN_REF``) for the generator and the live test.

The weights are not stored (a tiny tower's weights are megabytes): each is made from its name by
``hashed_uniform`` (integer arithmetic, the same numbers on every machine); the fixture records their
names, shapes and sums so a test can tell they were re-made exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch

from tests.module_stubs import modules_replaced
from tests.stepvideo_vae_helpers import hashed_uniform

FIXTURES = Path(__file__).parent / "fixtures" / "wan_original"
REF_ENV = "MM_WAN_REF"
REF_COMMIT = "9737cba"
GOLDEN_JSON = FIXTURES / "clip_golden.json"
GOLDEN_TENSORS = FIXTURES / "clip_io.safetensors"


def fill_value(name: str, shape) -> torch.Tensor:
    """The fixture's value of the tensor ``name`` (the release file's name), float32: matrices and
    convolutions uniform with variance 1 / fan-in (the class and position embeddings, which are added
    to the tokens, variance 1 / width), LayerNorm gains 1 +- 0.2, biases and the rest +- 0.05 ... 0.1."""
    u = hashed_uniform(name, tuple(shape))
    if name.endswith(("cls_embedding", "pos_embedding")):
        return (u * math.sqrt(3.0 / shape[-1])).float()
    if len(shape) > 1:
        return (u * math.sqrt(3.0 / math.prod(shape[1:]))).float()
    if name.endswith(".weight") and "norm" in name:
        return (1.0 + 0.2 * u).float()
    return (0.1 * u if "norm" in name else 0.05 * u).float()


def release_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Every tensor of ``shapes`` (the release file's names) as ``fill_value`` makes it."""
    return {name: fill_value(name, shape) for name, shape in shapes.items()}


def write_release_file(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A ``.pth`` as Wan's release file lays its weights out: ``torch.save`` of the flat state dict of
    ``XLMRobertaCLIP`` (``visual.*``, ``textual.*``, ``log_scale``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(release_state(shapes), path)
    return path


def golden() -> dict:
    return json.loads(GOLDEN_JSON.read_text())


def golden_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_TENSORS))


def import_reference(root) -> types.ModuleType:
    """The reference's ``wan/modules/clip.py`` (with the ``xlm_roberta.py`` beside it, unchanged) from a
    checkout of Wan2.1 at 9737cba. The package ``__init__`` files are skipped (they import the DiT, the
    VAE and T5). Stubbed, for the import only:

    * ``wan.modules.attention.flash_attention``: the release calls flash-attn (CUDA, half precision);
      here it is ``torch.nn.functional.scaled_dot_product_attention`` in the inputs' dtype (float32) with
      the same layout ([b, s, heads, head width] in and out), scale (``softmax_scale`` or 1 / sqrt(head
      width)) and ``causal`` flag, and no dropout (the tower is in eval mode);
    * ``wan.modules.tokenizers``: the text tokenizer (it needs ftfy), which the image tower never uses;
    * ``torchvision.transforms``, only where torchvision is not installed: ``Normalize`` as torchvision
      computes it on a tensor (``(x - mean[:, None, None]) / std[:, None, None]``); ``Resize`` and
      ``ToTensor``, which ``CLIPModel.visual`` does not run, as placeholders.
    """
    root = Path(root)
    source = root / "wan" / "modules" / "clip.py"
    if not source.is_file():
        raise FileNotFoundError(f"{REF_ENV} = {str(root)!r}: no wan/modules/clip.py there (a checkout of "
                                f"Wan-Video/Wan2.1 at {REF_COMMIT})")
    name = "_wan_ref.modules.clip"
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType("_wan_ref")
    package.__path__ = [str(root / "wan")]
    modules = types.ModuleType("_wan_ref.modules")
    modules.__path__ = [str(root / "wan" / "modules")]
    attention = types.ModuleType("_wan_ref.modules.attention")
    attention.flash_attention = _sdpa_flash_attention
    tokenizers = types.ModuleType("_wan_ref.modules.tokenizers")
    tokenizers.HuggingfaceTokenizer = None
    stubs = {"_wan_ref": package, "_wan_ref.modules": modules, "_wan_ref.modules.attention": attention,
             "_wan_ref.modules.tokenizers": tokenizers}
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        stubs.update(_torchvision_stub())
    vision = {k: v for k, v in stubs.items() if k.startswith("torchvision")}  # only while importing
    sys.modules.update({k: v for k, v in stubs.items() if k not in vision})
    with modules_replaced(vision):
        for module_name in ("xlm_roberta", "clip"):
            spec = importlib.util.spec_from_file_location(f"_wan_ref.modules.{module_name}",
                                                          root / "wan" / "modules" / f"{module_name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    module.torchvision_stubbed = bool(vision)
    return module


def _sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                          causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                          version=None):
    """``flash_attention`` of Wan's ``attention.py`` for full-length sequences, in the inputs' dtype."""
    if q_lens is not None or k_lens is not None or window_size != (-1, -1):
        raise NotImplementedError("the stub covers full-length sequences without a window (all the CLIP tower uses)")
    if q_scale is not None:
        q = q * q_scale
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal,
        scale=softmax_scale)
    return out.transpose(1, 2).type(q.dtype)


def _torchvision_stub() -> dict[str, types.ModuleType]:
    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, x):
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            return x.sub(mean).div(std)

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

    class Placeholder:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, x):
            raise NotImplementedError("a placeholder of the torchvision stub")

    transforms = types.ModuleType("torchvision.transforms")
    transforms.Normalize, transforms.Compose = Normalize, Compose
    transforms.Resize = transforms.ToTensor = Placeholder
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    return {"torchvision": torchvision, "torchvision.transforms": transforms}
