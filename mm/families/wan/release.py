"""Wan's and Phantom's own generate configuration and release directories, as mm's model JSON.

A Wan or Phantom user's generate settings (``generate.py``'s arguments: ``task``, ``size``,
``ckpt_dir``, ``phantom_ckpt``, ``sample_steps`` ...) can stand in the model JSON's ``inference``
section as they are. ``expand`` turns them into mm's own terms before anything is validated:

- ``task``: Wan's task names (``WAN_TASKS``: Wan2.1's t2v-1.3B / t2v-14B / i2v-14B / flf2v-14B,
  Phantom's s2v-1.3B / s2v-14B, Wan2.2's ti2v-5B / t2v-A14B / i2v-A14B), each naming mm's sampling
  task, the sizes Wan supports for it and its defaults from Wan's configs (sample steps, shift,
  guidance, frames, frame rate, the negative prompt Wan's pipelines use when none is given).
- ``size``: ``"W*H"`` (width first, as Wan's ``SIZE_CONFIGS`` keys), one of the task's sizes.
- ``null`` for ``sample_steps``, ``sample_shift``, ``sample_guide_scale``, ``frame_num``: the
  task's default (Wan's ``_validate_args`` rules: Wan2.1 I2V at 480p shifts by 3, FLF2V by 16).
- ``ckpt_dir``: Wan's release directory as downloaded (``RELEASE_FILES``); the ``predictor``,
  ``ae``, ``text_encoder`` and ``image_encoder`` sections left out of the JSON are built from it
  (a section that is given is kept as it is). ``phantom_ckpt``: Phantom's DiT weights (its
  ``.pth``, or the directory of its sharded safetensors), with the base model's config.json from
  ``ckpt_dir``. Wan2.2 A14B's two experts are the directory's ``high_noise_model`` (the predictor)
  and ``low_noise_model`` (``inference.low_noise_model``, with the task's ``boundary_ratio``).

The DiT's architecture is read from the files (config.json and the tensors' shapes), not from the
task's config: the task's dimensions only produce a note when the files differ from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Wan's configs (wan/configs/shared_config.py, Wan2.1 and Wan2.2): the negative prompt every
# pipeline uses when it is given none; I2V prefixes it with "camera shake", FLF2V with "camera cut"
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                       "杂乱的背景，三条腿，背景人很多，倒着走")
I2V_NEGATIVE_PROMPT = "镜头晃动，" + WAN_NEGATIVE_PROMPT
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT

SIZES_480P = ("480*832", "832*480")
SIZES_720P_480P = ("720*1280", "1280*720", "480*832", "832*480")
SMALL = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
LARGE = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

# a release directory's files (Wan's configs: t5_checkpoint, t5_tokenizer, vae_checkpoint,
# clip_checkpoint, low/high_noise_checkpoint)
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE21_FILE, VAE22_FILE = "Wan2.1_VAE.pth", "Wan2.2_VAE.pth"
EXPERTS = ("high_noise_model", "low_noise_model")


@dataclass(frozen=True)
class WanTask:
    """One of Wan's task names: what it samples and its defaults in Wan's configs."""

    name: str
    task: str  # mm's sampling task
    origin: str  # whose generate.py names it
    sizes: tuple[str, ...]
    sample_steps: int
    sample_shift: float
    guidance: float | tuple[float, float]  # A14B: (low-noise expert's, high-noise expert's)
    arch: dict[str, int]  # Wan's config: dim, ffn_dim, num_heads, num_layers
    num_frames: int = 81
    fps: int = 16
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    vae_file: str = VAE21_FILE
    clip: bool = False  # Wan2.1 I2V/FLF2V's CLIP image branch
    shift_480p: float | None = None  # Wan2.1 I2V: the shift at 480p sizes
    boundary_ratio: float | None = None  # A14B: where the low-noise expert takes over
    phantom: bool = False  # the DiT's weights come from phantom_ckpt
    image_task: str | None = None  # the sampling task when an image is given (Wan2.2 TI2V: i2v)
    # with an image, ``size`` is the largest area and the image's aspect ratio shapes the video:
    # "aspect" (Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B), "best" (Wan2.2 TI2V's best_output_size)
    image_sizing: str | None = None

    @property
    def experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def default_size(self) -> str:
        """Wan's generate.py defaults to 1280*720; the tasks without it take their landscape size."""
        return next((s for s in ("1280*720", "832*480", "1280*704") if s in self.sizes), self.sizes[0])

    def shift_for(self, size: str) -> float:
        return self.shift_480p if self.shift_480p is not None and size in SIZES_480P else self.sample_shift


