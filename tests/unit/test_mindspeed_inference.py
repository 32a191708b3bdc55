"""MindSpeed-MM's inference JSON layout (top-level pipeline keys) read as mm's inference section: each key
carried over, noted or refused by name (mm.families.mindspeed and the Wan / Open-Sora-Plan translations),
the sampling keys it brought (prompt prefix, image crop, videos per prompt), and the data JSON's
collate_param."""

from __future__ import annotations

import json

import pytest
import torch

from mm.data.images import centre_box, load_condition_frames
from mm.families import translate_model_json
from mm.inference.config import parse_sampling

UNIPC = {"model_id": "UniPCMultistepScheduler", "num_train_steps": 1000, "num_inference_steps": 40,
         "guidance_scale": [4.0, 3.0], "flow_shift": 3.0, "solver_order": 2, "use_flow_sigmas": True,
         "prediction_type": "flow_prediction", "beta_schedule": "linear"}


def _wan(**top) -> dict:
    """A Wan2.2 A14B T2V inference JSON in MindSpeed-MM's layout (its keys; tiny sizes do not matter here)."""
    data = {"pipeline_class": "WanPipeline", "prompt": "prompts.txt", "save_path": "out/", "use_prompt_preprocess": False,
            "dtype": "bf16", "device": "npu", "frame_interval": 2, "fps": 16, "boundary_ratio": 0.875,
            "low_noise_predictor": "ckpt/low", "pipeline_config": {"input_size": [81, 480, 720], "cpu_offload": True},
            "tokenizer": {"autotokenizer_name": "AutoTokenizer", "hub_backend": "hf", "from_pretrained": "w/tokenizer/"},
            "text_encoder": {"model_id": "UMT5", "hub_backend": "hf", "from_pretrained": "w/text_encoder/"},
            "ae": {"model_id": "wan_video_vae", "from_pretrained": "w/vae/"},
            "predictor": {"model_id": "wandit", "model_type": "wan2.2-t2v", "num_layers": 2, "num_heads": 2},
            "diffusion": dict(UNIPC)}
    data.update(top)
    return data


def _translate(data: dict) -> tuple[dict, list[str], list[str]]:
    problems, notes = [], []
    return translate_model_json(data, problems, notes), problems, notes


def test_wan_s_layout_becomes_the_inference_section():
    out, problems, notes = _translate(_wan())
    assert problems == []
    assert out["inference"] == {
        "prompt": "prompts.txt", "save_path": "out/", "boundary_ratio": 0.875, "low_noise_model": "ckpt/low",
        "fps": 8, "num_frames": 81, "height": 480, "width": 720, "offload_model": True, "sample_solver": "unipc",
        "sample_steps": 40, "sample_shift": 3.0, "guidance_scale": 4.0, "guidance_scale_2": 3.0}
    assert out["diffusion"] == {"model_id": "flow_matching", "shift": 3.0}
    assert out["text_encoder"]["tokenizer"] == "w/tokenizer/" and out["predictor"]["model_id"] == "wan_dit"
    assert not any(key in out for key in ("pipeline_class", "device", "dtype", "pipeline_config", "tokenizer"))
    assert any(n.startswith("device = 'npu'") for n in notes) and any("frame_interval = 2" in n for n in notes)


@pytest.mark.parametrize("change, message", [
    ({"use_prompt_preprocess": True}, "use_prompt_preprocess = true"),
    ({"pipeline_class": "OpenSoraPlanPipeline"}, "pipeline_class = 'OpenSoraPlanPipeline' with this predictor; valid: "
                                                 "WanPipeline"),
    ({"video": "v.txt", "strength": 0.7}, "video, strength: video-to-video"),
    ({"pipeline_config": {"input_size": [81, 480]}}, "pipeline_config.input_size = [81, 480]"),
    ({"pipeline_config": {"input_size": [9, 64, 64], "add_noise": 1}}, "pipeline_config.add_noise: unknown key"),
    ({"frame_interval": 0}, "frame_interval = 0"),
    ({"mask_type": "transition"}, "mask_type = 'transition'"),
    ({"inference": {"sample_steps": 3}}, "mixes MindSpeed-MM's top-level inference keys"),
    ({"diffusion": dict(UNIPC, solver_order=3)}, "diffusion.solver_order = 3: mm's unipc solver is Wan's flow UniPC"),
    ({"diffusion": dict(UNIPC, karras=True)}, "diffusion.karras: not a UniPCMultistepScheduler key"),
    ({"tokenizer": {"from_pretrained": "t", "padding": "max"}}, "tokenizer.padding: unknown key"),
])
def test_what_mm_does_not_do_is_refused_by_name(change, message):
    _, problems, _ = _translate(_wan(**change))
    assert any(message in p for p in problems), problems


def test_mm_s_own_layout_is_left_alone():
    data = {"predictor": {"model_id": "wan_dit"}, "diffusion": {"model_id": "flow_matching"},
            "inference": {"prompt": "x", "sample_steps": 3}}
    out, problems, notes = _translate(json.loads(json.dumps(data)))
    assert out == data and problems == [] and notes == []


