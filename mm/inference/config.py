"""The model JSON's ``inference`` section: what to sample and how.

Keys (the names of Wan's and Phantom's generate scripts are accepted as aliases, listed after the mm name):

- ``prompt`` (a string, a list, or, as MindSpeed-MM's JSONs give it, the path of a ``.txt`` file of
  one prompt per line) or ``prompt_file`` (one prompt per line): at least one prompt.
- ``negative_prompt``: the unconditional branch of classifier-free guidance ("" by default; the
  family's fixed negative prompt where it has one, as Step-Video's).
- ``prompt_suffix``: text appended to every prompt before it is encoded ("" by default; Step-Video's
  release appends a fixed quality text, its default here); ``prompt_prefix``: text put before every
  prompt ("" by default; MindSpeed-MM's Open-Sora-Plan 1.3 pipeline puts its quality words there).
- ``videos_per_prompt`` (``num_inference_videos_per_sample``, MindSpeed-MM's name): each prompt sampled
  this many times, one after the other, each with its own seed (1 by default).
- ``seed`` (``base_seed``): the first prompt's noise; prompt i uses ``seed + i``.
- ``num_frames`` (``frame_num``), ``height``, ``width``: the video; frames ``4k + 1``, sizes
  multiples of the VAE's spatial factor times the DiT's patch.
- ``fps``: of the written .mp4 (16, Wan's).
- ``sample_steps`` (``num_inference_steps``), ``sample_shift`` (``flow_shift``), ``sample_solver``
  (unipc, dpm++, euler), ``guidance_scale`` (``sample_guide_scale``; 1 turns guidance off; a pair
  with ``low_noise_model``, below).
- ``save_path``: the directory the videos go to; made if missing and probed (a file written and
  removed in it) on every rank before any model loads (``save_path_problem``), so a path that
  cannot be written is a configuration error, not a sample lost after sampling.
- ``model_max_length``: the text encoders' token length: one integer for all, or a list (one per
  text encoder); default the family's lengths (512 for Wan's UMT5, the length it was trained with;
  320 and 77 for Step-Video's Step-LLM and CLIP).
- ``save_latents``: also write the final latents beside each video (``<name>.latents.pt``).
- ``task``: t2v, i2v, flf2v or s2v (default: flf2v with ``last_image``, i2v with ``image``, s2v with
  ``ref_images``, else t2v).
  A Wan2.2 TI2V-5B model (``predictor.in_dim = out_dim``) samples t2v, or i2v with the image's
  latent as the first latent frame (``num_frames >= 5``).
- ``image`` (``conditional_pixel_values_path``, MindSpeed-MM's name): the first frame of an
  image-to-video model, one path for every prompt, a list with one per prompt, or a ``.txt`` file of
  one path per line (per prompt); ``last_image``
  (FLF2V): the last frame, likewise. Images are resized to ``height`` x ``width``; with ``crop_images``
  (``crop_for_hw``, Open-Sora-Plan's name) the largest centred part of the aspect ratio of
  ``height`` x ``width`` is cut out first, so the image is not stretched.
- ``ref_images`` (``ref_image``, Phantom's name; task s2v): the subjects' reference images of
  Phantom subject-to-video, for every prompt (a list of paths, or Phantom's one comma-separated
  string) or a list of such lists, one per prompt; guided by ``guidance_scale_img``
  (``sample_guide_scale_img``, 5) and ``guidance_scale_text`` (``sample_guide_scale_text``, 7.5) as
  ``mm.families.wan.subject`` describes (``guidance_scale`` is not used by s2v, as in Phantom).
- ``ulysses_size``, ``ring_size`` (Wan's and Phantom's names): context parallelism of
  ulysses_size x ring_size ranks (mapped onto --context-parallel-size / -algo /
  --ulysses-degree-in-cp by ``mm.arguments`` before anything starts).
- ``offload_model`` (Wan's name): every model waits in host memory and comes to the device
  only for its stage (text/image encoding, denoising, decoding); ``t5_cpu``: the text encoder
  stays on the host.
- ``dit_fsdp``, ``t5_fsdp`` (Wan's names): shard the DiT's parameters over its context-parallel
  group, the text encoder's over its TP x CP group (the ranks that run each forward together; see
  ``mm.parallel.fsdp``): each rank keeps a 1/group share and gathers one block at a time.
- ``lora``: ``{"path": ..., "scale": 1.0}``, a LoRA adapter applied over the predictor's weights without
  merging them (``mm.models.predictor.lora``): a LoRA run's ``--save`` directory (any TP layout), or
  ``mm-convert ... lora_to_hf``'s ``pytorch_lora_weights.safetensors`` (or its directory); ``scale``
  multiplies its alpha / r.
- ``low_noise_model`` with ``boundary_ratio`` (Wan2.2 A14B: 0.875 for T2V, 0.9 for I2V): the
  low-noise expert's weights (a HuggingFace directory or an mm checkpoint directory); the model of
  ``predictor`` (the high-noise expert) denoises timesteps >= ``boundary_ratio`` x 1000, the
  low-noise expert the rest, with ``guidance_scale_2`` (default: ``guidance_scale``). Wan2.2's own
  ``sample_guide_scale`` pair (its A14B configs: T2V (3.0, 4.0), I2V (3.5, 3.5)) is ordered
  (low-noise expert's, high-noise expert's), as its samplers use it: it sets ``guidance_scale_2``
  and ``guidance_scale`` in that order.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm.diffusion.samplers import SOLVERS
from mm.families.spec import FrameRule

ALIASES = {"conditional_pixel_values_path": "image", "base_seed": "seed", "frame_num": "num_frames", "num_inference_steps": "sample_steps",
           "flow_shift": "sample_shift", "sample_guide_scale": "guidance_scale", "ref_image": "ref_images",
           "sample_guide_scale_img": "guidance_scale_img", "sample_guide_scale_text": "guidance_scale_text",
           "sample_fps": "fps", "first_frame": "image", "last_frame": "last_image", "crop_for_hw": "crop_images",
           "num_inference_videos_per_sample": "videos_per_prompt"}
KEYS = ("prompt", "prompt_file", "negative_prompt", "seed", "num_frames", "height", "width", "size", "fps",
        "sample_steps", "sample_shift", "sample_solver", "guidance_scale", "save_path", "model_max_length",
        "save_latents", "task", "image", "last_image", "low_noise_model", "boundary_ratio",
        "guidance_scale_2", "ulysses_size", "ring_size", "offload_model", "t5_cpu", "dit_fsdp", "t5_fsdp",
        "ref_images", "guidance_scale_img", "guidance_scale_text", "prompt_suffix", "use_prompt_extend",
        "prompt_extend_method", "prompt_extend_model", "prompt_extend_target_lang", "prompt_prefix", "crop_images",
        "videos_per_prompt", "lora")
# a null is "not given" (the default), as Wan's generate.py reads its None arguments
NULLABLE = ("num_frames", "fps", "sample_steps", "sample_shift", "guidance_scale", "offload_model", "size",
            "prompt_extend_model", "prompt_extend_method", "prompt_extend_target_lang", "use_prompt_extend")
TASKS = ("t2v", "i2v", "flf2v", "s2v")


@dataclass(frozen=True)
class SamplingConfig:
    prompts: list[str]
    negative_prompt: str = ""
    prompt_suffix: str = ""  # appended to every prompt before encoding (Step-Video's quality text)
    prompt_prefix: str = ""  # put before every prompt before encoding
    seed: int = 42
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_solver: str = "unipc"
    guidance_scale: float = 5.0
    save_path: str = "outputs/samples"
    # the text encoders' token length: one for all, one per encoder, or None (the family's lengths)
    model_max_length: int | tuple[int, ...] | None = None
    save_latents: bool = False
    task: str = "t2v"
    images: list[str] | None = None  # one per prompt
    crop_images: bool = False  # centre-crop images to the video's aspect ratio before resizing
    last_images: list[str] | None = None
    low_noise_model: str | None = None
    boundary_ratio: float | None = None
    guidance_scale_2: float | None = None
    offload_model: bool = False
    t5_cpu: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    ref_images: list[list[str]] | None = None  # s2v: the reference images of each prompt
    guidance_scale_img: float = 5.0
    guidance_scale_text: float = 7.5
    # use_prompt_extend: (prompt_extend_method, prompt_extend_model, prompt_extend_target_lang)
    prompt_extend: tuple[str, str | None, str] | None = None
    extended_prompts: list[str] | None = None  # set by the run: the prompts as extended, encoded instead
    # ``lora``: an adapter over the predictor's weights, unmerged: (a LoRA run's --save directory or
    # mm-convert lora_to_hf's PEFT file / its directory, the scale of its alpha / r)
    lora: tuple[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _lora(value, problems: list[str]) -> tuple[str, float] | None:
    """``lora``: ``{"path": ..., "scale": 1.0}`` or the path alone (scale 1)."""
    if value is None:
        return None
    path, scale = (value, 1.0) if isinstance(value, str) else \
        (value.get("path"), value.get("scale", 1.0)) if isinstance(value, dict) else (None, None)
    unknown = sorted(set(value) - {"path", "scale"}) if isinstance(value, dict) else []
    if unknown:
        problems.append(f"inference.lora: unknown key(s) {', '.join(unknown)}; valid: path, scale")
    if not isinstance(path, str) or not Path(path).exists():
        problems.append(f"inference.lora = {value!r}: its path is not there; valid: {{\"path\": a LoRA run's --save "
                        "directory, or mm-convert lora_to_hf's output (a pytorch_lora_weights.safetensors file or its "
                        "directory), \"scale\": a number (default 1)}")
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        problems.append(f"inference.lora.scale = {scale!r}; valid: a number (1: the adapter as trained)")
        return None
    return path, float(scale)


def _max_length(value, problems: list[str]) -> int | tuple[int, ...] | None:
    def ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if value is None or ok(value):
        return value
    if isinstance(value, list) and value and all(ok(v) for v in value):
        return tuple(value)
    problems.append(f"inference.model_max_length = {value!r}; valid: an integer >= 1 (every text encoder's token "
                    "length) or a list of them (one per text encoder)")
    return None


def parse_sampling(section: dict[str, Any], spatial: int, temporal: int | FrameRule, patch: tuple[int, int, int],
                   problems: list[str], defaults: dict[str, Any] | None = None) -> SamplingConfig | None:
    """The ``inference`` section as a SamplingConfig; every problem appended to ``problems`` as a
    message naming the key, its value and what is valid. ``spatial``/``temporal``: the VAE's
    compression (``temporal``: a causal VAE's factor, or the family's ``FrameRule``), ``patch``: the
    DiT's; ``defaults``: the family sampler's defaults (``SamplingConfig`` fields) over Wan's."""
    rule = temporal if isinstance(temporal, FrameRule) else FrameRule(temporal)
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # mm name -> the key the section used
    unknown = []
    for key, value in section.items():
        name = ALIASES.get(key, key)
        if name not in KEYS:
            unknown.append(key)
            continue
        if value is None and name in NULLABLE:
            continue
        if name in values:
            problems.append(f"inference.{key}: given twice (also as {name} or its alias)")
        values[name] = value
        given_as[name] = key
    if unknown:
        problems.append(f"inference: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid: "
                        f"{', '.join(KEYS + tuple(ALIASES))}")
    if "size" in values:
        _size(values, problems)
    if given_as.get("guidance_scale") == "sample_guide_scale" and isinstance(values["guidance_scale"], list):
        _wan22_guide_scale_pair(values, problems)
    prompts: list[str] = []
    prompt = values.pop("prompt", None)
    if isinstance(prompt, str) and prompt.endswith(".txt"):  # MindSpeed-MM's JSONs name a prompt file here
        path = Path(prompt)
        if not path.is_file():
            problems.append(f"inference.prompt = {prompt!r}: no such file (a prompt ending in .txt is read as a file "
                            "of one prompt per line)")
        else:
            prompts.extend(_lines(path))
    elif isinstance(prompt, str):
        prompts.append(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompts.extend(prompt)
    elif prompt is not None:
        problems.append(f"inference.prompt = {prompt!r}; valid: a string or a list of strings")
    save_path = values.get("save_path", SamplingConfig.save_path)
    if not isinstance(save_path, str) or not save_path:
        problems.append(f"inference.save_path = {save_path!r}; valid: a directory path (a non-empty string)")
        values["save_path"] = SamplingConfig.save_path
    prompt_file = values.pop("prompt_file", None)
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            problems.append(f"inference.prompt_file = {prompt_file!r}: no such file")
        else:
            prompts.extend(_lines(path))
    if not prompts:
        problems.append("inference: no prompt; give inference.prompt (a string or a list) or inference.prompt_file")

    def number(key: str, kind, low, default):
        value = values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            problems.append(f"inference.{key} = {value!r}; valid: {'an integer' if kind is int else 'a number'}")
            return default
        if value < low:
            problems.append(f"inference.{key} = {value}; valid: >= {low}")
            return default
        return kind(value)

    def flag(key: str) -> bool:
        value = values.get(key, False)
        if not isinstance(value, bool):
            problems.append(f"inference.{key} = {value!r}; valid: true or false")
            return False
        return value

    defaults = SamplingConfig(prompts=[], **(defaults or {}))
    frames = number("num_frames", int, 1, defaults.num_frames)
    if rule.latent_frames(frames) is None:
        problems.append(f"inference.num_frames = {frames}; valid: {rule.valid()}")
    step = spatial * max(patch[1], patch[2])
    height, width = number("height", int, step, defaults.height), number("width", int, step, defaults.width)
    for key, size in (("height", height), ("width", width)):
        if size % step:
            problems.append(f"inference.{key} = {size}; valid: a multiple of {step} (VAE factor {spatial} x DiT "
                            f"patch {max(patch[1], patch[2])})")
    solver = values.get("sample_solver", defaults.sample_solver)
    if solver not in SOLVERS:
        problems.append(f"inference.sample_solver = {solver!r}; valid: {', '.join(SOLVERS)}")
    negative = values.get("negative_prompt", defaults.negative_prompt)
    suffix = values.get("prompt_suffix", defaults.prompt_suffix)
    if not isinstance(suffix, str):
        problems.append(f"inference.prompt_suffix = {suffix!r}; valid: a string (appended to every prompt)")
        suffix = ""
    prefix = values.get("prompt_prefix", defaults.prompt_prefix)
    if not isinstance(prefix, str):
        problems.append(f"inference.prompt_prefix = {prefix!r}; valid: a string (put before every prompt)")
        prefix = ""
    copies = number("videos_per_prompt", int, 1, 1)
    prompts = [p for p in prompts for _ in range(copies)]
    if not isinstance(negative, str):
        problems.append(f"inference.negative_prompt = {negative!r}; valid: a string")
    def per_prompt(key: str) -> list[str] | None:
        value = values.get(key)
        if value is None:
            return None
        if isinstance(value, str) and value.endswith(".txt"):  # a file of image paths, one per prompt
            if not Path(value).is_file():
                problems.append(f"inference.{key} = {value!r}: no such file (a .txt is read as one image path per "
                                "line, one per prompt)")
                return None
            value = _lines(Path(value))
        paths = [value] * len(prompts) if isinstance(value, str) else value
        if isinstance(paths, list) and copies > 1 and len(paths) * copies == len(prompts):
            paths = [p for p in paths for _ in range(copies)]  # one per prompt of the file, each sampled `copies` times
        if not isinstance(paths, list) or not all(isinstance(v, str) for v in paths) or len(paths) != len(prompts):
            problems.append(f"inference.{key} = {value!r}; valid: one image path, or a list of {len(prompts) // copies} "
                            "(one per prompt)")
            return None
        missing = sorted({v for v in paths if not Path(v).is_file()})
        if missing:
            problems.append(f"inference.{key}: no such file: {', '.join(missing)}")
        return paths

    images, last_images = per_prompt("image"), per_prompt("last_image")
    references = _reference_images(values.get("ref_images"), len(prompts), problems)
    task = values.get("task", "flf2v" if "last_image" in values else "i2v" if "image" in values else
                      "s2v" if "ref_images" in values else "t2v")
    if task not in TASKS:
        problems.append(f"inference.task = {task!r}; valid: {', '.join(TASKS)}")
    elif task in ("i2v", "flf2v") and "image" not in values:
        problems.append(f"inference.task = {task!r} needs inference.image (conditional_pixel_values_path)")
    elif task == "flf2v" and "last_image" not in values:
        problems.append("inference.task = 'flf2v' needs inference.last_image")
    elif task != "flf2v" and "last_image" in values:
        problems.append(f"inference.last_image is for task flf2v (task is {task!r})")
    elif task in ("t2v", "s2v") and "image" in values:
        problems.append(f"inference.image is for task i2v or flf2v (task is {task!r})")
    if task == "s2v" and "ref_images" not in values:
        problems.append("inference.task = 's2v' (Phantom subject-to-video) needs inference.ref_images")
    elif task != "s2v" and "ref_images" in values:
        problems.append(f"inference.ref_images is for task s2v (task is {task!r})")
    for key in ("guidance_scale_img", "guidance_scale_text"):
        if key in values and task != "s2v":
            problems.append(f"inference.{key} is Phantom's (task s2v); task is {task!r}: use guidance_scale")
    low_noise = values.get("low_noise_model")
    boundary = values.get("boundary_ratio")
    if (low_noise is None) != (boundary is None):
        problems.append("inference.low_noise_model and inference.boundary_ratio go together (Wan2.2 A14B's two "
                        "experts); give both or neither")
    if low_noise is not None and not (isinstance(low_noise, str) and Path(low_noise).is_dir()):
        problems.append(f"inference.low_noise_model = {low_noise!r}: not a directory (a HuggingFace DiT directory "
                        "or an mm checkpoint directory)")
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float))
                                 or not 0 < boundary < 1):
        problems.append(f"inference.boundary_ratio = {boundary!r}; valid: a number between 0 and 1 (0.875 for "
                        "Wan2.2 T2V-A14B, 0.9 for I2V-A14B)")
    if "guidance_scale_2" in values and low_noise is None:
        problems.append("inference.guidance_scale_2 is the low-noise expert's; it needs inference.low_noise_model")
    config = SamplingConfig(
        prompts=prompts, negative_prompt=negative if isinstance(negative, str) else "", prompt_suffix=suffix,
        prompt_prefix=prefix, crop_images=flag("crop_images"),
        seed=number("seed", int, 0, defaults.seed), num_frames=frames, height=height, width=width,
        fps=number("fps", int, 1, defaults.fps), sample_steps=number("sample_steps", int, 1, defaults.sample_steps),
        sample_shift=number("sample_shift", float, 1e-6, defaults.sample_shift), sample_solver=solver,
        guidance_scale=number("guidance_scale", float, 0.0, defaults.guidance_scale),
        save_path=str(values.get("save_path", defaults.save_path)),
        model_max_length=_max_length(values.get("model_max_length", defaults.model_max_length), problems),
        save_latents=flag("save_latents"), task=task if task in TASKS else "t2v", images=images,
        last_images=last_images, low_noise_model=low_noise if isinstance(low_noise, str) else None,
        boundary_ratio=float(boundary) if isinstance(boundary, (int, float)) and not isinstance(boundary, bool) else None,
        guidance_scale_2=number("guidance_scale_2", float, 0.0, None) if "guidance_scale_2" in values else None,
        offload_model=flag("offload_model"), t5_cpu=flag("t5_cpu"), dit_fsdp=flag("dit_fsdp"),
        t5_fsdp=flag("t5_fsdp"), ref_images=references,
        guidance_scale_img=number("guidance_scale_img", float, 0.0, defaults.guidance_scale_img),
        guidance_scale_text=number("guidance_scale_text", float, 0.0, defaults.guidance_scale_text),
        prompt_extend=_prompt_extend(values, flag("use_prompt_extend"), problems),
        lora=_lora(values.get("lora"), problems))
    if config.offload_model and (config.dit_fsdp or config.t5_fsdp):
        problems.append("inference.offload_model moves whole models between host and device; with dit_fsdp or "
                        "t5_fsdp each rank holds a shard: use one or the other")
    if config.t5_cpu and config.t5_fsdp:
        problems.append("inference.t5_cpu keeps the text encoder whole on the host; t5_fsdp shards it over the "
                        "devices: use one or the other")
    return config


