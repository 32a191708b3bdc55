"""Wan's and Phantom's own generate configuration in the model JSON's inference section
(``mm.families.wan.release``): each task name's defaults as Wan's configs give them, sizes, nulls,
the sections built from a release directory (``ckpt_dir``, ``phantom_ckpt``), and the messages."""

from __future__ import annotations

import ast
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from mm.families import expand_model_json
from mm.families.wan.release import WAN_NEGATIVE_PROMPT, WAN_TASKS
from mm.inference.config import parse_sampling
from tests.module_stubs import modules_replaced

# Wan's configs and generate.py's rules, written out by hand (Wan2.1 9737cba: wan/configs/*.py and
# generate.py's _validate_args; Phantom's generate.py and phantom_wan/configs; Wan2.2's wan/configs):
# task -> (mm task, sizes, steps, shift at the first size, guidance, frames, fps, DiT dim/ffn/heads/layers)
WAN_CONFIGS = {
    "t2v-1.3B": ("t2v", ("480*832", "832*480"), 50, 5.0, 5.0, 81, 16, (1536, 8960, 12, 30)),
    "t2v-14B": ("t2v", ("720*1280", "1280*720", "480*832", "832*480"), 50, 5.0, 5.0, 81, 16, (5120, 13824, 40, 40)),
    "i2v-14B": ("i2v", ("720*1280", "1280*720", "480*832", "832*480"), 40, 5.0, 5.0, 81, 16, (5120, 13824, 40, 40)),
    "flf2v-14B": ("flf2v", ("720*1280", "1280*720", "480*832", "832*480"), 50, 16.0, 5.0, 81, 16,
                  (5120, 13824, 40, 40)),
    "s2v-1.3B": ("s2v", ("832*480",), 50, 5.0, 5.0, 81, 16, (1536, 8960, 12, 30)),
    "s2v-14B": ("s2v", ("832*480", "1280*720"), 50, 5.0, 5.0, 81, 16, (5120, 13824, 40, 40)),
    "ti2v-5B": ("t2v", ("704*1280", "1280*704"), 50, 5.0, 5.0, 121, 24, (3072, 14336, 24, 30)),
    "t2v-A14B": ("t2v", ("720*1280", "1280*720", "480*832", "832*480"), 40, 12.0, (3.0, 4.0), 81, 16,
                 (5120, 13824, 40, 40)),
    "i2v-A14B": ("i2v", ("720*1280", "1280*720", "480*832", "832*480"), 40, 5.0, (3.5, 3.5), 81, 16,
                 (5120, 13824, 40, 40)),
}