WAN_TASKS: dict[str, WanTask] = {t.name: t for t in (
    WanTask("t2v-1.3B", "t2v", "Wan2.1", SIZES_480P, 50, 5.0, 5.0, SMALL),
    WanTask("t2v-14B", "t2v", "Wan2.1", SIZES_720P_480P, 50, 5.0, 5.0, LARGE),
    WanTask("i2v-14B", "i2v", "Wan2.1", SIZES_720P_480P, 40, 5.0, 5.0, LARGE, negative_prompt=I2V_NEGATIVE_PROMPT,
            clip=True, shift_480p=3.0, image_sizing="aspect"),
    WanTask("flf2v-14B", "flf2v", "Wan2.1", SIZES_720P_480P, 50, 16.0, 5.0, LARGE,
            negative_prompt=FLF2V_NEGATIVE_PROMPT, clip=True, image_sizing="aspect"),
    WanTask("s2v-1.3B", "s2v", "Phantom", ("832*480",), 50, 5.0, 5.0, SMALL, phantom=True),
    WanTask("s2v-14B", "s2v", "Phantom", ("832*480", "1280*720"), 50, 5.0, 5.0, LARGE, phantom=True),
    WanTask("ti2v-5B", "t2v", "Wan2.2", ("704*1280", "1280*704"), 50, 5.0, 5.0,
            dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30), num_frames=121, fps=24, vae_file=VAE22_FILE,
            image_task="i2v", image_sizing="best"),
    WanTask("t2v-A14B", "t2v", "Wan2.2", SIZES_720P_480P, 40, 12.0, (3.0, 4.0), LARGE, boundary_ratio=0.875),
    WanTask("i2v-A14B", "i2v", "Wan2.2", SIZES_720P_480P, 40, 5.0, (3.5, 3.5), LARGE, boundary_ratio=0.9,
            image_sizing="aspect"),
)}

# the inference keys Wan's and Phantom's generate.py take that mm reads (beyond mm's own and their aliases)
GENERATE_KEYS = ("size", "ckpt_dir", "phantom_ckpt")
IMAGE_KEYS = ("image", "conditional_pixel_values_path", "first_frame")
# keys whose null means "the task's default", as in Wan's generate.py
NULL_MEANS_DEFAULT = ("sample_steps", "sample_shift", "sample_guide_scale", "frame_num", "num_frames",
                      "num_inference_steps", "flow_shift", "guidance_scale", "sample_fps", "fps")


def task_size(spec: WanTask, value: Any, problems: list[str]) -> tuple[int, int] | None:
    """``size`` (``"W*H"``) -> (width, height) when it is one of the task's sizes (Wan checks the same)."""
    if not isinstance(value, str) or value.replace(" ", "") not in spec.sizes:
        problems.append(f"inference.size = {value!r} is not a size Wan supports for task {spec.name!r}; valid: "
                        f"{', '.join(spec.sizes)} (width*height)")
        return None
    width, height = value.replace(" ", "").split("*")
    return int(width), int(height)


def _given(section: dict, *names: str) -> bool:
    return any(section.get(n) is not None for n in names)


def task_defaults(spec: WanTask, size: str | None) -> dict[str, Any]:
    """The inference keys (mm's names) a Wan task sets where the section gives none."""
    defaults = {"sample_steps": spec.sample_steps, "sample_shift": spec.shift_for(size or spec.default_size),
                "num_frames": spec.num_frames, "fps": spec.fps, "negative_prompt": spec.negative_prompt}
    if isinstance(spec.guidance, tuple):
        defaults["sample_guide_scale"] = list(spec.guidance)  # Wan2.2's (low-noise, high-noise) pair
    else:
        defaults["guidance_scale"] = spec.guidance
    return defaults


# where each default may already be given, under mm's name or an alias
_DEFAULT_KEYS = {"sample_steps": ("sample_steps", "num_inference_steps"), "sample_shift": ("sample_shift", "flow_shift"),
                 "num_frames": ("num_frames", "frame_num"), "fps": ("fps", "sample_fps"),
                 "negative_prompt": ("negative_prompt",), "guidance_scale": ("guidance_scale", "sample_guide_scale"),
                 "sample_guide_scale": ("guidance_scale", "sample_guide_scale")}


