"""A model family from outside mm, end to end: the toy families of ``tests/toy_family`` register
through the ``mm.families`` entry-point group (no change to mm) and train with pretrain_t2v.py and
sample with inference.py on 2 CPU processes; the two-encoder family shows every text encoder's
output reaching the DiT, with encoder-DP over 2 ranks equal to one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.toy_family.plugin import install

REPO = Path(__file__).resolve().parents[2]
FRAMES, SIZE = 5, 16
MAX_LENGTHS = (12, 7)  # the two tokenizers' model_max_length
WIDTHS = (16, 8)  # the two text encoders' hidden sizes


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Synthetic videos, two tiny text encoders, the toy families' plugin metadata and JSONs."""
    from mm.data import make_dataset
    from mm.data.synthetic import COLOURS, MOTIONS, SHAPES
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    root = tmp_path_factory.mktemp("toy")
    data_txt = make_dataset(root / "data", num_videos=6, frames=9, sizes=[(SIZE, SIZE)], fps=16)
    words = sorted({w for phrase in [*COLOURS, *SHAPES, *MOTIONS, "a moving on background"] for w in phrase.split()})
    encoders = [save_tiny_text_encoder(root / "umt5", words, "umt5", d_model=WIDTHS[0]),
                save_tiny_text_encoder(root / "mt5", words, "mt5", d_model=WIDTHS[1], seed=1)]
    install(root / "plugin")

    def write(name: str, model_id: str, count: int, **top):
        texts = [{"model_id": kind, "from_pretrained": str(path), "dtype": "fp32"}
                 for kind, path in zip(("umt5", "mt5"), encoders[:count])]
        model = {"predictor": {"model_id": model_id, "num_layers": 2, "num_heads": 2, "hidden_size": 16,
                               "text_dims": list(WIDTHS[:count]), "dtype": "fp32"},
                 "ae": {"model_id": "toy_ae", "from_pretrained": str(root)},
                 "text_encoder": texts if count > 1 else texts[0], **top}
        tokenizers = [{"from_pretrained": str(path), "model_max_length": n} for path, n in zip(encoders, MAX_LENGTHS)]
        data = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": str(data_txt)},
                                  "preprocess_parameters": {"buckets": [[FRAMES, SIZE, SIZE]], "train_fps": 16},
                                  "tokenizer_config": tokenizers[:count] if count > 1 else tokenizers[0]}}
        inference = dict(model, inference={"prompt": ["a red square moving left to right on a white background"],
                                           "negative_prompt": "", "seed": 3, "num_frames": FRAMES, "height": SIZE,
                                           "width": SIZE, "fps": 8, "sample_steps": 3, "sample_solver": "euler",
                                           "guidance_scale": 2.0, "model_max_length": 9, "save_latents": True,
                                           "save_path": str(root / f"samples_{name}")})
        for suffix, content in (("model", model), ("data", data), ("inference", inference)):
            (root / f"{name}_{suffix}.json").write_text(json.dumps(content))

    write("one", "toy_dit", 1)
    write("two", "toy_dit2", 2)
    write("two_encdp", "toy_dit2", 2, enable_encoder_dp=True)
    return root


def _run(toy: Path, nproc: int, entry: str, trace: Path, *flags) -> str:
    trace.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOY_FAMILY_TRACE=str(trace),
               PYTHONPATH=os.pathsep.join([str(toy / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", entry, *flags]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _train(toy: Path, name: str, nproc: int, trace: Path, *flags) -> tuple[list[float], str]:
    out = _run(toy, nproc, "pretrain_t2v.py", trace, "--mm-model", str(toy / f"{name}_model.json"), "--mm-data",
               str(toy / f"{name}_data.json"), "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
               "--train-iters", "3", "--log-interval", "1", "--num-workers", "0", "--seed", "7", *flags)
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", out)], out


def _traces(trace: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(trace.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_family_outside_mm_trains_and_samples_on_two_processes(toy, tmp_path):
    cp2 = ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"]
    losses, out = _train(toy, "one", 2, tmp_path / "train", *cp2, "--save", str(tmp_path / "ckpt"),
                         "--ckpt-format", "torch")
    assert "CP=2 (megatron_cp_algo)" in out and len(losses) == 3 and losses[-1] != losses[0]
    seen = _traces(tmp_path / "train")
    # both CP ranks ran the toy DiT on every micro-batch, with the one encoder's output
    assert {r["cp_rank"] for r in seen} == {0, 1} and len(seen) == 2 * 3
    assert all(r["widths"] == [WIDTHS[0]] and r["lengths"] == [MAX_LENGTHS[0]] and r["rows"] == 2 for r in seen)
    out = _run(toy, 2, "inference.py", tmp_path / "sample", *cp2, "--mm-model", str(toy / "one_inference.json"),
               "--load", str(tmp_path / "ckpt"))
    videos = list((toy / "samples_one").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0, out
    seen = _traces(tmp_path / "sample")
    # 3 steps x (prompt, negative prompt) on each of the 2 ranks, at inference's token length
    assert len(seen) == 2 * 3 * 2 and all(r["lengths"] == [9] and r["rows"] == 1 for r in seen)


@pytest.mark.slow
def test_two_text_encoders_reach_the_dit_and_encoder_dp_equals_one_process(toy, tmp_path):
    ref, _ = _train(toy, "two", 1, tmp_path / "one", "--save", str(tmp_path / "ckpt"), "--ckpt-format", "torch")
    seen = _traces(tmp_path / "one")
    assert len(seen) == 3 and all(r["widths"] == list(WIDTHS) and r["lengths"] == list(MAX_LENGTHS) for r in seen)
    # each caption's tokens under both tokenizers (a caption fills fewer tokens of the shorter one, or as many)
    assert all(0 < r["tokens"][1] <= r["tokens"][0] for r in seen)
    par, out = _train(toy, "two_encdp", 2, tmp_path / "cp2", "--context-parallel-size", "2",
                      "--context-parallel-algo", "ulysses_cp_algo")
    assert "CP=2 (ulysses_cp_algo)" in out and len(ref) == len(par) == 3 and ref[-1] != ref[0]
    for a, b in zip(ref, par):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, par)
    assert [r["tokens"] for r in _traces(tmp_path / "cp2") if r["cp_rank"] == 0] == [r["tokens"] for r in seen]
    out = _run(toy, 1, "inference.py", tmp_path / "sample", "--mm-model", str(toy / "two_inference.json"), "--load",
               str(tmp_path / "ckpt"))
    assert len(list((toy / "samples_two").glob("*.mp4"))) == 1, out
    assert all(r["widths"] == list(WIDTHS) for r in _traces(tmp_path / "sample"))


def test_a_family_is_refused_with_the_registered_ids_named(toy):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(toy / "plugin"), str(REPO)]))
    code = ("from mm.families import family_for, model_ids\n"
            "print(sorted(model_ids()))\n"
            "assert family_for('toy_dit2').num_text_encoders == 2\n"
            "try:\n    family_for('toy')\nexcept ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'stepvideodit', 'toy_dit', 'toy_dit2', 'videoditsparse', 'videoditsparsei2v', 'wan_dit'" in done.stdout
    assert ("predictor.model_id = 'toy'; valid: stepvideodit, toy_dit, toy_dit2, videoditsparse, videoditsparsei2v, "
            "wan_dit") in done.stdout
