"""The model JSON's inference section: Wan/Phantom aliases, prompt files, and every bad value named."""

from __future__ import annotations

import pytest

from mm.inference.config import parse_sampling


def _parse(section, spatial=8, temporal=4, patch=(1, 2, 2)):
    problems = []
    config = parse_sampling(section, spatial, temporal, patch, problems)
    return config, problems


def test_wan_names_are_aliases(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a sofa\n\n  a dog in the rain  \n")
    config, problems = _parse({"prompt": "a bird", "prompt_file": str(prompts), "base_seed": 3, "frame_num": 17,
                               "num_inference_steps": 30, "flow_shift": 8.0, "sample_guide_scale": 6.0,
                               "sample_solver": "euler", "height": 32, "width": 48, "save_latents": True})
    assert problems == []
    assert config.prompts == ["a bird", "a cat on a sofa", "a dog in the rain"]
    assert (config.seed, config.num_frames, config.sample_steps, config.sample_shift, config.guidance_scale) == \
        (3, 17, 30, 8.0, 6.0)
    assert (config.sample_solver, config.height, config.width, config.save_latents) == ("euler", 32, 48, True)


def test_every_problem_is_named():
    _, problems = _parse({"prompt": 5, "num_frames": 10, "height": 33, "width": "wide", "sample_solver": "ddim",
                          "seed": -1, "sample_steps": 0, "save_latents": "yes", "colour": "red"})
    text = "\n".join(problems)
    for expected in ("inference.prompt = 5; valid: a string or a list of strings",
                     "inference: no prompt", "inference.num_frames = 10; valid: 4k + 1",
                     "inference.height = 33; valid: a multiple of 16", "inference.width = 'wide'; valid: an integer",
                     "inference.sample_solver = 'ddim'; valid: unipc, dpm++, euler", "inference.seed = -1; valid: >= 0",
                     "inference.sample_steps = 0; valid: >= 1", "inference.save_latents = 'yes'; valid: true or false",
                     "inference.colour: unknown key"):
        assert expected in text, (expected, text)


def test_a_key_and_its_alias_together_is_an_error():
    _, problems = _parse({"prompt": "x", "seed": 1, "base_seed": 2})
    assert any("inference.base_seed: given twice" in p for p in problems)


@pytest.mark.parametrize("spatial,patch,size", [(16, (1, 2, 2), 32), (8, (1, 2, 2), 16)])
def test_size_step_follows_the_vae_and_the_patch(spatial, patch, size):
    _, problems = _parse({"prompt": "x", "height": size, "width": size}, spatial=spatial, patch=patch)
    assert problems == []
    _, problems = _parse({"prompt": "x", "height": size + 8, "width": size}, spatial=spatial, patch=patch)
    assert problems and f"a multiple of {size}" in problems[0]


def test_wan22_expert_keys(tmp_path):
    config, problems = _parse({"prompt": "x", "low_noise_model": str(tmp_path), "boundary_ratio": 0.875,
                               "guidance_scale_2": 3.0})
    assert problems == [] and (config.low_noise_model, config.boundary_ratio, config.guidance_scale_2) == \
        (str(tmp_path), 0.875, 3.0)
    _, problems = _parse({"prompt": "x", "low_noise_model": str(tmp_path / "nope"), "boundary_ratio": 1.5})
    text = "\n".join(problems)
    assert "inference.low_noise_model" in text and "not a directory" in text
    assert "inference.boundary_ratio = 1.5; valid: a number between 0 and 1" in text
    _, problems = _parse({"prompt": "x", "boundary_ratio": 0.9, "guidance_scale_2": 2.0})
    text = "\n".join(problems)
    assert "go together" in text and "guidance_scale_2 is the low-noise expert's" in text