def expand(data: dict[str, Any], problems: list[str], notes: list[str]) -> dict[str, Any]:
    """The model JSON with a Wan task name (and ``ckpt_dir``) in its ``inference`` section, in mm's
    terms; problems name the user's keys. ``notes``: what the user should know (not errors)."""
    section = dict(data.get("inference") or {})
    spec = WAN_TASKS[section["task"]]
    out = dict(data)
    for key in NULL_MEANS_DEFAULT:
        if key in section and section[key] is None:
            del section[key]
    size = section.pop("size", None)
    if size is not None:
        if _given(section, "height", "width"):
            problems.append(f"inference.size = {size!r} and inference.height/width: give one or the other")
        else:
            wh = task_size(spec, size, problems)
            if wh is not None:
                section["width"], section["height"] = wh
    elif not _given(section, "height", "width"):
        size = spec.default_size
        section["width"], section["height"] = task_size(spec, size, problems)
    if size is None:  # given as height and width
        size = f"{section.get('width')}*{section.get('height')}"
    elif spec.image_sizing and _given(section, *IMAGE_KEYS) and "width" in section:
        _size_by_image(spec, section, problems)
    for key, value in task_defaults(spec, size if isinstance(size, str) else None).items():
        if not _given(section, *_DEFAULT_KEYS[key]):
            section[key] = value
    section["task"] = spec.image_task if spec.image_task and _given(section, *IMAGE_KEYS) else spec.task
    ckpt_dir, phantom = section.pop("ckpt_dir", None), section.pop("phantom_ckpt", None)
    if phantom is not None and not spec.phantom:
        problems.append(f"inference.phantom_ckpt is Phantom's DiT (tasks s2v-1.3B, s2v-14B); task is {spec.name!r}")
    if phantom is not None and spec.phantom and isinstance(data.get("predictor"), dict):
        if data["predictor"].get("from_pretrained") is not None:
            problems.append(f"inference.phantom_ckpt = {phantom!r} and predictor.from_pretrained = "
                            f"{data['predictor']['from_pretrained']!r} both name the DiT's weights: give one")
        else:  # the JSON's predictor section gives the architecture, phantom_ckpt the weights
            out["predictor"] = dict(data["predictor"], from_pretrained=phantom)
    if ckpt_dir is not None:
        _from_release(out, section, spec, ckpt_dir, phantom, problems, notes)
    elif phantom is not None and spec.phantom and "predictor" not in data:
        problems.append("inference.phantom_ckpt needs inference.ckpt_dir (the Wan2.1 base model's release "
                        "directory: its config.json, VAE and text encoder) or the model JSON's predictor section")
    out["inference"] = section
    return out


