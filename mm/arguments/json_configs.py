"""The model JSON (``--mm-model``) and data JSON (``--mm-data``) as typed objects.

The layout follows MindSpeed-MM's files (OpenSoraPlan 1.3): a model JSON has a ``predictor`` section and
optional ``ae``, ``text_encoder``, ``image_encoder`` and ``diffusion`` sections plus run-wide
switches (``enable_encoder_dp``, ``encoder_offload_interval``, ``text_encoder_fsdp``, ...); a data JSON has
``dataset_param`` (with ``basic_parameters.data_path`` pointing at a ``data.txt``) and
``dataloader_param``. The keys every run depends on are typed fields here; keys that only one
component interprets stay in that component's ``params`` and are checked by the component.
Unknown top-level keys are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm.arguments.errors import ConfigError
from mm.arguments.pipeline_layout import pipeline_rows

DTYPES = ("fp32", "bf16", "fp16")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's names, as MindSpeed-MM's JSONs use


def load_json(path: str, flag: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; errors name ``flag`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path!r}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path!r}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path!r}: the top level must be a JSON object, got {type(data).__name__}")
    return data


class _Reader:
    """Pops typed keys out of one JSON object, collecting problems under a key path."""

    def __init__(self, data: dict[str, Any], where: str, problems: list[str]):
        self.data = dict(data)
        self.where = where
        self.problems = problems

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kinds: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                self.problems.append(f"{self.key(name)} is required")
            return default
        value = self.data.pop(name)
        if value is None:
            return default
        # bool is an int subclass in Python; a JSON true is not a number
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
            names = "/".join(k.__name__ for k in _as_tuple(kinds))
            self.problems.append(f"{self.key(name)} = {value!r}: expected {names}")
            return default
        return value

    def section(self, name: str, required: bool = False) -> "_Reader | None":
        value = self.get(name, dict, required=required)
        return None if value is None else _Reader(value, self.key(name), self.problems)

    def rest(self) -> dict[str, Any]:
        return self.data

    def reject_rest(self, valid: list[str]) -> None:
        for name in self.data:
            self.problems.append(f"{self.key(name)}: unknown key; valid keys here: {', '.join(sorted(valid))}")


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


@dataclass
class ComponentConfig:
    """One model part (predictor, ae, text encoder ...): which implementation and its weights."""

    model_id: str
    from_pretrained: str | None = None
    dtype: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # keys the component itself interprets


@dataclass
class PredictorConfig(ComponentConfig):
    num_layers: int | None = None
    num_heads: int | None = None
    # 1-D [layers per stage] (PP) or 2-D [[layers per stage] per virtual chunk] (PP x VPP)
    pipeline_num_layers: list[int] | list[list[int]] | None = None


@dataclass
class AEConfig(ComponentConfig):
    vae_cp_size: int = 1


@dataclass
class ModelConfig:
    path: str
    predictor: PredictorConfig | None  # None only in a VAE's JSON (pretrain_vae.py)
    ae: AEConfig | None = None
    text_encoder: list[ComponentConfig] = field(default_factory=list)
    image_encoder: ComponentConfig | None = None
    diffusion: ComponentConfig | None = None
    # MindSpeed-MM's switches for training on extracted features (None: not given); mm reads both the
    # latents and the text embeddings from a dataset_type "feature" data JSON, or neither
    load_video_features: bool | None = None
    load_text_features: bool | None = None
    enable_encoder_dp: bool = False
    encoder_offload_interval: int = 1
    # training: shard each text encoder's parameters over the ranks of pipeline stage 0 (FSDP2)
    text_encoder_fsdp: bool = False
    task: str | None = None  # MindSpeed-MM's "task" ("t2v" / "i2v"): which entry point trains this JSON
    # MindSpeed-MM's patch.ae_float32: the frozen VAE computes in fp32 whatever the run's precision
    ae_float32: bool = False
    # MindSpeed-MM's dynamic DP/CP (mm.parallel.dynamic_cp): the CP degree chosen per iteration, up to
    # max_cp_size, as the smallest with (largest micro-batch video's element count / CP) <= max_seq_size
    use_dynamic_dpcp: bool = False
    max_cp_size: int | None = None
    max_seq_size: int | None = None
    # sections this issue does not type yet (sampling settings of inference JSONs, ...)
    extra: dict[str, Any] = field(default_factory=dict)


_COMPONENT_KEYS = ["model_id", "from_pretrained", "dtype"]


def _component(reader: _Reader, cls: type[ComponentConfig], **typed: Any) -> ComponentConfig:
    model_id = reader.get("model_id", str, default="", required=True)
    from_pretrained = reader.get("from_pretrained", str)
    dtype = reader.get("dtype", str)
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype is not None and dtype not in DTYPES:
        reader.problems.append(f"{reader.key('dtype')} = {dtype!r}; valid: {', '.join(DTYPES)} (or "
                               f"{', '.join(DTYPE_ALIASES)})")
    return cls(model_id=model_id, from_pretrained=from_pretrained, dtype=dtype, params=reader.rest(), **typed)


def _pipeline_num_layers(reader: _Reader) -> list | None:
    value = reader.get("pipeline_num_layers", list)
    if value is None:
        return None
    try:
        pipeline_rows(value)
    except ValueError as e:
        reader.problems.append(f"{reader.key('pipeline_num_layers')} = {value!r}: {e}")
        return None
    return value


_MODEL_KEYS = ["predictor", "ae", "text_encoder", "image_encoder", "diffusion", "load_video_features",
               "load_text_features", "enable_encoder_dp", "encoder_offload_interval", "text_encoder_fsdp", "inference",
               "task", "patch", "use_dynamic_dpcp", "max_cp_size", "max_seq_size"]
MODEL_TASKS = ("t2v", "i2v")
PATCH_KEYS = ("ae_float32",)  # MindSpeed-MM's model JSON "patch" options mm reads


def _patch_and_dpcp(top: _Reader, problems: list[str], notes: list[str]) -> tuple[bool, dict]:
    """MindSpeed-MM's ``patch`` options and dynamic DP/CP keys; returns ``patch.ae_float32`` and the
    dynamic DP/CP fields of ModelConfig (their fit to the layout: mm.arguments.validation)."""
    patch = top.section("patch")
    ae_float32 = False
    if patch is not None:
        ae_float32 = bool(patch.get("ae_float32", bool, default=False))
        patch.reject_rest(list(PATCH_KEYS))
    dynamic = top.get("use_dynamic_dpcp", bool, default=False)
    sizes = {key: top.get(key, int) for key in ("max_cp_size", "max_seq_size")}
    if dynamic:
        for key, value in sizes.items():
            if value is None:
                problems.append(f"use_dynamic_dpcp = true needs {key} (an integer >= 1; max_cp_size a power of 2)")
        cp, seq = sizes["max_cp_size"], sizes["max_seq_size"]
        if cp is not None and (cp < 1 or cp & (cp - 1)):
            problems.append(f"max_cp_size = {cp}; valid: a power of 2 (1, 2, 4, ...) dividing the data-parallel x "
                            "context-parallel ranks")
        if seq is not None and seq < 1:
            problems.append(f"max_seq_size = {seq}; valid: an integer >= 1 (the element count of the largest "
                            "micro-batch video one rank computes: CP is chosen so that numel / CP <= max_seq_size)")
    elif any(v is not None for v in sizes.values()):
        notes.append(f"{', '.join(k for k, v in sizes.items() if v is not None)}: read with use_dynamic_dpcp = true "
                     "only; the layout is --context-parallel-size's")
    return ae_float32, dict(use_dynamic_dpcp=bool(dynamic), **sizes) if dynamic else {}


def parse_model_config(data: dict[str, Any], path: str, problems: list[str],
                       require_predictor: bool = True, notes: list[str] | None = None) -> ModelConfig | None:
    """``require_predictor=False``: a JSON for a VAE alone (pretrain_vae.py) may leave the predictor out."""
    notes = [] if notes is None else notes
    top = _Reader(data, "", problems)
    ae_float32, dynamic_dpcp = _patch_and_dpcp(top, problems, notes)
    pred = top.section("predictor", required=require_predictor)
    predictor = None
    if pred is not None:
        typed = dict(num_layers=pred.get("num_layers", int), num_heads=pred.get("num_heads", int),
                     pipeline_num_layers=_pipeline_num_layers(pred))
        predictor = _component(pred, PredictorConfig, **typed)
    ae = None
    ae_reader = top.section("ae")
    if ae_reader is not None:
        output_dtype = ae_reader.get("output_dtype", str)
        if output_dtype is not None:  # MindSpeed-MM casts the latents to it; mm hands them to the DiT in its dtype
            if DTYPE_ALIASES.get(output_dtype, output_dtype) not in DTYPES:
                problems.append(f"ae.output_dtype = {output_dtype!r}; valid: {', '.join(DTYPES)}")
            else:
                notes.append(f"ae.output_dtype = {output_dtype!r}: the latents go to the DiT in its own dtype "
                             "(predictor.dtype / --bf16), as the DiT's input is cast there")
        ae = _component(ae_reader, AEConfig, vae_cp_size=ae_reader.get("vae_cp_size", int, default=1))
    text_encoders: list[ComponentConfig] = []
    raw_te = top.get("text_encoder", (dict, list))
    if raw_te is not None:
        items = raw_te if isinstance(raw_te, list) else [raw_te]
        for i, item in enumerate(items):
            where = "text_encoder" if isinstance(raw_te, dict) else f"text_encoder[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{where} = {item!r}: expected a JSON object")
                continue
            text_encoders.append(_component(_Reader(item, where, problems), ComponentConfig))
    image_reader = top.section("image_encoder")
    diffusion_reader = top.section("diffusion")
    config = ModelConfig(
        path=path,
        predictor=predictor,
        ae=ae,
        text_encoder=text_encoders,
        image_encoder=None if image_reader is None else _component(image_reader, ComponentConfig),
        diffusion=None if diffusion_reader is None else _component(diffusion_reader, ComponentConfig),
        load_video_features=top.get("load_video_features", bool, default=None),
        load_text_features=top.get("load_text_features", bool, default=None),
        enable_encoder_dp=top.get("enable_encoder_dp", bool, default=False),
        encoder_offload_interval=top.get("encoder_offload_interval", int, default=1),
        text_encoder_fsdp=top.get("text_encoder_fsdp", bool, default=False),
        task=top.get("task", str),
        ae_float32=ae_float32,
        **dynamic_dpcp,
        extra={"inference": top.get("inference", dict, default={})},
    )
    top.reject_rest(_MODEL_KEYS)
    if config.task is not None and config.task not in MODEL_TASKS:
        problems.append(f"task = {config.task!r}; valid: {', '.join(MODEL_TASKS)}")
    return config if predictor is not None or not require_predictor else None


DATASET_TYPES = ("t2v", "i2v", "flf2v", "t2i", "image", "feature")
# feature: extract_features.py's files (mm.data.features); the conditioning trained is the extraction's dataset type
# dataset_param keys of Open-Sora-Plan's inpainting (I2V) training masks, MindSpeed-MM's names; read by
# mm.models.predictor.opensoraplan.conditioning.MaskConfig (its KEYS)
MASK_KEYS = ("mask_type_ratio_dict_video", "mask_type_ratio_dict_image", "min_clear_ratio", "max_clear_ratio",
             "add_noise_to_condition")


@dataclass
class DataConfig:
    path: str
    dataset_type: str
    data_path: str
    data_folder: str | None = None
    data_storage_mode: str = "combine"
    preprocess: dict[str, Any] = field(default_factory=dict)  # interpreted by mm.data
    # tokenizer_config: one per text encoder, in order (a JSON object, or a list of them)
    tokenizers: list[dict[str, Any]] = field(default_factory=list)
    dataloader: dict[str, Any] = field(default_factory=dict)
    use_text_processer: bool = True
    masks: dict[str, Any] = field(default_factory=dict)  # MASK_KEYS given in dataset_param
    # dataset_type "feature": pre-extracted latents and text embeddings (mm.data.features); dataset_type
    # is then the extraction's (its features.json; "t2v" for files without one, as MindSpeed-MM's)
    features: bool = False
    # enable_text_preprocessing's text_preprocess_methods, applied to every caption before it is tokenized
    text_clean: list[str] = field(default_factory=list)
    # (samples, entries left out) of data.txt, as mm.data.sources.read_data_txt returns them, when the
    # entry point read them while checking the configuration; the data loader reads data.txt when None
    sources: tuple[list, Any] | None = field(default=None, repr=False)


def _tokenizers(ds: _Reader) -> list[dict[str, Any]]:
    value = ds.get("tokenizer_config", (dict, list))
    if value is None:
        return []
    items = [value] if isinstance(value, dict) else value
    if not all(isinstance(item, dict) for item in items):
        ds.problems.append(f"{ds.key('tokenizer_config')} = {value!r}: expected a JSON object, or a list of them (one "
                           "per text encoder)")
        return []
    return items


# MindSpeed-MM's dataloader_param.sampler_type values mm's sampler stands for: every micro-batch from one
# bucket (one shape), seeded, data-parallel, resumable (mm.data.sampler.BucketSampler)
# collate_param.model_name values whose collate mm's bucket collate stands for (MindSpeed-MM's DATA_COLLATOR names)
COLLATE_MODELS = ("open_sora_plan",)
SAMPLER_TYPES = ("LengthGroupedSampler", "BucketBatchSampler", "BaseRandomBatchSampler", "stateful_distributed_sampler")
DATALOADER_KEYS = ("dataloader_mode", "sampler_type", "shuffle", "drop_last", "pin_memory", "group_frame",
                   "group_resolution", "group_data", "initial_global_step_for_sampler", "collate_param",
                   "prefetch_factor", "persistent_workers")


def _dataloader(top: _Reader, problems: list[str], notes: list[str]) -> dict[str, Any]:
    """``dataloader_param``: MindSpeed-MM's keys, each honoured, noted (what mm does instead) or refused."""
    dl = top.section("dataloader_param")
    if dl is None:
        return {}
    out: dict[str, Any] = {}
    mode = dl.get("dataloader_mode", str, default="sampler")
    if mode != "sampler":
        problems.append(f"{dl.key('dataloader_mode')} = {mode!r}; valid: sampler")
    sampler = dl.get("sampler_type", str)
    if sampler is not None and sampler not in SAMPLER_TYPES:
        problems.append(f"{dl.key('sampler_type')} = {sampler!r}; valid: {', '.join(SAMPLER_TYPES)} (mm's bucket "
                        "sampler: every micro-batch from one bucket, seeded, data-parallel, resumable)")
    groups = {name: dl.get(name, bool) for name in ("group_frame", "group_resolution", "group_data")}
    if sampler is not None or any(v is not None for v in groups.values()):
        notes.append(f"{dl.key('sampler_type')}: mm's bucket sampler groups every micro-batch by the whole sample "
                     "shape (frames, height, width), as LengthGroupedSampler with group_data")
    out["shuffle"] = dl.get("shuffle", bool, default=True)
    if dl.get("drop_last", bool, default=True) is False:
        problems.append(f"{dl.key('drop_last')} = false: mm drops each bucket's incomplete global micro-batch (every "
                        "micro-batch holds --micro-batch-size samples of one shape); valid: true")
    out["pin_memory"] = dl.get("pin_memory", bool)
    step = dl.get("initial_global_step_for_sampler", int, default=0)
    if step:
        problems.append(f"{dl.key('initial_global_step_for_sampler')} = {step}: mm resumes the sampler from the "
                        "checkpoint's consumed samples (--load); valid: 0")
    collate = dl.get("collate_param", dict)
    if collate:
        name = collate.get("model_name")
        if name not in COLLATE_MODELS:
            problems.append(f"{dl.key('collate_param')}.model_name = {name!r}: mm's collate stacks one bucket's samples "
                            f"(the family's masks with them); valid: {', '.join(COLLATE_MODELS)} (or leave "
                            "collate_param out)")
        else:
            notes.append(f"{dl.key('collate_param')} = {collate!r}: mm's collate stacks one bucket's samples (every "
                         "micro-batch has one shape, so nothing is padded), with the family's masks; its other keys "
                         "are the data JSON's own (num_frames, max_height, max_width, group_*)")
    for name in ("prefetch_factor", "persistent_workers"):
        if dl.get(name, (int, bool)) is not None:
            notes.append(f"{dl.key(name)}: mm's loader prefetches 2 batches per worker with persistent workers "
                         "(--num-workers sets the workers)")
    dl.reject_rest(list(DATALOADER_KEYS))
    return out