def test_dual_image_reads_first_and_last_frames(tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("a.png, b.png\n\nc.png,d.png\n")
    out, problems, _ = _translate(_wan(image=str(listing), dual_image=True,
                                       image_encoder={"from_pretrained": "w/image_encoder/"}))
    assert problems == []
    assert out["inference"]["image"] == ["a.png", "c.png"] and out["inference"]["last_image"] == ["b.png", "d.png"]
    assert out["image_encoder"] == {"model_id": "clip", "from_pretrained": "w/image_encoder/"}
    listing.write_text("a.png\n")
    assert any("line 1" in p for p in _translate(_wan(image=str(listing), dual_image=True))[1])


def _osp(kind: str = "t2v", **top) -> dict:
    data = {"predictor": {"model_id": "videoditsparse" if kind == "t2v" else "videoditsparsei2v"},
            "diffusion": {"model_id": "EulerAncestralDiscrete", "num_inference_steps": 100, "device": "npu"},
            "text_encoder": {"model_id": "MT5", "from_pretrained": "w/mt5"},
            "tokenizer": {"hub_backend": "hf", "from_pretrained": "w/mt5", "model_max_length": 512},
            "pipeline_config": {"version": "v1.3", "use_attention_mask": True, "input_size": [93, 352, 640],
                                "model_type": kind},
            "frame_interval": 1, "save_path": "s/", "fps": 18, "prompt": "p.txt", "pipeline_class": "OpenSoraPlanPipeline"}
    data.update(top)
    return data


def test_open_sora_plan_s_layout_brings_its_prompt_template():
    from mm.families.opensoraplan.mindspeed import NEGATIVE_PROMPT, PROMPT_PREFIX

    out, problems, _ = _translate(_osp("i2v", conditional_pixel_values_path="c.txt", mask_type="i2v", crop_for_hw=True,
                                       max_hxw=236544))
    assert problems == []
    section = out["inference"]
    assert section["prompt_prefix"] == PROMPT_PREFIX and section["negative_prompt"] == NEGATIVE_PROMPT
    assert (section["num_frames"], section["height"], section["width"], section["fps"]) == (93, 352, 640, 18)
    assert section["crop_images"] is True and section["conditional_pixel_values_path"] == "c.txt"
    assert section["model_max_length"] == 512 and "tokenizer" not in out["text_encoder"]  # the encoder's own
    assert out["diffusion"]["device"] == "npu"  # the Open-Sora-Plan sampler notes it itself


@pytest.mark.parametrize("change, message", [
    ({"pipeline_config": {"version": "v1.2"}}, "pipeline_config.version = 'v1.2'"),
    ({"pipeline_config": {"model_type": "i2v"}}, "pipeline_config.model_type = 'i2v' with predictor.model_id = "
                                                 "'videoditsparse'"),
    ({"pipeline_config": {"use_attention_mask": False}}, "use_attention_mask = false"),
    ({"max_hxw": 236544}, "max_hxw = 236544 without crop_for_hw = true"),
    ({"pipeline_class": "WanPipeline"}, "valid: OpenSoraPlanPipeline"),
])
def test_open_sora_plan_refusals(change, message):
    _, problems, _ = _translate(_osp(**change))
    assert any(message in p for p in problems), problems


def test_videos_per_prompt_repeats_each_prompt_and_its_image(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    problems = []
    sampling = parse_sampling({"prompt": ["one", "two"], "num_inference_videos_per_sample": 2,
                               "image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "prompt_prefix": "hq, "},
                              8, 4, (1, 2, 2), problems)
    assert problems == []
    assert sampling.prompts == ["one", "one", "two", "two"] and sampling.prompt_prefix == "hq, "
    assert [p[-5:] for p in sampling.images] == ["a.png", "a.png", "b.png", "b.png"]


def test_centre_box_keeps_the_target_aspect_ratio():
    assert centre_box((200, 100), 64, 64) == (50, 0, 150, 100)  # wider: the full height, centred
    assert centre_box((100, 300), 50, 100) == (0, 125, 100, 175)  # taller: the full width, centred
    left, top, right, bottom = centre_box((1000, 999), 352, 640)
    assert (right - left) / (bottom - top) == pytest.approx(640 / 352, rel=2e-3)


def test_cropped_condition_frames_are_not_stretched(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (192, 64), (0, 0, 255))  # blue, with a red centre square of the target's shape
    image.paste((255, 0, 0), (64, 0, 128, 64))
    image.save(tmp_path / "wide.png")
    cropped = load_condition_frames([str(tmp_path / "wide.png")], 32, 32, crop=True)
    stretched = load_condition_frames([str(tmp_path / "wide.png")], 32, 32)
    assert cropped.shape == (1, 3, 1, 32, 32)
    assert torch.allclose(cropped[0, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None, None], atol=0.02)
    assert stretched[0, 2, 0, :, 0].mean() > 0.9  # the blue side survives a plain resize


@pytest.mark.parametrize("collate, ok", [({"model_name": "open_sora_plan", "batch_size": 1}, True),
                                         ({"model_name": "qwen2vl"}, False)])
def test_collate_param_of_open_sora_plan_is_mm_s_bucket_collate(tmp_path, collate, ok):
    from mm.arguments.json_configs import parse_data_config

    data = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": "d.txt"},
                              "preprocess_parameters": {"num_frames": 9}, "tokenizer_config": {"from_pretrained": "t"}},
            "dataloader_param": {"collate_param": collate}}
    problems, notes = [], []
    parse_data_config(data, "data.json", problems, notes)
    assert any("collate_param" in m for m in (notes if ok else problems)), (problems, notes)
    if ok:
        assert not any("collate_param" in p for p in problems)


@pytest.mark.parametrize("key, value, message", [
    ("vae_scale_factor", [4, 16, 16], "ae.vae_scale_factor = [4, 16, 16]"),
    ("i2v_processor", {"processor_id": "other"}, "ae.i2v_processor = {'processor_id': 'other'}"),
    ("output_dtype", "bf16", None),  # read by the model JSON's reader (noted), never reaching the VAE
])
def test_mindspeed_mm_s_wfvae_keys_are_checked_before_start(key, value, message):
    from mm.arguments.json_configs import parse_model_config
    from mm.families import family_for

    problems, notes = [], []
    model = parse_model_config({"predictor": {"model_id": "videoditsparse", "num_layers": 1, "num_heads": 2},
                                "ae": {"model_id": "wfvae", "from_pretrained": "v.pt", key: value,
                                       "vae_scale_factor": [4, 8, 8]} if key != "vae_scale_factor" else
                                {"model_id": "wfvae", "from_pretrained": "v.pt", key: value}},
                               "model.json", problems, notes=notes)
    assert problems == []
    found = family_for("videoditsparse").extra_checks[0](type("C", (), {"model": model})(), None)
    if message is None:
        assert found == [] and any("ae.output_dtype = 'bf16'" in n for n in notes)
    else:
        assert any(message in p for p in found), found


def _wan_train_pipeline() -> dict:
    """MindSpeed-MM's Wan data JSONs' train_pipeline (examples/wan2.1/feature_extract/data.json's steps)."""
    resize = {"transform_size": "auto", "interpolation_mode": "bilinear", "antialias": True, "mode": "shortside"}
    crop = {"use_short_edge": False, "top_crop": False, "align_corners": False, "antialias": True,
            "transform_size": "auto"}
    half = {"mean": 0.5, "std": 0.5}
    return {
        "video_and_first_frame": [{"trans_type": "ResizeVideo", "param": resize}, {"trans_type": "ToTensorVideo"}],
        "video_only": [{"trans_type": "CenterCropResizeVideo", "param": crop}, {"trans_type": "norm_fun", "param": half}],
        "first_frame_clip": [
            {"trans_type": "ResizeVideo", "param": {"transform_size": {"max_height": 224, "max_width": 224},
                                                    "mode": "resize", "interpolation_mode": "bicubic",
                                                    "align_corners": False, "antialias": False}},
            {"trans_type": "norm_fun", "param": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                 "std": [0.26862954, 0.26130258, 0.27577711]}}],
        "first_frame_vae": [
            {"trans_type": "ResizeVideo", "param": {"transform_size": "auto", "mode": "resize",
                                                    "interpolation_mode": "bilinear", "align_corners": False,
                                                    "antialias": False}},
            {"trans_type": "norm_fun", "param": half}]}


