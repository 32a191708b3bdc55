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
                     "inference: unknown key colour"):
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


def test_phantom_keys(tmp_path):
    """Phantom's own names: ref_image as one comma-separated string, the two guidance scales."""
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    a, b, c = (str(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    config, problems = _parse({"prompt": ["x", "y"], "ref_image": f"{a}, {b}", "sample_guide_scale_img": 4.0,
                               "sample_guide_scale_text": 6.5, "sample_guide_scale": 5.0})
    assert problems == []
    assert config.task == "s2v" and config.ref_images == [[a, b], [a, b]]
    assert (config.guidance_scale_img, config.guidance_scale_text) == (4.0, 6.5)
    config, problems = _parse({"prompt": ["x", "y"], "ref_images": [[a], [b, c]]})
    assert problems == [] and config.ref_images == [[a], [b, c]]
    assert (config.guidance_scale_img, config.guidance_scale_text) == (5.0, 7.5)  # Phantom's defaults


def test_phantom_problems_are_named(tmp_path):
    _, problems = _parse({"prompt": ["x", "y"], "ref_images": [["a.png"]], "task": "s2v"})
    assert any("inference.ref_images = [['a.png']]; valid: a list of image paths (or one comma-separated string) "
               "for every prompt, or a list of 2 such lists" in p for p in problems), problems
    _, problems = _parse({"prompt": "x", "ref_images": ["missing.png"]})
    assert problems == ["inference.ref_images: no such file: missing.png"]
    _, problems = _parse({"prompt": "x", "task": "s2v", "guidance_scale_img": -1})
    assert "inference.task = 's2v' (Phantom subject-to-video) needs inference.ref_images" in problems
    assert "inference.guidance_scale_img = -1; valid: >= 0.0" in problems
    _, problems = _parse({"prompt": "x", "guidance_scale_text": 7.5})
    assert problems == ["inference.guidance_scale_text is Phantom's (task s2v); task is 't2v': use guidance_scale"]
    _, problems = _parse({"prompt": "x", "task": "t2v", "ref_images": "a.png"})
    assert "inference.ref_images is for task s2v (task is 't2v')" in problems


def test_wan22_guide_scale_pair_is_low_noise_then_high_noise(tmp_path):
    """Wan2.2's A14B configs give sample_guide_scale as (low-noise expert's, high-noise expert's), e.g.
    T2V's (3.0, 4.0): guidance_scale (the predictor, the high-noise expert) takes the second."""
    config, problems = _parse({"prompt": "x", "low_noise_model": str(tmp_path), "boundary_ratio": 0.875,
                               "sample_guide_scale": [3.0, 4.0]})
    assert problems == [] and (config.guidance_scale, config.guidance_scale_2) == (4.0, 3.0)
    config, problems = _parse({"prompt": "x", "low_noise_model": str(tmp_path), "boundary_ratio": 0.9,
                               "sample_guide_scale": 3.5})
    assert problems == [] and (config.guidance_scale, config.guidance_scale_2) == (3.5, None)


@pytest.mark.parametrize("section,expected", [
    ({"sample_guide_scale": [3.0, 4.0]},
     "inference.sample_guide_scale = [3.0, 4.0] is Wan2.2 A14B's pair (the low-noise expert's, the high-noise "
     "expert's scale); it needs inference.low_noise_model, else give one number"),
    ({"sample_guide_scale": [3.0, 4.0], "guidance_scale_2": 2.0, "low_noise_model": "DIR", "boundary_ratio": 0.9},
     "inference.sample_guide_scale = [3.0, 4.0] already gives the low-noise expert's scale (its first number); "
     "inference.guidance_scale_2 = 2.0 too: give one or the other"),
    ({"sample_guide_scale": [3.0, 4.0, 5.0], "low_noise_model": "DIR", "boundary_ratio": 0.9},
     "inference.sample_guide_scale = [3.0, 4.0, 5.0]; valid: a number >= 0, or Wan2.2 A14B's pair of two"),
    ({"sample_guide_scale": [3.0, "high"], "low_noise_model": "DIR", "boundary_ratio": 0.9},
     "inference.sample_guide_scale = [3.0, 'high']; valid: a number >= 0, or Wan2.2 A14B's pair"),
    ({"guidance_scale": [3.0, 4.0], "low_noise_model": "DIR", "boundary_ratio": 0.9},  # Wan's name only
     "inference.guidance_scale = [3.0, 4.0]; valid: a number"),
])
def test_wan22_guide_scale_pair_problems(tmp_path, section, expected):
    section = {k: str(tmp_path) if v == "DIR" else v for k, v in section.items()}
    config, problems = _parse({"prompt": "x", **section})
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_prompt_and_condition_images_from_txt_files(tmp_path):
    """MindSpeed-MM's inference JSONs name .txt files in prompt and conditional_pixel_values_path."""
    from mm.inference.config import parse_sampling

    images = []
    for i in range(2):
        images.append(tmp_path / f"frame{i}.png")
        images[-1].write_bytes(b"png")
    (tmp_path / "prompts.txt").write_text("a red square\n\n  a blue circle  \n")
    (tmp_path / "images.txt").write_text("".join(f"{p}\n" for p in images))
    problems: list[str] = []
    sampling = parse_sampling({"prompt": str(tmp_path / "prompts.txt"),
                               "conditional_pixel_values_path": str(tmp_path / "images.txt")}, 8, 4, (1, 2, 2),
                              problems)
    assert problems == []
    assert sampling.prompts == ["a red square", "a blue circle"]
    assert sampling.images == [str(p) for p in images] and sampling.task == "i2v"
    problems = []
    parse_sampling({"prompt": str(tmp_path / "missing.txt"), "image": str(tmp_path / "none.txt")}, 8, 4, (1, 2, 2),
                   problems)
    assert any("inference.prompt = " in p and "missing.txt': no such file" in p for p in problems), problems
    assert any("inference.image = " in p and "none.txt': no such file" in p for p in problems), problems


def _writes_despite_mode(directory) -> bool:
    """Whether this process can create files in ``directory`` whatever its mode says (root, or
    CAP_DAC_OVERRIDE): then a read-only mode blocks nothing."""
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def test_save_path_under_a_file_is_refused_and_nothing_is_made(tmp_path):
    from mm.inference.config import save_path_problem

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    wanted = blocker / "samples" / "t2v"
    for create in (True, False):
        problem = save_path_problem(str(wanted), create=create)
        assert problem == (f"inference.save_path = {str(wanted)!r}: not a directory ({blocker} is a file); valid: "
                           "a directory this process can create files in (made if missing)")
    assert blocker.read_text() == "not a directory"


def test_save_path_read_only_is_refused(tmp_path):
    from mm.inference.config import save_path_problem

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if _writes_despite_mode(read_only):
            pytest.skip("this process writes into a 0o555 directory (root): a read-only mode blocks nothing here")
        problem = save_path_problem(str(read_only))
        assert problem.startswith(f"inference.save_path = {str(read_only)!r}: cannot create a file in {read_only}: "
                                  "[Errno 13] Permission denied"), problem
        # under it, the directory cannot be made
        problem = save_path_problem(str(read_only / "samples"))
        assert f"cannot make the directory {read_only / 'samples'}: [Errno 13] Permission denied" in problem
        assert "is not writable by this process" in save_path_problem(str(read_only / "samples"), create=False)
    finally:
        read_only.chmod(0o755)


def test_save_path_is_made_and_the_probe_removed(tmp_path):
    from mm.inference.config import save_path_problem

    wanted = tmp_path / "a" / "b"
    assert save_path_problem(str(wanted), create=False) is None and not (tmp_path / "a").exists()
    assert save_path_problem(str(wanted)) is None
    assert wanted.is_dir() and list(wanted.iterdir()) == []


def test_save_path_must_be_a_string():
    _, problems = _parse({"prompt": "x", "save_path": 5})
    assert problems == ["inference.save_path = 5; valid: a directory path (a non-empty string)"]