TEXT_CLEAN_METHODS = ("whitespace_clean", "basic_clean")  # mm.data.captions, MindSpeed-MM's names


def _text_preprocessing(ds: _Reader) -> list[str]:
    """MindSpeed-MM's ``enable_text_preprocessing`` with ``text_preprocess_methods`` (one ``{"method": name}``
    or a list of them, applied in order to every caption before it is tokenized): the methods' names."""
    enabled = ds.get("enable_text_preprocessing", bool)
    methods = ds.get("text_preprocess_methods", (dict, list))
    if not enabled:
        return []
    entries = methods if isinstance(methods, list) else [methods] if methods else []
    if not entries:
        ds.problems.append(f"{ds.key('enable_text_preprocessing')} = true without text_preprocess_methods: MindSpeed-MM's "
                           f"default cleaning (clean_caption) is not in mm; valid: text_preprocess_methods with "
                           f"{' / '.join(TEXT_CLEAN_METHODS)}, or enable_text_preprocessing false")
        return []
    names = []
    for entry in entries:
        name = entry.get("method") if isinstance(entry, dict) else None
        if name not in TEXT_CLEAN_METHODS or (isinstance(entry, dict) and entry.get("param")):
            ds.problems.append(f"{ds.key('text_preprocess_methods')} entry {entry!r}; valid: {{\"method\": name}} with "
                               f"name one of {', '.join(TEXT_CLEAN_METHODS)}")
            continue
        names.append(name)
    return names