def _wan_preprocess(pipeline: dict) -> dict:
    return {"video_processor_type": "OpensoraplanVideoProcessor", "num_frames": 9, "min_num_frames": 1,
            "max_hxw": 4096, "hw_stride": 8, "force_resolution": False, "train_fps": 8, "train_pipeline": pipeline}


def test_wan_s_train_pipeline_is_mm_s_dynamic_crop():
    from mm.data.dataset import VideoDataConfig
    from mm.data.geometry import ResizeOptions

    config = VideoDataConfig.from_json(_wan_preprocess(_wan_train_pipeline()), "t2v")
    assert config.per_sample.video == ResizeOptions(align_corners=False, antialias=True, top_crop=False)


@pytest.mark.parametrize("kind, index, key, value", [
    ("video_only", 1, "mean", 0.4),                       # another normalisation
    ("video_and_first_frame", 0, "mode", "longside"),     # another resize
    ("first_frame_clip", 0, "interpolation_mode", "bilinear"),  # not what mm's CLIP encoder does
    ("video_only", 0, "top_crop", True),
])
def test_wan_s_train_pipeline_refuses_what_mm_does_not_do(kind, index, key, value):
    from mm.data.dataset import VideoDataConfig

    pipeline = _wan_train_pipeline()
    pipeline[kind][index]["param"][key] = value
    with pytest.raises(ValueError, match=f"train_pipeline.{kind}\\[{index}\\].param"):
        VideoDataConfig.from_json(_wan_preprocess(pipeline), "t2v")
    pipeline = _wan_train_pipeline()
    del pipeline["video_only"]
    with pytest.raises(ValueError, match="needs video_and_first_frame and video_only"):
        VideoDataConfig.from_json(_wan_preprocess(pipeline), "t2v")