def os_reason(e: OSError) -> str:
    """An OSError as ``[Errno N] reason``, without the file name (messages name their path themselves)."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else str(e)


def save_path_problem(save_path: str, create: bool = True) -> str | None:
    """What keeps this process from writing files into ``inference.save_path``, or None.

    With ``create``, the directory is made if missing (its parents too) and a probe file is created
    (exclusively, under a unique name: every rank probes) and removed in it: the check of the
    writes to come, whatever the cause (permissions, a read-only file system, a full disk, a path
    under a regular file). Without, nothing is made: the path, or its nearest existing ancestor, must
    be a directory this process may write into (``os.access``); used while other problems already
    refuse the configuration, so a refused configuration leaves no directory behind."""
    path = Path(save_path)
    valid = "valid: a directory this process can create files in (made if missing)"
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as e:  # a component that cannot be looked up (no search permission)
        return f"inference.save_path = {save_path!r}: cannot look up {existing}: {os_reason(e)}; {valid}"
    if existing.exists() and not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        return f"inference.save_path = {save_path!r}: not a directory{where}; {valid}"
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"inference.save_path = {save_path!r}: {existing} is not writable by this process; {valid}"
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return (f"inference.save_path = {save_path!r}: cannot make the directory "
                f"{e.filename or path}: {os_reason(e)}; {valid}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".mm_write_probe_", dir=path)
    except OSError as e:
        return f"inference.save_path = {save_path!r}: cannot create a file in {path}: {os_reason(e)}; {valid}"
    problem = None
    try:
        os.write(handle, b"probe")
        os.fsync(handle)
    except OSError as e:
        problem = f"inference.save_path = {save_path!r}: cannot write a file in {path}: {os_reason(e)}; {valid}"
    finally:
        os.close(handle)
    try:
        os.unlink(probe)
    except OSError as e:
        problem = problem or (f"inference.save_path = {save_path!r}: cannot remove the probe file {probe}: "
                              f"{os_reason(e)}; {valid}")
    return problem


def _wan22_guide_scale_pair(values: dict[str, Any], problems: list[str]) -> None:
    """Wan2.2 A14B's ``sample_guide_scale = [low-noise expert's, high-noise expert's]`` onto
    ``guidance_scale`` (the high-noise expert, ``predictor``) and ``guidance_scale_2`` (the low-noise
    expert); a bad pair is removed from ``values`` and named in ``problems``."""
    pair = values.pop("guidance_scale")
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in pair):
        problems.append(f"inference.sample_guide_scale = {pair!r}; valid: a number >= 0, or Wan2.2 A14B's pair of "
                        "two (the low-noise expert's, the high-noise expert's)")
    elif values.get("low_noise_model") is None:
        problems.append(f"inference.sample_guide_scale = {pair!r} is Wan2.2 A14B's pair (the low-noise expert's, "
                        "the high-noise expert's scale); it needs inference.low_noise_model, else give one number")
    elif "guidance_scale_2" in values:
        problems.append(f"inference.sample_guide_scale = {pair!r} already gives the low-noise expert's scale (its "
                        f"first number); inference.guidance_scale_2 = {values['guidance_scale_2']!r} too: give one "
                        "or the other")
    else:
        values["guidance_scale_2"], values["guidance_scale"] = pair


def _prompt_extend(values: dict[str, Any], used: bool, problems: list[str]) -> tuple[str, str | None, str] | None:
    """``use_prompt_extend`` with its method, model and target language (Wan's keys and defaults),
    checked before any model loads; None when prompts are not extended."""
    if not used:
        return None
    from mm.inference.prompt_extend import check_prompt_extend

    method = values.get("prompt_extend_method", "local_qwen")
    model = values.get("prompt_extend_model")
    lang = values.get("prompt_extend_target_lang", "zh")
    found = check_prompt_extend(method, model, lang)
    problems.extend(found)
    return None if found else (method, model, lang)


def _size(values: dict[str, Any], problems: list[str]) -> None:
    """Wan's ``size = "W*H"`` onto ``width`` and ``height``."""
    size = values.pop("size")
    parts = size.replace(" ", "").split("*") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        problems.append(f"inference.size = {size!r}; valid: \"W*H\" (width*height, e.g. \"832*480\")")
    elif "width" in values or "height" in values:
        problems.append(f"inference.size = {size!r} and inference.height/width: give one or the other")
    else:
        values["width"], values["height"] = int(parts[0]), int(parts[1])


def _lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reference_images(value: Any, prompts: int, problems: list[str]) -> list[list[str]] | None:
    """``ref_images`` as one list of paths per prompt: a list of paths (or Phantom's comma-separated
    string) for every prompt, or a list of ``prompts`` such lists."""
    if value is None:
        return None

    def paths(v: Any) -> list[str] | None:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        return v if isinstance(v, list) and v and all(isinstance(p, str) for p in v) else None

    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        per_prompt = [paths(v) for v in value]
        if len(per_prompt) != prompts or any(p is None for p in per_prompt):
            problems.append(f"inference.ref_images = {value!r}; valid: a list of image paths (or one comma-separated "
                            f"string) for every prompt, or a list of {prompts} such lists (one per prompt)")
            return None
    else:
        shared = paths(value)
        if shared is None:
            problems.append(f"inference.ref_images = {value!r}; valid: a non-empty list of image paths, one "
                            "comma-separated string of them, or one such list per prompt")
            return None
        per_prompt = [shared] * prompts
    missing = sorted({p for group in per_prompt for p in group if not Path(p).is_file()})
    if missing:
        problems.append(f"inference.ref_images: no such file: {', '.join(missing)}")
    return per_prompt
