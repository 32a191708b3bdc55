"""Step-Video-T2V's own checks of a configuration (``FamilySpec.extra_checks`` and ``weight_checks``), made
by every entry point before any process group starts, so that a mistake is one line naming the key, the
value and what is valid instead of a failure minutes later on every rank:

- ``release_file_problems`` (a weight check: mm-plan, which reads no weights, leaves it out): the release's
  files are where the model JSON (and, for training, the data JSON's ``tokenizer_config``) point. The
  release (``stepfun-ai/stepvideo-t2v``) is laid out as ``transformer/`` (config.json,
  ``diffusion_pytorch_model-*.safetensors``), ``vae/`` (``vae_v2.safetensors``, ``vae.safetensors``),
  ``step_llm/`` (config.json, ``model-*.safetensors`` with their index, ``step1_chat_tokenizer.model``) and
  ``hunyuan_clip/{clip_text_encoder,tokenizer}``. Only names are looked at (no weight is read); an empty
  ``from_pretrained`` is left to the entry point's own message in inference.
- ``training_size_problems``: the training video shapes of the data JSON fit the VAE (17-frame chunks;
  sides multiples of its spatial compression, 16, times the DiT's patch) and are not Open-Sora-Plan's
  per-sample geometry (``force_resolution`` / ``max_hxw``, whose 4k + 1 frame counts the VAE does not take).

The inference video (``inference.num_frames``, ``height``, ``width``) is checked by the shared sampling
parser with the family's ``FrameRule``; the split of the 48 heads over TP x the Ulysses degree by
``mm.arguments.validation`` for every family.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm.families.stepvideo.text_encoders import STEP_LLM_TOKENIZER_FILE, STEP_LLM_TOKENIZER_JSON, hunyuan_clip_dirs
from mm.families.stepvideo.vae import FRAME_LEN, _weights_file, stepvideo_vae_config

# the text encoders in the order the DiT reads them (caption_channels [Step-LLM width, CLIP width])
ENCODER_ORDER = ("StepLLmModel", "BertModel")
ENCODER_NAMES = {"StepLLmModel": "Step-LLM", "BertModel": "HunyuanCLIP"}
DATA_KEY = "dataset_param.preprocess_parameters"
BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def _training(config) -> bool:
    """Whether the configuration is a training run's (the data JSON is given; inference has none)."""
    return config.data is not None


