"""pretrain_t2v.py through torchrun on the quickstart's synthetic assets (CPU, gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.markers import marked_extended

REPO = Path(__file__).resolve().parents[2]


def _variant(assets, name, model_changes=None, data_changes=None):
    """A copy of the quickstart JSONs with some model keys (top level, ``ae`` or ``predictor``) and
    preprocess keys changed."""
    import json

    model = json.loads((assets / "model.json").read_text())
    for key, value in (model_changes or {}).items():
        if key == "vae_cp_size":
            model["ae"][key] = value
        elif key == "pipeline_num_layers":
            model["predictor"][key] = value
        else:
            model[key] = value
    data = json.loads((assets / "data.json").read_text())
    data["dataset_param"]["preprocess_parameters"].update(data_changes or {})
    (assets / f"{name}_model.json").write_text(json.dumps(model))
    (assets / f"{name}_data.json").write_text(json.dumps(data))
    return name


def _train(assets, nproc, *flags, iters=4, variant=None, gbs=2, mbs=1):
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    model, data = (f"{variant}_model.json", f"{variant}_data.json") if variant else ("model.json", "data.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "pretrain_t2v.py", "--mm-model", str(assets / model), "--mm-data", str(assets / data),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-3", "--train-iters", str(iters),
           "--log-interval", "1", "--num-workers", "0", "--seed", "7", *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", result.stdout)], result.stdout


ONE_PROCESS = {}  # (iters, global batch, micro-batch) -> (losses, log) of one process from the fixture's JSONs


def _one_process(assets, iters=4, gbs=2, mbs=1):
    """One process's run of the fixture's own JSONs, run once a session for the tests that compare
    their layouts with it (here, tests/functional/test_convert_and_train.py)."""
    if (iters, gbs, mbs) not in ONE_PROCESS:
        ONE_PROCESS[iters, gbs, mbs] = _train(assets, 1, iters=iters, gbs=gbs, mbs=mbs)
    return ONE_PROCESS[iters, gbs, mbs]


def _reference(assets, iters=5, gbs=4, mbs=1):
    return _one_process(assets, iters=iters, gbs=gbs, mbs=mbs)[0]


@pytest.mark.slow
def test_tp2_sp_cp2_training_equals_one_process(assets):
    ref, _ = _one_process(assets)
    par, out = _train(assets, 4, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                      "--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                      "--use-cp-send-recv-overlap", "--use-distributed-optimizer")
    assert "TP=2 PP=1 VPP=1 CP=2 (megatron_cp_algo) DP=1" in out
    assert len(ref) == len(par) == 4
    for a, b in zip(ref, par):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, par)
    assert ref[-1] != ref[0]  # it trained


@pytest.mark.slow
def test_op_level_recompute_training_equals_one_process_without(assets):
    """--recompute-granularity selective --recompute-modules layernorm mlp through pretrain_t2v.py under
    TP2 + SP, and the first layer recomputed whole with layernorm in the others (block method) in one
    process: the losses of one process without recompute."""
    ref, _ = _one_process(assets)
    rec, _ = _train(assets, 2, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                    "--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp")
    block, _ = _train(assets, 1, "--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "1", "--recompute-modules", "layernorm")
    assert len(ref) == len(rec) == len(block) == 4
    for a, b, c in zip(ref, rec, block):
        assert abs(a - b) <= 1e-4 * abs(a) and abs(a - c) <= 1e-5 * abs(a), (ref, rec, block)
    assert ref[-1] != ref[0]


@pytest.mark.slow
def test_encoder_dp_and_offload_training_equals_one_process(assets):
    ref, _ = _one_process(assets)
    variant = _variant(assets, "encdp", {"enable_encoder_dp": True, "encoder_offload_interval": 2})
    par, _ = _train(assets, 2, "--tensor-model-parallel-size", "2", iters=4, variant=variant)
    assert len(ref) == len(par) == 4
    for a, b in zip(ref, par):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, par)


@pytest.mark.extended  # offload interval 2 with encoder-DP: test_encoder_dp_and_offload_training_equals_one_process
def test_encoder_offload_interval_4_keeps_the_first_8_losses(assets):
    """Encoding 4 steps' micro-batches at once and moving the encoders off the device in between
    changes nothing the model sees: the first 8 losses are those of a run without offload."""
    ref, _ = _train(assets, 1, iters=8)
    got, _ = _train(assets, 1, iters=8, variant=_variant(assets, "offload4", {"encoder_offload_interval": 4}))
    assert len(ref) == len(got) == 8 and ref[-1] != ref[0]
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-6 * abs(a), (ref, got)


@pytest.mark.slow
@pytest.mark.extended  # VAE-CP against one device: tests/parallel/test_vae_cp.py; decode: test_inference.py
def test_vae_cp_training_equals_one_process(assets):
    # VAE-CP over 2 ranks needs 2 chunks of 4 frames each: 17 frames, every frame of the clips
    buckets = {"buckets": [[17, 64, 64], [17, 48, 96]], "train_fps": 16}
    ref, _ = _train(assets, 1, iters=2, variant=_variant(assets, "long", data_changes=buckets))
    variant = _variant(assets, "vaecp", {"vae_cp_size": 2}, buckets)
    par, _ = _train(assets, 2, "--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                    iters=2, variant=variant)
    for a, b in zip(ref, par):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, par)




# the layouts of issue 8's list that the entry point must get right beyond the DiT itself (data
# sharding, loss and gradient reduction, pipeline messages, optimizer sharding): the first 5 losses
# equal one process's (fp32, CPU, gloo). The DiT under every TP/SP/CP combination is compared with
# one device in-process (tests/parallel/test_wan_dit.py); TP2+SP+CP2 ring with overlap and the
# distributed optimizer is test_tp2_sp_cp2_training_equals_one_process above, CP4 hybrid the
# Open-Sora-Plan guide's script (tests/functional/test_opensoraplan_guide.py), PP2 x VPP2 also
# tests/functional/test_pretrain_opensoraplan.py.
LAYOUTS = {
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], None),
    "cp2_ulysses": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo"], None),
    "cp4_double_ring": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo",
                            "--cp-window-size", "2", "--use-cp-send-recv-overlap"], None),
    # the quickstart data has two buckets (64x64 and 48x96 frames): the stage message's length
    # changes between micro-batches, so these also cover dynamic resolution under PP
    "pp2": (2, ["--pipeline-model-parallel-size", "2"], {"pipeline_num_layers": [1, 3]}),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
                 {"pipeline_num_layers": [[1, 1], [1, 1]]}),
    "tp2_sp_pp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size",
                       "2", "--use-distributed-optimizer"], {"pipeline_num_layers": [2, 2]}),
    # DP2 with the distributed optimizer, under PP: each replica's micro-batches through both stages
    "pp2_dp2_distributed_optimizer": (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
                                      {"pipeline_num_layers": [3, 1]}),
}


# pp2: PP2 on the same two-bucket data (the stage message's length changing between micro-batches) is
# pp2_dp2_distributed_optimizer's, against one process as here; TP2 x PP2 test_convert_and_train.py's.
# cp4_double_ring: the DiT under CP4 ring with window 2 against one device in-process
# (tests/parallel/test_wan_dit.py, tests/parallel/test_context_parallel.py); the loop under CP: cp2_ulysses
# and test_tp2_sp_cp2_training_equals_one_process (ring with send/recv overlap). tp2_sp: TP2 + SP through
# the entry point against one process is test_op_level_recompute_training_equals_one_process_without's
# (with op-level recompute, which recomputes the same forward) and test_tp2_sp_cp2_training_equals_one_process's
EXTENDED = {"tp2_sp_pp2", "pp2", "cp4_double_ring", "tp2_sp"}


def _model_parallel_size(flags):
    size = 1
    for flag in ("--tensor-model-parallel-size", "--context-parallel-size", "--pipeline-model-parallel-size"):
        if flag in flags:
            size *= int(flags[flags.index(flag) + 1])
    return size


@pytest.mark.slow
# tp2_sp_pp2: TP2 x PP2 from converted weights is tests/functional/test_convert_and_train.py's run
@pytest.mark.parametrize("layout", marked_extended(sorted(LAYOUTS), EXTENDED))
def test_layout_losses_equal_one_process(assets, layout):
    nproc, flags, model_changes = LAYOUTS[layout]
    # DP2 x micro-batch 1 reads the samples one process reads with micro-batch 2
    dp = nproc // _model_parallel_size(flags)
    ref = _reference(assets, mbs=dp)
    variant = _variant(assets, layout, model_changes) if model_changes else None
    par, out = _train(assets, nproc, *flags, iters=5, variant=variant, gbs=4)
    assert len(ref) == len(par) == 5, out[-3000:]
    for a, b in zip(ref, par):
        assert abs(a - b) <= 2e-5 * abs(a), (layout, ref, par)
    assert ref[-1] < ref[0]  # it trained


def test_nan_loss_is_skipped_and_counted_or_stops(assets, tmp_path):
    # a learning rate this large makes the weights overflow after the first update
    _, out = _train(assets, 1, "--lr", "1e6", "--clip-grad", "0", "--log-throughput", "--tensorboard-dir",
                    str(tmp_path / "tb"), iters=3)
    lines = [line for line in out.splitlines() if " iteration " in line]
    assert "loss: nan" in lines[1] and "number of nan iterations:   1" in lines[1], out[-2000:]
    assert "number of skipped iterations:   1" in lines[2]
    assert "throughput per CPU process (GFLOP/s)" in lines[0] and "time to finish: " in lines[0]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain_t2v.py",
           "--mm-model", str(assets / "model.json"), "--mm-data", str(assets / "data.json"), "--lr", "1e6",
           "--clip-grad", "0", "--train-iters", "3", "--num-workers", "0", "--exit-on-nan-loss",
           "--tensor-model-parallel-size", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "the loss is NaN/Inf at iteration 2; stopping because of --exit-on-nan-loss" in result.stderr


def _lines(out):
    """iteration -> (loss, grad norm, learning rate) strings as logged."""
    found = re.findall(r"iteration +(\d+)/\d+ .*?learning rate: (\S+) .*?\| loss: (\S+) \| grad norm: (\S+) ", out)
    return {int(i): (loss, norm, lr) for i, lr, loss, norm in found}


RESUME_FLAGS = ["--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--use-distributed-optimizer"]
UNINTERRUPTED = {}  # the uninterrupted run both checkpoint formats are compared with


@pytest.mark.slow
# the torch format's resume: also tests/parallel/test_checkpointing.py (every layout, both formats)
@pytest.mark.parametrize("ckpt_format", ["torch_dist", pytest.param("torch", marks=pytest.mark.extended)])
def test_resume_after_stop_is_exact(assets, tmp_path, ckpt_format):
    """Stop after iteration 3 (with a checkpoint), relaunch the same command: iterations 4-8 log the
    same losses, grad norms and learning rates as an uninterrupted run (model, distributed-optimizer
    state, LR schedule, data position and noise all resume), in either checkpoint format."""
    if "whole" not in UNINTERRUPTED:
        UNINTERRUPTED["whole"] = _train(assets, 2, *RESUME_FLAGS, iters=8, gbs=4)[1]
    whole = UNINTERRUPTED["whole"]
    ckpt = tmp_path / "ckpt"
    same = ["--save", str(ckpt), "--load", str(ckpt), "--ckpt-format", ckpt_format]
    _, first = _train(assets, 2, *RESUME_FLAGS, *same, "--exit-interval", "3", iters=8, gbs=4)
    assert "training starts from scratch" in first and "exiting at iteration 3" in first
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    _, second = _train(assets, 2, *RESUME_FLAGS, *same, iters=8, gbs=4)
    assert f"loading {ckpt_format} checkpoint from" in second
    expected, got = _lines(whole), _lines(second)
    assert sorted(got) == [4, 5, 6, 7, 8], second[-2000:]
    for i in range(4, 9):
        assert got[i] == expected[i], (i, got[i], expected[i])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"


@pytest.mark.slow
@pytest.mark.extended  # loads across layouts: tests/parallel/test_checkpointing.py::test_checkpoint_loads_into_another_layout
def test_checkpoint_of_tp2_pp2_resumes_on_one_process(assets, tmp_path):
    """Save under TP2 x PP2 (plain optimizer), load on one process (RNG states belong to a layout:
    --no-load-rng): the continued losses are the uninterrupted single-process run's."""
    ref = _lines(_train(assets, 1, iters=4, gbs=4)[1])
    ckpt = tmp_path / "ckpt"
    variant = _variant(assets, "ckpt_pp2", {"pipeline_num_layers": [2, 2]})
    _, out = _train(assets, 4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--save", str(ckpt), "--exit-interval", "2", iters=4, gbs=4, variant=variant)
    assert "exiting at iteration 2" in out
    _, out = _train(assets, 1, "--load", str(ckpt), "--no-load-rng", iters=4, gbs=4)
    assert "written by TP2 PP2" in out
    got = _lines(out)
    assert sorted(got) == [3, 4]
    for i in (3, 4):
        assert abs(float(got[i][0]) - float(ref[i][0])) <= 2e-5 * float(ref[i][0]), (i, got[i], ref[i])
        assert got[i][2] == ref[i][2]  # the LR schedule continued


def test_finetune_loads_weights_only(assets, trained_checkpoint):
    ckpt, first = trained_checkpoint
    ref = _lines(first)  # from the fixture's weights
    _, out = _train(assets, 1, "--load", str(ckpt), "--finetune", iters=2)
    got = _lines(out)
    assert sorted(got) == [1, 2] and sorted(ref) == [1, 2]  # counting starts again
    assert got[1][0] != ref[1][0]  # the weights are the trained ones


def test_ema_of_the_weights_is_saved_with_each_checkpoint(assets, tmp_path):
    """--ema-decay 0.5 --ema-start-iter 1, a checkpoint every iteration: the saved average equals
    the weights at iteration 1 and 0.5 * previous average + 0.5 * weights after that."""
    import torch

    ckpt = tmp_path / "ckpt"
    _train(assets, 1, "--ema-decay", "0.5", "--ema-start-iter", "1", "--save", str(ckpt), "--save-interval", "1",
           "--ckpt-format", "torch", iters=3)
    saved = [torch.load(ckpt / f"iter_{i:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
             for i in (1, 2, 3)]
    averages = [s["ema"][0] for s in saved]
    weights = [{k: v for k, v in s["model"].items() if k in averages[0]} for s in saved]
    assert len(averages[0]) > 20 and set(weights[0]) == set(averages[0])
    for name in averages[0]:
        assert torch.equal(averages[0][name], weights[0][name].float())
        for i in (1, 2):
            expected = 0.5 * averages[i - 1][name] + 0.5 * weights[i][name].float()
            torch.testing.assert_close(averages[i][name], expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(averages[2][n], weights[2][n].float()) for n in averages[2])
