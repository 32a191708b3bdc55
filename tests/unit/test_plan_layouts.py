"""mm-plan proposes exactly the layouts the training entry point accepts: for every candidate split of
4 ranks, the planner's verdict equals that of ``pretrain_t2v.py``'s own start-up checks (``configure``
with the launch environment of 4 ranks, then ``check_task`` with the data files read); and the
``mm-plan`` command prints them or says clearly what is wrong with its input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.plan_assets import REPO, write_plan_assets


@pytest.fixture(scope="module")
def jsons(tmp_path_factory):
    return write_plan_assets(tmp_path_factory.mktemp("plan"))


def _base(root, gbs=8):
    return ["--mm-model", str(root / "model.json"), "--mm-data", str(root / "data.json"), "--micro-batch-size", "1",
            "--global-batch-size", str(gbs), "--lr", "1e-3", "--train-iters", "2"]


@pytest.mark.slow
def test_the_planner_accepts_what_the_entry_point_accepts(jsons, monkeypatch, tmp_path):
    from mm.arguments import ConfigError
    from mm.plan.layouts import candidate_layouts, valid_layouts
    from mm.runtime import configure
    from mm.training.checks import check_task

    base = _base(jsons, gbs=6)  # a global batch that 4 data-parallel ranks cannot split
    accepted, refused = valid_layouts(base, 4, num_layers=4, workdir=tmp_path)
    planned = {layout for layout, _ in accepted}
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    for key, value in dict(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="4",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    entry_point = set()
    candidates = list(candidate_layouts(4, 4, even_pipeline=True))  # the JSON gives no pipeline_num_layers
    for layout in candidates:
        try:
            config, _, _ = configure(layout.argv(base, tmp_path), "train", "pretrain_t2v.py")
            check_task("t2v", config)
        except ConfigError:
            continue
        entry_point.add(layout)
    assert planned == entry_point
    assert set(refused) == set(candidates) - planned
    # both kinds occur: DP4 cannot split a batch of 6, DP2 can; PP layouts come with the even split of
    # the layers written into the model JSON, which the entry point needs
    descriptions = {layout.describe() for layout in planned}
    assert "TP2 SP CP1 PP1 DP2" in descriptions and "TP1 CP1 PP1 DP4" not in descriptions
    assert any("global-batch-size" in p for p in refused[next(l for l in refused if l.dp == 4)])
    assert any(layout.cp == 2 and layout.cp_algo == "megatron_cp_algo" for layout in planned)
    pp = {layout.model_edit() for layout in planned if layout.pp == 2}
    assert pp == {"predictor.pipeline_num_layers = [2, 2]", "predictor.pipeline_num_layers = [[1, 1], [1, 1]]"}
    # without the edit the entry point refuses PP: the planner's edit is what makes those layouts valid
    bare = next(layout for layout in planned if layout.pp == 2).flags()
    with pytest.raises(ConfigError, match="pipeline_num_layers"):
        configure([*base, *bare], "train", "pretrain_t2v.py")


def _plan(*argv):
    env = dict(os.environ, MM_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mm.plan", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_mm_plan_prints_the_layouts_with_their_memory(jsons):
    result = _plan("--nodes", "1", "--gpus-per-node", "4", "--gpu", "h100", "--top", "0", "--", *_base(jsons))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "4 ranks (1 node(s) x 4)" in lines[0] and "refused" in lines[0]
    rows = [line for line in lines if line.startswith("TP")]
    assert rows and any(r.startswith("TP1 CP1 PP1 DP4") for r in rows)
    # the layout with the least model parallelism first; its flags are the training command's
    assert rows[0].startswith("TP1 CP1 PP1 DP4") and "--use-distributed-optimizer" in rows[0]


def test_mm_plan_refuses_bad_input_with_exit_2(jsons, tmp_path, capsys):
    """python -m mm.plan's exit status is its main()'s: one refusal through the command, the others
    through main() in this process (one process start each otherwise)."""
    from mm.plan.cli import main

    result = _plan("--gpus-per-node", "0", "--", *_base(jsons))
    assert result.returncode == 2 and "--gpus-per-node 0: both must be >= 1" in result.stderr
    capsys.readouterr()
    assert main(["--", *_base(jsons), "--tensor-model-parallel-size", "2"]) == 2
    assert "mm-plan chooses the layout" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    argv = _base(jsons)
    argv[1] = str(broken)
    assert main(["--", *argv]) == 2
    err = capsys.readouterr().err
    assert "--mm-model" in err and str(broken) in err