def _safetensors_problem(path: Path) -> str | None:
    """What is missing of a directory of safetensors shards (None: nothing): the files, or those its
    ``*.safetensors.index.json`` names that are not there."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            named = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{indexes[0].name} is not a safetensors index with a weight_map ({type(e).__name__})"
        absent = [name for name in named if not (path / name).is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (f", ... ({len(absent) - 5} more)" if len(absent) > 5 else "")
            return f"{indexes[0].name} names {len(absent)} file(s) not there: {shown}"
        return None
    if not any(path.glob("*.safetensors")):
        return "no *.safetensors files"
    return None


def _dit_problems(config) -> list[str]:
    pred = config.model.predictor
    # training reads predictor.from_pretrained whenever it is set; inference only without --load
    if not pred.from_pretrained or (not _training(config) and config.args.load is not None):
        return []
    path = Path(pred.from_pretrained)
    valid = ("valid: the release's transformer/ directory (config.json, diffusion_pytorch_model-*.safetensors), "
             "a .safetensors file, or leave it null and give --load (mm-convert StepVideoConverter hf_to_mm's output)")
    if path.is_file():
        return [] if path.suffix in (".safetensors", ".pt", ".pth") else \
            [f"predictor.from_pretrained = {pred.from_pretrained!r}: not a .safetensors file; {valid}"]
    if not path.is_dir():
        return [f"predictor.from_pretrained = {pred.from_pretrained!r}: no such file or directory; {valid}"]
    problem = _safetensors_problem(path)
    return [f"predictor.from_pretrained = {pred.from_pretrained!r}: {problem}; {valid}"] if problem else []


def _vae_problems(config) -> list[str]:
    ae = config.model.ae
    if ae is None or not ae.from_pretrained:
        return [] if not _training(config) or ae is None else \
            ["ae.from_pretrained is required: the release's vae/ directory (vae_v2.safetensors) or that file"]
    try:
        cfg = stepvideo_vae_config(ae.from_pretrained, ae.params)
    except (ValueError, TypeError, OSError):
        return []  # a bad ae section: the recipe's / sampler's checks name it
    if not Path(ae.from_pretrained).exists():
        return [f"ae.from_pretrained = {ae.from_pretrained!r}: no such file or directory; valid: the release's vae/ "
                f"directory (holding {cfg.release_file} for ae.version = {cfg.version}) or that file itself"]
    try:
        _weights_file(ae.from_pretrained, cfg)
    except FileNotFoundError as e:
        return [str(e)]
    return []


def _step_llm_problem(key: str, value: str) -> str | None:
    path = Path(value)
    valid = (f"valid: the release's step_llm/ directory (config.json, model-*.safetensors with "
             f"model.safetensors.index.json, {STEP_LLM_TOKENIZER_FILE})")
    if not path.is_dir():
        return f"{key} = {value!r}: no such directory; {valid}"
    missing = []
    if not (path / "config.json").is_file():
        missing.append("no config.json")
    problem = _safetensors_problem(path)
    if problem:
        missing.append(problem)
    if not (path / STEP_LLM_TOKENIZER_FILE).is_file() and not (path / STEP_LLM_TOKENIZER_JSON).is_file():
        missing.append(f"no {STEP_LLM_TOKENIZER_FILE} (the Step-LLM tokenizer)")
    return f"{key} = {value!r}: {'; '.join(missing)}; {valid}" if missing else None


def _clip_problem(key: str, value: str) -> str | None:
    path = Path(value)
    valid = ("valid: the release's hunyuan_clip/ directory or hunyuan_clip/clip_text_encoder (config.json, "
             "pytorch_model.bin; the BertTokenizer's vocab.txt in the sibling tokenizer/)")
    if not path.is_dir():
        return f"{key} = {value!r}: no such directory; {valid}"
    try:
        encoder, _ = hunyuan_clip_dirs(value, key)
    except (FileNotFoundError, ValueError) as e:
        return f"{e}; {valid}"
    if not any((encoder / name).is_file() for name in BERT_WEIGHTS) and not any(encoder.glob("*.safetensors")):
        return (f"{key} = {value!r}: no BertModel weights in {encoder} ({', '.join(BERT_WEIGHTS[:2])}); "
                f"{valid}")
    return None


def _text_encoder_problems(config) -> list[str]:
    problems = []
    encoders = config.model.text_encoder or []
    ids = [text.model_id for text in encoders]
    if len(ids) == len(ENCODER_ORDER) and sorted(ids) == sorted(ENCODER_ORDER) and tuple(ids) != ENCODER_ORDER:
        problems.append(f"text_encoder model_ids {ids}: the DiT reads Step-LLM then HunyuanCLIP "
                        f"(caption_channels [Step-LLM width, CLIP width]); valid order: {list(ENCODER_ORDER)}")
        return problems
    for i, text in enumerate(encoders):
        key = f"text_encoder[{i}]" if len(encoders) > 1 else "text_encoder"
        if text.model_id not in ENCODER_ORDER:
            problems.append(f"{key}.model_id = {text.model_id!r}; valid for Step-Video: "
                            + ", ".join(f"{m} ({ENCODER_NAMES[m]})" for m in ENCODER_ORDER))
            continue
        if not text.from_pretrained:
            if _training(config):
                where = "step_llm/" if text.model_id == "StepLLmModel" else "hunyuan_clip/clip_text_encoder"
                problems.append(f"{key}.from_pretrained is required: the release's {where} directory")
            continue
        check = _step_llm_problem if text.model_id == "StepLLmModel" else _clip_problem
        problem = check(f"{key}.from_pretrained", text.from_pretrained)
        if problem:
            problems.append(problem)
    return problems


def _tokenizer_problems(config) -> list[str]:
    """The data JSON's tokenizer_config entries (training): stepchat (Step-LLM's sentencepiece model) and
    BertTokenizer (HunyuanCLIP's vocabulary)."""
    if not _training(config) or not config.data.use_text_processer:
        return []
    problems = []
    tokenizers = config.data.tokenizers
    for i, tok in enumerate(tokenizers):
        key = "dataset_param.tokenizer_config" + (f"[{i}]" if len(tokenizers) > 1 else "")
        name, path = tok.get("autotokenizer_name"), tok.get("from_pretrained")
        if name not in ("stepchat", "BertTokenizer"):
            problems.append(f"{key}.autotokenizer_name = {name!r}; valid for Step-Video: 'stepchat' (Step-LLM's "
                            f"{STEP_LLM_TOKENIZER_FILE}), 'BertTokenizer' (hunyuan_clip/tokenizer)")
            continue
        if not path:
            problems.append(f"{key}.from_pretrained is required")
            continue
        p = Path(path)
        if name == "stepchat":
            found = (p.is_file() or (p.is_dir() and ((p / STEP_LLM_TOKENIZER_FILE).is_file()
                                                      or (p / STEP_LLM_TOKENIZER_JSON).is_file())))
            valid = f"the release's step_llm/{STEP_LLM_TOKENIZER_FILE} (or its directory)"
        else:
            found = p.is_dir() and ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file())
            valid = "the release's hunyuan_clip/tokenizer directory (vocab.txt)"
        if not found:
            what = "no such file or directory" if not p.exists() else "not a tokenizer"
            problems.append(f"{key}.from_pretrained = {path!r}: {what}; valid: {valid}")
    return problems