def image_size(spec: WanTask, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int]:
    """(width, height) of a video of at most ``width`` x ``height`` pixels shaped by an image, as Wan's
    pipelines size it (``WanTask.image_sizing``): "aspect" (Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B) keeps the
    image's aspect ratio in latent units of the VAE's stride x the DiT's 2x2 patch; "best" (Wan2.2
    TI2V-5B) picks, of the two roundings to 32 pixels (width first, height first), the one whose
    aspect ratio is nearer the image's."""
    import math

    area, stride = width * height, 16 if spec.vae_file == VAE22_FILE else 8
    if spec.image_sizing == "aspect":
        aspect = image_h / image_w
        lat_h = round(math.sqrt(area * aspect) // stride // 2 * 2)
        lat_w = round(math.sqrt(area / aspect) // stride // 2 * 2)
        return lat_w * stride, lat_h * stride
    step, ratio = 2 * stride, image_w / image_h
    ow, oh = math.sqrt(area * ratio), math.sqrt(area / ratio)
    w1 = int(ow // step * step)
    h1 = int(area / w1 // step * step)
    h2 = int(oh // step * step)
    w2 = int(area / h2 // step * step)
    first, second = w1 / h1, w2 / h2
    return (w1, h1) if max(ratio / first, first / ratio) < max(ratio / second, second / ratio) else (w2, h2)


def _size_by_image(spec: WanTask, section: dict, problems: list[str]) -> None:
    """``width``/``height`` from ``size`` as the largest area, shaped by the first image of every prompt
    (mm samples one size per run: the images must give the same)."""
    from PIL import Image

    key = next(k for k in IMAGE_KEYS if _given(section, k))
    value = section[key]
    if isinstance(value, str) and value.endswith(".txt") and Path(value).is_file():
        paths = [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
    else:
        paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    sizes = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[path] = image_size(spec, section["width"], section["height"], *image.size)
        except (OSError, TypeError, ValueError):
            return  # named by the inference section's own check of the image paths
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {w}*{h}" for p, (w, h) in sizes.items())
        problems.append(f"inference.{key}: Wan sizes each {spec.name} video by its image's aspect ratio within "
                        f"size = {section['width']}*{section['height']}, and these images give different sizes "
                        f"({listed}); mm samples one size per run: give images of one aspect ratio, or "
                        "height and width")
    elif sizes:
        section["width"], section["height"] = next(iter(sizes.values()))


def _from_release(out: dict, section: dict, spec: WanTask, ckpt_dir: Any, phantom: Any, problems: list[str],
                  notes: list[str]) -> None:
    """The model JSON's sections that are missing, built from Wan's release directory ``ckpt_dir``."""
    where = f"inference.ckpt_dir = {ckpt_dir!r}"
    root = Path(ckpt_dir) if isinstance(ckpt_dir, str) else None
    if root is None or not root.is_dir():
        problems.append(f"{where}: not a directory (Wan's release directory for task {spec.name!r}, as downloaded)")
        return

    def need(path: Path, what: str) -> str | None:
        if not path.exists():
            problems.append(f"{where}: no {path.relative_to(root)} there ({what}; Wan's release layout)")
            return None
        return str(path)

    if "predictor" not in out:
        dit_dir = root / EXPERTS[0] if spec.experts else root
        weights: str | None
        if spec.phantom:
            if phantom is None:
                problems.append(f"inference.task = {spec.name!r} is Phantom's: give inference.phantom_ckpt (its "
                                "Phantom-Wan .pth, or the directory of its sharded safetensors)")
                return
            weights = phantom if isinstance(phantom, str) and Path(phantom).exists() else None
            if weights is None:
                problems.append(f"inference.phantom_ckpt = {phantom!r}: no such file or directory")
        else:
            weights = need(dit_dir, "the DiT") if spec.experts else str(root)
        config_path = need(dit_dir / "config.json", "the DiT's config.json")
        if weights is not None and config_path is not None:
            out["predictor"] = _predictor(weights, Path(config_path), spec, problems, notes)
    if spec.experts and not _given(section, "low_noise_model"):
        low = need(root / EXPERTS[1], "Wan2.2 A14B's low-noise expert")
        if low is not None:
            section["low_noise_model"] = low
            if not _given(section, "boundary_ratio"):
                section["boundary_ratio"] = spec.boundary_ratio
    if "ae" not in out:
        vae = need(root / spec.vae_file, "the VAE")
        if vae is not None:
            out["ae"] = {"model_id": "wan_vae", "from_pretrained": vae}
    if "text_encoder" not in out:
        t5, tokenizer = need(root / T5_FILE, "the UMT5 text encoder"), need(root / T5_TOKENIZER, "its tokenizer")
        if t5 is not None and tokenizer is not None:
            # Wan's t5_dtype
            out["text_encoder"] = {"model_id": "umt5", "from_pretrained": t5, "tokenizer": tokenizer, "dtype": "bf16"}
    if spec.clip and "image_encoder" not in out:
        clip = need(root / CLIP_FILE, "the CLIP image encoder")
        if clip is not None:
            out["image_encoder"] = {"model_id": "clip", "from_pretrained": clip, "dtype": "fp16"}  # Wan's clip_dtype


def _predictor(weights: str, config_path: Path, spec: WanTask, problems: list[str], notes: list[str]) -> dict | None:
    """The ``predictor`` section of a release's DiT: its config.json (original or diffusers keys) and
    the shapes of its tensors."""
    from mm.models.predictor.name_table import ReleaseConfigError
    from mm.models.predictor.wan.weights import WAN_WEIGHTS

    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{config_path}: cannot be read as JSON: {e}")
        return None
    try:
        shapes = tensor_shapes(weights)
        fmt = WAN_WEIGHTS.detect_format(shapes)
        arch = WAN_WEIGHTS.read_arch(config, fmt, shapes.get, str(config_path))
    except (ReleaseConfigError, ValueError, KeyError, OSError) as e:
        problems.append(f"the DiT of inference.{'phantom_ckpt' if spec.phantom else 'ckpt_dir'} ({weights}): {e}")
        return None
    named = dict(dim=arch["hidden_size"], ffn_dim=arch["ffn_dim"], num_heads=arch["num_heads"],
                 num_layers=arch["num_layers"])
    if named != spec.arch:
        differ = ", ".join(f"{k} {named[k]} (task: {v})" for k, v in spec.arch.items() if named[k] != v)
        notes.append(f"the DiT of {weights} is not {spec.name}'s architecture ({differ}): sampled as the files "
                     "describe it")
    return {"model_id": "wan_dit", "from_pretrained": weights, **arch}


def tensor_shapes(path: str) -> dict[str, list[int]]:
    """Every tensor's shape in a DiT's weights (read_weights' sources: a directory of *.safetensors,
    one .safetensors, a .pth state dict), reading headers only (a .pth is memory-mapped)."""
    from safetensors import safe_open

    from mm.models.predictor.name_table import read_weights

    source = Path(path)
    files = [source] if source.suffix == ".safetensors" else sorted(source.glob("*.safetensors")) \
        if source.is_dir() else []
    if not files:
        return {k: list(v.shape) for k, v in read_weights(path).items()}
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    return shapes
