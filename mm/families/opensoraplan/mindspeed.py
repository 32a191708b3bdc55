"""MindSpeed-MM's Open-Sora-Plan 1.3 inference JSONs (``OpenSoraPlanPipeline``: the top-level keys of
``mm.families.mindspeed``; its ``pipeline_config`` with ``version``, ``use_attention_mask`` and
``model_type``) read as mm's ``inference`` section. The pipeline's prompt template of version 1.3 (its
quality words before every prompt, its negative prompt) comes with the file, as MindSpeed-MM samples it."""

from __future__ import annotations

import copy

from mm.families.mindspeed import in_layout, inference_section

PREDICTORS = {"videoditsparse": "t2v", "videoditsparsei2v": "i2v"}
# OpenSoraPlanPipeline.prompt_template for version v1.3 (its whitespace folded: the mT5 tokenizer folds it too)
PROMPT_PREFIX = "high quality, high aesthetic, "
NEGATIVE_PROMPT = ("nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                   "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                   "username, blurry.")


def translate(data: dict, problems: list[str], notes: list[str]) -> dict:
    """The model JSON with MindSpeed-MM's top-level inference keys in an ``inference`` section, for an
    Open-Sora-Plan predictor; as it is otherwise."""
    pred = data.get("predictor")
    model_id = pred.get("model_id") if isinstance(pred, dict) else None
    if model_id not in PREDICTORS or not in_layout(data):
        return data

    def pipeline_config(config: dict, section: dict, problems: list[str], notes: list[str]) -> None:
        version = config.pop("version", "v1.3")
        if version != "v1.3":
            problems.append(f"pipeline_config.version = {version!r}; valid: v1.3 (mm's Open-Sora-Plan is 1.3)")
        section["prompt_prefix"], section["negative_prompt"] = PROMPT_PREFIX, NEGATIVE_PROMPT
        notes.append("pipeline_config.version = 'v1.3': every prompt is sampled as OpenSoraPlanPipeline's template "
                     f"makes it ({PROMPT_PREFIX!r} before it, its fixed negative prompt)")
        if config.pop("use_attention_mask", True) is not True:
            problems.append("pipeline_config.use_attention_mask = false: mm's Open-Sora-Plan DiT masks the padded "
                            "caption tokens; valid: true")
        kind = config.pop("model_type", PREDICTORS[model_id])
        if kind != PREDICTORS[model_id]:
            problems.append(f"pipeline_config.model_type = {kind!r} with predictor.model_id = {model_id!r}; valid: "
                            f"{PREDICTORS[model_id]}")

    return inference_section(copy.deepcopy(data), problems, notes, ("OpenSoraPlanPipeline",), pipeline_config)
