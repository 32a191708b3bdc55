"""MindSpeed-MM's inference JSON layout, shared by the families that read it (their ``translate``).

MindSpeed-MM's ``inference_sora.py`` reads what mm keeps in the model JSON's ``inference`` section from
the top level of the same file: ``prompt``, ``save_path``, ``fps`` with ``frame_interval``,
``pipeline_config`` (``input_size``: frames, height, width; ``cpu_offload``; family keys),
``pipeline_class``, ``tokenizer``, ``use_prompt_preprocess``, ``device``, ``dtype``, the conditioning
inputs (``image``, ``dual_image``, ``conditional_pixel_values_path``, ...). ``inference_section`` moves
them into an ``inference`` section (each key carried over, noted with what mm does instead, or refused
with what to use); the family's translate passes the keys only it knows (its ``pipeline_config`` keys,
its sampler in the ``diffusion`` section). A file that mixes the two layouts is refused, naming the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

# top-level keys of MindSpeed-MM's inference JSONs (inference_sora.py and its pipelines read them)
LAYOUT_KEYS = ("prompt", "save_path", "fps", "frame_interval", "pipeline_config", "pipeline_class", "tokenizer",
               "use_prompt_preprocess", "device", "dtype", "image", "dual_image", "conditional_pixel_values_path",
               "mask_type", "crop_for_hw", "max_hxw", "video", "start_frame", "num_frames", "strength",
               "boundary_ratio", "low_noise_predictor", "num_inference_videos_per_sample")
# pipeline_config keys every family's MindSpeed-MM pipeline reads
PIPELINE_KEYS = ("input_size", "cpu_offload", "seed")

PipelineConfig = Callable[[dict, dict, list[str], list[str]], None]


def in_layout(data: dict) -> bool:
    """Whether the model JSON keeps MindSpeed-MM's inference keys at its top level."""
    return isinstance(data, dict) and any(key in data for key in LAYOUT_KEYS)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def inference_section(data: dict, problems: list[str], notes: list[str], pipeline_classes: tuple[str, ...],
                      pipeline_config: PipelineConfig | None = None) -> dict:
    """``data`` (a copy the caller owns) with MindSpeed-MM's top-level inference keys moved into an ``inference``
    section. ``pipeline_classes``: the ``pipeline_class`` names of the family; ``pipeline_config(config, section,
    problems, notes)`` pops the family's own ``pipeline_config`` keys into ``section`` (what is left is refused)."""
    present = [key for key in LAYOUT_KEYS if key in data]
    if not present:
        return data
    if "inference" in data:
        problems.append(f"the model JSON mixes MindSpeed-MM's top-level inference keys ({', '.join(present)}) with "
                        "mm's inference section; give one layout (all of them inside inference, or none)")
        return data
    top = {key: data.pop(key) for key in present}
    section: dict[str, Any] = {}
    pipeline_class = top.pop("pipeline_class", None)
    if pipeline_class is not None and pipeline_class not in pipeline_classes:
        problems.append(f"pipeline_class = {pipeline_class!r} with this predictor; valid: {', '.join(pipeline_classes)}")
    for key in ("prompt", "save_path", "boundary_ratio", "conditional_pixel_values_path"):
        if key in top:
            section[key] = top.pop(key)
    if "low_noise_predictor" in top:
        section["low_noise_model"] = top.pop("low_noise_predictor")
    interval = top.pop("frame_interval", 1)
    if not _int(interval) or interval < 1:
        problems.append(f"frame_interval = {interval!r}; valid: an integer >= 1 (the .mp4 is written at fps // "
                        "frame_interval)")
        interval = 1
    if "fps" in top:
        fps = top.pop("fps")
        section["fps"] = fps // interval if _int(fps) else fps  # inference.fps names a bad value
        if interval > 1:
            notes.append(f"fps = {fps} with frame_interval = {interval}: the videos are written at {section['fps']} fps, "
                         "as MindSpeed-MM writes them")
    _pipeline_config(top.pop("pipeline_config", None), section, problems, notes, pipeline_config)
    tokenizer = top.pop("tokenizer", None)
    if tokenizer is not None:
        _tokenizer(tokenizer, data, section, problems, notes)
    if top.pop("use_prompt_preprocess", False) is not False:
        problems.append("use_prompt_preprocess = true: mm encodes the prompts as given (the family's own cleaning "
                        "aside); valid: false (clean the prompts file beforehand)")
    if "device" in top:
        notes.append(f"device = {top.pop('device')!r}: mm runs on the accelerator it finds (MM_ACCELERATOR or "
                     "--accelerator choose)")
    if "dtype" in top:
        notes.append(f"dtype = {top.pop('dtype')!r}: mm samples in each section's dtype (predictor.dtype, ae.dtype, "
                     "text_encoder.dtype)")
    if "crop_for_hw" in top:
        section["crop_images"] = top.pop("crop_for_hw")
    if "max_hxw" in top:
        max_hxw = top.pop("max_hxw")
        if section.get("crop_images") is not True:
            problems.append(f"max_hxw = {max_hxw!r} without crop_for_hw = true: mm samples at the height x width of "
                            "pipeline_config.input_size; valid: crop_for_hw true (the image is centre-cropped to that "
                            "size)")
    mask_type = top.pop("mask_type", None)
    if mask_type not in (None, "i2v"):
        problems.append(f"mask_type = {mask_type!r}; valid: i2v (the first frame given; mm samples t2v and i2v)")
    copies = top.pop("num_inference_videos_per_sample", 1)
    if not _int(copies) or copies < 1:
        problems.append(f"num_inference_videos_per_sample = {copies!r}; valid: an integer >= 1")
    elif copies > 1:
        section["videos_per_prompt"] = copies
    images, dual = top.pop("image", None), top.pop("dual_image", False)
    if images is not None:
        _images(images, dual, section, problems)
    elif dual:
        problems.append("dual_image = true without image: the first and last frames come from image (a .txt of "
                        "'first, last' lines)")
    video_keys = [key for key in ("video", "start_frame", "num_frames", "strength") if key in top]
    for key in video_keys:
        top.pop(key)
    if video_keys:
        problems.append(f"{', '.join(video_keys)}: video-to-video (WanPipeline's v2v) is not in mm; valid: text-, "
                        "image- and first-last-frame-to-video files (leave video, start_frame, num_frames and "
                        "strength out)")
    image_encoder = data.get("image_encoder")
    if isinstance(image_encoder, dict) and "model_id" not in image_encoder:
        data["image_encoder"] = {"model_id": "clip", **image_encoder}  # MindSpeed-MM names no model: Wan's CLIP
    for key in top:  # every LAYOUT_KEYS entry is handled above
        problems.append(f"{key}: not read in MindSpeed-MM's inference layout here")
    data["inference"] = section
    return data