def release_file_problems(config, arch) -> list[str]:
    """The release's files where the model JSON (and the data JSON's tokenizers) point."""
    return _dit_problems(config) + _vae_problems(config) + _text_encoder_problems(config) + _tokenizer_problems(config)


def training_size_problems(config, arch) -> list[str]:
    """The data JSON's video shapes (training only): frames in 17-frame chunks, sides multiples of the VAE's
    spatial compression times the DiT's patch."""
    if not _training(config) or config.model.ae is None:
        return []
    from mm.data.dataset import VideoDataConfig

    try:
        video = VideoDataConfig.from_json(config.data.preprocess, config.data.dataset_type)
        spatial = stepvideo_vae_config(config.model.ae.from_pretrained, config.model.ae.params).scale_factor_spatial
    except (TypeError, ValueError, OSError):
        return []  # named by the entry point's own checks of the data JSON and the ae section
    if video.per_sample is not None:
        return [f"{DATA_KEY}: force_resolution / max_hxw (Open-Sora-Plan's per-sample geometry) cut every clip to "
                f"4k + 1 frames, which the Step-Video VAE does not take; valid for Step-Video: num_frames (a multiple "
                f"of {FRAME_LEN}) with max_height / max_width, or buckets [[frames, height, width], ...]"]
    patch = max(arch.patch_size[1], arch.patch_size[2])
    step = spatial * patch
    why = f"the Step-Video VAE's spatial compression {spatial} x the DiT's patch {patch}"
    problems = []
    preprocess = config.data.preprocess or {}
    if "buckets" in preprocess:
        for bucket in video.buckets:
            frames, height, width = bucket
            bad = []
            if frames % FRAME_LEN:
                bad.append(f"frames {frames} is not a multiple of {FRAME_LEN} (the VAE's chunks of {FRAME_LEN} "
                           "frames)")
            bad += [f"{name} {size} is not a multiple of {step} ({why})"
                    for name, size in (("height", height), ("width", width)) if size % step]
            if bad:
                problems.append(f"{DATA_KEY}.buckets entry {list(bucket)}: {'; '.join(bad)}")
        return problems
    # static resolution: num_frames (checked by the recipe) with max_height / max_width (or height / width)
    _, height, width = video.buckets[0]
    for name, size in (("height", height), ("width", width)):
        key = f"max_{name}" if f"max_{name}" in preprocess else name
        if size % step:
            near = sorted({max(step, size - size % step), size - size % step + step})
            problems.append(f"{DATA_KEY}.{key} = {size}; valid: a positive multiple of {step} ({why}), e.g. "
                            + " or ".join(map(str, near)))
    return problems


EXTRA_CHECKS = (training_size_problems,)
WEIGHT_CHECKS = (release_file_problems,)