def test_every_task_name_has_wans_defaults():
    assert sorted(WAN_TASKS) == sorted(WAN_CONFIGS)
    for name, (task, sizes, steps, shift, guidance, frames, fps, arch) in WAN_CONFIGS.items():
        spec = WAN_TASKS[name]
        assert (spec.task, spec.sizes, spec.sample_steps, spec.shift_for(sizes[0]), spec.guidance, spec.num_frames,
                spec.fps) == (task, sizes, steps, shift, guidance, frames, fps), name
        assert tuple(spec.arch[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers")) == arch, name
    # Wan2.1 I2V at 480p shifts by 3; the negative prompts Wan's pipelines fall back to
    assert WAN_TASKS["i2v-14B"].shift_for("832*480") == 3.0 and WAN_TASKS["i2v-14B"].shift_for("1280*720") == 5.0
    assert WAN_TASKS["t2v-1.3B"].negative_prompt == WAN_NEGATIVE_PROMPT
    assert WAN_TASKS["i2v-14B"].negative_prompt == "镜头晃动，" + WAN_NEGATIVE_PROMPT
    assert WAN_TASKS["flf2v-14B"].negative_prompt == "镜头切换，镜头晃动，" + WAN_NEGATIVE_PROMPT


def _reference_configs(root: Path, package: str) -> dict:
    """WAN_CONFIGS / SUPPORTED_SIZES of a Wan checkout's wan/configs, run with easydict stood in."""
    easydict = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)

        __getattr__ = dict.__getitem__

        def __setattr__(self, k, v):
            self[k] = v

        def __deepcopy__(self, memo):
            import copy
            return EasyDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    easydict.EasyDict = EasyDict
    import importlib.util

    pkg = types.ModuleType(package)
    pkg.__path__ = [str(root / "wan")]
    spec = importlib.util.spec_from_file_location(f"{package}.configs", root / "wan/configs/__init__.py",
                                                  submodule_search_locations=[str(root / "wan/configs")])
    module = importlib.util.module_from_spec(spec)
    with modules_replaced({"easydict": easydict, package: pkg, f"{package}.configs": module}):
        spec.loader.exec_module(module)
        return {"configs": module.WAN_CONFIGS, "sizes": module.SUPPORTED_SIZES}


def _generate_default(root: Path, ref: dict, task: str, key: str, size: str):
    """What a Wan checkout's generate.py _validate_args sets for a None ``key`` (run on its source)."""
    import random

    tree = ast.parse((root / "generate.py").read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_validate_args")
    namespace = {"WAN_CONFIGS": ref["configs"], "SUPPORTED_SIZES": ref["sizes"], "random": random, "sys": sys,
                 "EXAMPLE_PROMPT": {name: {} for name in ref["configs"]}}
    exec(compile(ast.Module(body=[func], type_ignores=[]), "generate.py", "exec"), namespace)
    args = types.SimpleNamespace(ckpt_dir=".", task=task, sample_steps=None, sample_shift=None, frame_num=None,
                                 base_seed=1, size=size, prompt="x", image="x", sample_guide_scale=None)
    try:
        namespace["_validate_args"](args)
    except (AssertionError, KeyError):
        pass
    return getattr(args, key)


@pytest.mark.parametrize("var,names", [("MM_WAN_REF", ("t2v-1.3B", "t2v-14B", "i2v-14B", "flf2v-14B")),
                                       ("MM_WAN22_REF", ("ti2v-5B", "t2v-A14B", "i2v-A14B"))])
def test_the_table_equals_the_reference_configs(var, names):
    root = os.environ.get(var)
    if not root:
        pytest.skip(f"{var} is not set (a Wan checkout: Wan2.1 at 9737cba / Wan2.2)")
    ref = _reference_configs(Path(root), f"_wanref_{var.lower()}")
    for name in names:
        spec, cfg = WAN_TASKS[name], ref["configs"][name]
        assert spec.sizes == tuple(ref["sizes"][name]), name
        assert (spec.arch["dim"], spec.arch["ffn_dim"], spec.arch["num_heads"], spec.arch["num_layers"]) == \
            (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers), name
        assert spec.negative_prompt == cfg.sample_neg_prompt, name
        assert spec.fps == cfg.sample_fps, name
        for size in spec.sizes:
            if var == "MM_WAN22_REF":
                assert (spec.sample_steps, spec.shift_for(size), spec.num_frames) == \
                    (cfg.sample_steps, cfg.sample_shift, cfg.frame_num), name
                assert spec.guidance == cfg.sample_guide_scale, name
            else:
                assert spec.sample_steps == _generate_default(Path(root), ref, name, "sample_steps", size), name
                assert spec.shift_for(size) == _generate_default(Path(root), ref, name, "sample_shift", size), (name, size)


def _expand(section: dict, **sections) -> tuple[dict, list[str], list[str]]:
    problems, notes = [], []
    out = expand_model_json(dict(sections, inference=section), problems, notes)
    return out, problems, notes


def _sampling(out: dict) -> tuple:
    problems = []
    config = parse_sampling(out["inference"], 8, 4, (1, 2, 2), problems)
    return config, problems


def test_nulls_take_the_tasks_defaults_and_size_is_width_by_height():
    out, problems, _ = _expand({"task": "t2v-A14B", "size": "832*480", "prompt": "a cat", "sample_steps": None,
                                "sample_shift": None, "sample_guide_scale": None, "frame_num": None,
                                "low_noise_model": ".", "boundary_ratio": 0.875})
    assert problems == []
    config, problems = _sampling(out)
    assert problems == []
    assert (config.task, config.width, config.height, config.sample_steps, config.sample_shift, config.num_frames) == \
        ("t2v", 832, 480, 40, 12.0, 81)
    # Wan2.2's (low-noise, high-noise) pair: guidance_scale is the high-noise expert's (the predictor)
    assert (config.guidance_scale, config.guidance_scale_2) == (4.0, 3.0)
    assert config.negative_prompt == WAN_NEGATIVE_PROMPT
    # given values win; i2v-14B at 480p shifts by 3, at 720p by 5
    out, problems, _ = _expand({"task": "i2v-14B", "size": "480*832", "prompt": "x", "image": __file__,
                                "sample_steps": 7, "negative_prompt": "blur"})
    config, more = _sampling(out)
    assert problems == [] and more == []
    assert (config.task, config.sample_steps, config.sample_shift, config.negative_prompt, config.height) == \
        ("i2v", 7, 3.0, "blur", 832)
    out, _, _ = _expand({"task": "i2v-14B", "size": "1280*720", "prompt": "x", "image": __file__})
    assert _sampling(out)[0].sample_shift == 5.0
    # Phantom's s2v-1.3B: 50 steps, shift 5, 81 frames
    out, problems, _ = _expand({"task": "s2v-1.3B", "size": "832*480", "prompt": "x", "ref_images": [__file__],
                                "sample_steps": None, "sample_shift": None, "frame_num": None})
    config, more = _sampling(out)
    assert problems == [] and more == []
    assert (config.task, config.sample_steps, config.sample_shift, config.num_frames) == ("s2v", 50, 5.0, 81)
    # TI2V-5B samples t2v, or i2v with an image
    out, _, _ = _expand({"task": "ti2v-5B", "prompt": "x", "image": __file__})
    assert out["inference"]["task"] == "i2v" and (out["inference"]["width"], out["inference"]["height"]) == (1280, 704)


def test_a_size_wan_does_not_support_lists_the_valid_ones():
    _, problems, _ = _expand({"task": "t2v-1.3B", "size": "1280*720", "prompt": "x"})
    assert problems == ["inference.size = '1280*720' is not a size Wan supports for task 't2v-1.3B'; valid: "
                        "480*832, 832*480 (width*height)"]
    _, problems, _ = _expand({"task": "s2v-1.3B", "size": "832x480", "prompt": "x"})
    assert "valid: 832*480 (width*height)" in problems[0]
    _, problems, _ = _expand({"task": "t2v-1.3B", "size": "832*480", "height": 480, "prompt": "x"})
    assert problems == ["inference.size = '832*480' and inference.height/width: give one or the other"]


def test_size_without_a_task_name_and_unknown_keys_in_one_message():
    config, problems = _sampling({"inference": {"prompt": "x", "size": "64*32"}})
    assert problems == [] and (config.width, config.height) == (64, 32)
    _, problems = _sampling({"inference": {"prompt": "x", "size": "wide"}})
    assert problems == ["inference.size = 'wide'; valid: \"W*H\" (width*height, e.g. \"832*480\")"]
    _, problems = _sampling({"inference": {"prompt": "x", "colour": 1, "shape": 2}})
    assert len(problems) == 1 and problems[0].startswith("inference: unknown keys colour, shape; valid: prompt, ")
    assert problems[0].count("prompt_file") == 1


def test_release_keys_need_a_task_name():
    _, problems, _ = _expand({"task": "t2v", "ckpt_dir": ".", "prompt": "x"})
    assert len(problems) == 1 and problems[0].startswith("inference.ckpt_dir is read with a release's task name in "
                                                         "inference.task (task is 't2v'); valid task names: t2v-1.3B,")
    _, problems, _ = _expand({"task": "t2v-1.3B", "phantom_ckpt": "x.pth", "prompt": "x"})
    assert problems == ["inference.phantom_ckpt is Phantom's DiT (tasks s2v-1.3B, s2v-14B); task is 't2v-1.3B'"]


def _tiny_dit_release(root: Path, image: bool = False, seed: int = 0) -> dict:
    """A 1-layer Wan DiT in the original release's layout: config.json + safetensors (original keys)."""
    from safetensors.torch import save_file

    from mm.models.predictor.wan.weights import WAN_NAME_TABLE

    torch.manual_seed(seed)
    dim, ffn, text, freq, channels = 32, 64, 16, 8, 36 if image else 16
    shapes = {"patch_embedding.weight": [dim, channels, 1, 4, 4], "patch_embedding.bias": [dim],
              "time_embedding.0.weight": [dim, freq], "text_embedding.0.weight": [dim, text],
              "head.head.weight": [16 * 16, dim]}
    state = {}
    for rule in WAN_NAME_TABLE:
        for key in rule.original:
            if "img_emb" in key or "_img" in key:
                continue
            name = key.replace("{i}", "0")
            state[name] = torch.randn(shapes.get(name, [4]))
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "WanModel", "dim": dim, "ffn_dim": ffn, "num_heads": 2, "num_layers": 1,
              "in_dim": channels, "out_dim": 16, "freq_dim": freq, "text_len": 512, "eps": 1e-6,
              "model_type": "i2v" if image else "t2v"}
    (root / "config.json").write_text(json.dumps(config))
    return state


def _release_files(root: Path, vae: str = "Wan2.1_VAE.pth", clip: bool = False) -> None:
    for name in [vae, "models_t5_umt5-xxl-enc-bf16.pth"] + (
            ["models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"] if clip else []):
        (root / name).write_bytes(b"")
    (root / "google" / "umt5-xxl").mkdir(parents=True)


def test_ckpt_dir_builds_the_missing_sections(tmp_path):
    root = tmp_path / "Wan2.1-I2V-14B-480P"
    _tiny_dit_release(root, image=True)
    _release_files(root, clip=True)
    out, problems, notes = _expand({"task": "i2v-14B", "size": "832*480", "ckpt_dir": str(root), "prompt": "x",
                                    "image": __file__})
    assert problems == []
    pred = out["predictor"]
    assert (pred["model_id"], pred["from_pretrained"], pred["hidden_size"], pred["num_heads"], pred["num_layers"],
            pred["in_dim"], pred["out_dim"], pred["patch_size"], pred["text_dim"], pred["freq_dim"]) == \
        ("wan_dit", str(root), 32, 2, 1, 36, 16, [1, 4, 4], 16, 8)
    assert out["ae"] == {"model_id": "wan_vae", "from_pretrained": str(root / "Wan2.1_VAE.pth")}
    assert out["text_encoder"] == {"model_id": "umt5", "from_pretrained": str(root / "models_t5_umt5-xxl-enc-bf16.pth"),
                                   "tokenizer": str(root / "google" / "umt5-xxl"), "dtype": "bf16"}
    assert out["image_encoder"]["from_pretrained"] == str(root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    assert "ckpt_dir" not in out["inference"] and out["inference"]["task"] == "i2v"
    assert notes == [f"the DiT of {root} is not i2v-14B's architecture (dim 32 (task: 5120), ffn_dim 64 (task: 13824), "
                     "num_heads 2 (task: 40), num_layers 1 (task: 40)): sampled as the files describe it"]
    # a section the JSON gives is kept as it is
    out, problems, _ = _expand({"task": "i2v-14B", "ckpt_dir": str(root), "prompt": "x", "image": __file__},
                               ae={"model_id": "wan_vae", "from_pretrained": "mine"})
    assert problems == [] and out["ae"] == {"model_id": "wan_vae", "from_pretrained": "mine"}


def test_phantom_and_a14b_layouts(tmp_path):
    base = tmp_path / "Wan2.1-T2V-1.3B"
    _tiny_dit_release(base)
    _release_files(base)
    phantom = tmp_path / "Phantom-Wan-1.3B.pth"
    torch.save(_tiny_dit_release(tmp_path / "other", seed=1), phantom)
    out, problems, _ = _expand({"task": "s2v-1.3B", "size": "832*480", "ckpt_dir": str(base),
                                "phantom_ckpt": str(phantom), "prompt": "x", "ref_image": __file__})
    assert problems == []
    assert out["predictor"]["from_pretrained"] == str(phantom) and out["inference"]["task"] == "s2v"
    _, problems, _ = _expand({"task": "s2v-1.3B", "ckpt_dir": str(base), "prompt": "x"})
    assert problems == ["inference.task = 's2v-1.3B' is Phantom's: give inference.phantom_ckpt (its Phantom-Wan .pth, "
                        "or the directory of its sharded safetensors)"]
    a14b = tmp_path / "Wan2.2-T2V-A14B"
    _tiny_dit_release(a14b / "high_noise_model")
    _tiny_dit_release(a14b / "low_noise_model", seed=2)
    _release_files(a14b)
    out, problems, _ = _expand({"task": "t2v-A14B", "size": "832*480", "ckpt_dir": str(a14b), "prompt": "x"})
    assert problems == []
    assert out["predictor"]["from_pretrained"] == str(a14b / "high_noise_model")
    assert (out["inference"]["low_noise_model"], out["inference"]["boundary_ratio"]) == \
        (str(a14b / "low_noise_model"), 0.875)
    config, problems = _sampling(out)
    assert problems == [] and (config.guidance_scale, config.guidance_scale_2) == (4.0, 3.0)


def test_missing_release_files_are_named(tmp_path):
    root = tmp_path / "Wan2.2-TI2V-5B"
    root.mkdir()
    _, problems, _ = _expand({"task": "ti2v-5B", "ckpt_dir": str(root), "prompt": "x"})
    where = f"inference.ckpt_dir = {str(root)!r}"
    assert problems == [f"{where}: no config.json there (the DiT's config.json; Wan's release layout)",
                        f"{where}: no Wan2.2_VAE.pth there (the VAE; Wan's release layout)",
                        f"{where}: no models_t5_umt5-xxl-enc-bf16.pth there (the UMT5 text encoder; Wan's release "
                        "layout)",
                        f"{where}: no google/umt5-xxl there (its tokenizer; Wan's release layout)"]
    _, problems, _ = _expand({"task": "ti2v-5B", "ckpt_dir": str(tmp_path / "nope"), "prompt": "x"})
    assert problems == [f"inference.ckpt_dir = {str(tmp_path / 'nope')!r}: not a directory (Wan's release directory "
                        "for task 'ti2v-5B', as downloaded)"]


def test_an_image_shapes_image_to_video_within_the_size(tmp_path):
    """Wan's I2V: size is the largest area, the image's aspect ratio shapes the video (worked by hand
    from Wan2.1's image2video.py and Wan2.2's best_output_size)."""
    from PIL import Image

    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    Image.new("RGB", (300, 200)).save(wide)
    Image.new("RGB", (64, 64)).save(square)
    out, problems, _ = _expand({"task": "i2v-14B", "size": "832*480", "prompt": "x", "image": str(wide)})
    assert problems == [] and (out["inference"]["width"], out["inference"]["height"]) == (768, 512)
    assert out["inference"]["sample_shift"] == 3.0  # Wan reads the 480p size itself for the shift
    video = tmp_path / "ti2v.png"
    Image.new("RGB", (1280, 720)).save(video)
    out, problems, _ = _expand({"task": "ti2v-5B", "size": "1280*704", "prompt": "x", "image": str(video)})
    assert problems == [] and (out["inference"]["width"], out["inference"]["height"]) == (1248, 704)
    # height and width given in mm's keys are taken as they are
    out, _, _ = _expand({"task": "i2v-14B", "height": 480, "width": 832, "prompt": "x", "image": str(wide)})
    assert (out["inference"]["width"], out["inference"]["height"]) == (832, 480)
    _, problems, _ = _expand({"task": "i2v-14B", "size": "832*480", "prompt": ["x", "y"],
                              "image": [str(wide), str(square)]})
    assert problems == [f"inference.image: Wan sizes each i2v-14B video by its image's aspect ratio within size = "
                        f"832*480, and these images give different sizes ({wide}: 768*512, {square}: 624*624); mm "
                        "samples one size per run: give images of one aspect ratio, or height and width"]