def parse_data_config(data: dict[str, Any], path: str, problems: list[str],
                      notes: list[str] | None = None) -> DataConfig | None:
    notes = [] if notes is None else notes
    top = _Reader(data, "", problems)
    ds = top.section("dataset_param", required=True)
    dataloader = _dataloader(top, problems, notes)
    top.reject_rest(["dataset_param", "dataloader_param"])
    if ds is None:
        return None
    dataset_type = ds.get("dataset_type", str, default="", required=True)
    if dataset_type and dataset_type not in DATASET_TYPES:
        problems.append(f"dataset_param.dataset_type = {dataset_type!r}; valid: {', '.join(DATASET_TYPES)}")
    basic = ds.section("basic_parameters", required=True)
    data_path, data_folder, mode = "", None, "combine"
    if basic is not None:
        data_path = basic.get("data_path", str, default="", required=True)
        data_folder = basic.get("data_folder", str)
        mode = basic.get("data_storage_mode", str, default="combine")
        basic.reject_rest(["data_path", "data_folder", "data_storage_mode"])
    config = DataConfig(
        path=path,
        dataset_type=dataset_type,
        data_path=data_path,
        data_folder=data_folder,
        data_storage_mode=mode,
        preprocess=ds.get("preprocess_parameters", dict, default={}),
        tokenizers=_tokenizers(ds),
        use_text_processer=ds.get("use_text_processer", bool, default=True),
        dataloader=dataloader,
        masks={key: ds.data.pop(key) for key in MASK_KEYS if key in ds.data},
    )
    config.text_clean = _text_preprocessing(ds)
    pre = config.preprocess
    unused = [k for k in ("max_height", "max_width") if k in pre and "max_hxw" in pre and pre.get("force_resolution") is False]
    if unused:  # MindSpeed-MM's dynamic-resolution files may keep the static sizes; its processor reads max_hxw then
        config.preprocess = {k: v for k, v in pre.items() if k not in unused}
        notes.append(f"{ds.key('preprocess_parameters')}.{' and '.join(unused)}: not read with force_resolution false "
                     "(each sample's size comes from max_hxw), as MindSpeed-MM's video processor does")
    if dataset_type == "feature":
        _feature_data(config, ds, problems, notes)
    ds.reject_rest(["dataset_type", "basic_parameters", "preprocess_parameters", "tokenizer_config",
                    "use_text_processer", "enable_text_preprocessing", "text_preprocess_methods", *MASK_KEYS])
    return config