def _pipeline_config(config: Any, section: dict, problems: list[str], notes: list[str],
                     family: PipelineConfig | None) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        problems.append(f"pipeline_config = {config!r}; valid: an object (input_size, ...)")
        return
    config = dict(config)
    size = config.pop("input_size", None)
    if size is not None:
        if isinstance(size, list) and len(size) == 3 and all(_int(v) and v > 0 for v in size):
            section["num_frames"], section["height"], section["width"] = size
        else:
            problems.append(f"pipeline_config.input_size = {size!r}; valid: [frames, height, width] (positive integers)")
    if "cpu_offload" in config:
        section["offload_model"] = config.pop("cpu_offload")
    if "seed" in config:
        section["seed"] = config.pop("seed")
    if family is not None:
        family(config, section, problems, notes)
    for key in config:
        problems.append(f"pipeline_config.{key}: unknown key here; valid: {', '.join(PIPELINE_KEYS)} and the "
                        "family's own")


def _tokenizer(tokenizer: Any, data: dict, section: dict, problems: list[str], notes: list[str]) -> None:
    """MindSpeed-MM's tokenizer section: its directory becomes the text encoder's ``tokenizer`` (where it is not
    the text encoder's own directory), its ``model_max_length`` the token length."""
    if not isinstance(tokenizer, dict):
        problems.append(f"tokenizer = {tokenizer!r}; valid: an object (from_pretrained, model_max_length, ...)")
        return
    tokenizer = dict(tokenizer)
    backend = tokenizer.pop("hub_backend", "hf")
    if backend != "hf":
        problems.append(f"tokenizer.hub_backend = {backend!r}; valid: hf (a transformers tokenizer directory)")
    tokenizer.pop("autotokenizer_name", None)
    if "model_max_length" in tokenizer:
        section["model_max_length"] = tokenizer.pop("model_max_length")
    path = tokenizer.pop("from_pretrained", None)
    text = data.get("text_encoder")
    if path is not None:
        if not isinstance(text, dict):
            problems.append("tokenizer: one tokenizer for one text encoder; give the text encoders' tokenizers in "
                            "text_encoder[i].tokenizer")
        elif Path(str(path)) != Path(str(text.get("from_pretrained", ""))):
            data["text_encoder"] = dict(text, tokenizer=path)
    for key in tokenizer:
        problems.append(f"tokenizer.{key}: unknown key; valid: from_pretrained, model_max_length, hub_backend, "
                        "autotokenizer_name")


def _images(images: Any, dual: Any, section: dict, problems: list[str]) -> None:
    if not isinstance(dual, bool):
        problems.append(f"dual_image = {dual!r}; valid: true or false")
        return
    if not dual:
        section["image"] = images
        return
    path = Path(str(images))
    if not path.is_file():
        problems.append(f"image = {images!r}: no such file (with dual_image, a .txt of 'first, last' image paths, "
                        "one line per prompt)")
        return
    firsts, lasts = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            problems.append(f"image = {images!r}, line {number}: {line!r}; valid: two image paths separated by a comma "
                            "(first frame, last frame)")
            return
        firsts.append(parts[0])
        lasts.append(parts[1])
    section["image"], section["last_image"] = firsts, lasts