def _feature_data(config: DataConfig, ds: _Reader, problems: list[str], notes: list[str]) -> None:
    """``dataset_type: feature``: the conditioning is the extraction's (its ``features.json``); the
    preprocessing already happened, except caption dropout, which needs the empty caption's embedding
    the features do not hold."""
    from mm.data.features import Manifest, feature_folder

    config.features = True
    folder = feature_folder(config.data_path, config.data_folder)
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError, TypeError) as e:
        problems.append(f"{folder / 'features.json'}: cannot be read ({e})")
        manifest = None
    config.dataset_type = manifest.dataset_type if manifest is not None else "t2v"
    read_at_extraction = sorted(set(config.preprocess) - {"cfg"})
    if read_at_extraction or config.tokenizers:
        notes.append(f"--mm-data {config.path}: dataset_type 'feature' reads the features as extracted; "
                     f"{', '.join(['tokenizer_config'] * bool(config.tokenizers) + read_at_extraction)} were the "
                     "extraction's to apply and are not read here")
    cfg = config.preprocess.get("cfg", 0.0)
    if isinstance(cfg, (int, float)) and cfg > 0:
        problems.append(f"{ds.key('preprocess_parameters')}.cfg = {cfg} with dataset_type 'feature': the features hold "
                        "each caption's embedding, not the empty caption's that caption dropout trains on; valid: 0 "
                        "(or train on the videos)")
