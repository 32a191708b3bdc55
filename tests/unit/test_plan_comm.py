"""mm-plan's communication model against hand-computed figures, which link a group uses, the MFU and
the ranking of the rows, the cluster flags' errors; and planning without the model's weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mm.plan.comm import Cluster, Link, Shape, dp_seconds, layer_comm, pp_seconds
from tests.plan_assets import REPO

INTRA, INTER = Link(100.0, 1.0), Link(10.0, 5.0)  # GB/s, us
NO_RECOMPUTE = SimpleNamespace(recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                               recompute_modules=None)
FULL = SimpleNamespace(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
                       recompute_modules=None)
TOKENS, HIDDEN = 1000, 64


def _cluster(nodes=1, per_node=8):
    return Cluster(nodes, per_node, INTRA, INTER, peak_tflops=100.0)


def _t(link: Link, sent: float, steps: int) -> float:
    return steps * link.latency_us * 1e-6 + sent / (link.gb_per_s * 1e9)


def test_ulysses_moves_4_tensors_forward_and_4_backward_each_n_minus_1_over_n_of_the_local_one():
    local = TOKENS / 4 * HIDDEN * 2  # a rank's q (k, v, output): tokens / CP x hidden x 2 bytes
    one = _t(INTRA, 3 / 4 * local, 3)
    got = layer_comm(_cluster(), Shape(tp=1, ulysses=4, ring=1, dp=2, pp=1), TOKENS, HIDDEN, 1.0, NO_RECOMPUTE, 4)
    assert got.cp == pytest.approx(8 * one, rel=1e-12) and got.tp == 0
    # full recompute runs the forward's 4 again; TP splits the heads, hence the bytes
    got = layer_comm(_cluster(), Shape(tp=2, ulysses=4, ring=1, dp=1, pp=1), TOKENS, HIDDEN, 1.0, FULL, 4)
    assert got.cp == pytest.approx(12 * _t(INTRA, 3 / 4 * local / 2, 3), rel=1e-12)


def test_tp_under_sp_gathers_and_scatters_3_times_each_way_per_pass():
    full = TOKENS / 2 * HIDDEN * 2  # the gathered [tokens / CP, hidden] of a CP rank (CP 2)
    one = _t(INTRA, 1 / 2 * full, 1)
    shape = Shape(tp=2, ulysses=2, ring=1, dp=1, pp=2)
    assert layer_comm(_cluster(), shape, TOKENS, HIDDEN, 1.0, NO_RECOMPUTE, 4).tp == pytest.approx(12 * one)
    assert layer_comm(_cluster(), shape, TOKENS, HIDDEN, 1.0, FULL, 4).tp == pytest.approx(18 * one)
    layernorm = SimpleNamespace(**{**NO_RECOMPUTE.__dict__, "recompute_granularity": "selective",
                                   "recompute_modules": ["layernorm"]})
    assert layer_comm(_cluster(), shape, TOKENS, HIDDEN, 1.0, layernorm, 4).tp == pytest.approx(18 * one)
    mlp = SimpleNamespace(**{**NO_RECOMPUTE.__dict__, "recompute_granularity": "selective", "recompute_modules": ["mlp"]})
    assert layer_comm(_cluster(), shape, TOKENS, HIDDEN, 1.0, mlp, 4).tp == pytest.approx(14 * one)


def test_ring_steps_are_exposed_only_beyond_the_compute_that_hides_them():
    local = TOKENS / 4 * HIDDEN * 2
    step = _t(INTRA, 6 * local, 2)  # k, v forward; k, v and their gradients backward
    shape = Shape(tp=1, ulysses=1, ring=4, dp=1, pp=1)
    assert layer_comm(_cluster(), shape, TOKENS, HIDDEN, 1.0, NO_RECOMPUTE, 4).cp == 0.0  # a second hides it all
    hidden_by = step / 2 * 4  # the layer's compute per step is half the step's communication
    got = layer_comm(_cluster(), shape, TOKENS, HIDDEN, hidden_by, NO_RECOMPUTE, 4).cp
    assert got == pytest.approx(3 * step / 2, rel=1e-12)


@pytest.mark.parametrize("shape,group,spans", [
    (Shape(tp=8, ulysses=2, ring=1, dp=1, pp=1), "tp", False),
    (Shape(tp=8, ulysses=2, ring=1, dp=1, pp=1), "ulysses", True),     # ranks 0 and 8
    (Shape(tp=4, ulysses=2, ring=2, dp=1, pp=1), "ulysses", False),    # ranks 0, 4
    (Shape(tp=4, ulysses=2, ring=2, dp=1, pp=1), "ring", True),        # ranks 0, 8
    (Shape(tp=1, ulysses=1, ring=1, dp=16, pp=1), "dp_cp", True),
    (Shape(tp=1, ulysses=1, ring=1, dp=8, pp=2), "dp_cp", False),
    (Shape(tp=1, ulysses=1, ring=1, dp=8, pp=2), "pp", True),
    (Shape(tp=2, ulysses=1, ring=1, dp=3, pp=1), "dp_cp", False),      # 6 ranks, one node
])
def test_a_group_with_ranks_on_two_nodes_uses_the_inter_node_link(shape, group, spans):
    cluster = _cluster(nodes=2)
    assert shape.spans_nodes(group, 8) is spans
    assert cluster.link(shape, group) == (INTER if spans else INTRA)


def test_cp_across_nodes_costs_the_inter_node_figures():
    local = TOKENS / 2 * HIDDEN / 8 * 2
    got = layer_comm(_cluster(nodes=2), Shape(tp=8, ulysses=2, ring=1, dp=1, pp=1), TOKENS, HIDDEN, 1.0,
                     NO_RECOMPUTE, 4)
    assert got.cp == pytest.approx(8 * _t(INTER, local / 2, 1), rel=1e-12)


def test_pp_and_dp_messages():
    message = TOKENS / 2 / 2 * HIDDEN * 2  # [tokens / CP / TP, hidden] bf16
    assert pp_seconds(_cluster(), Shape(tp=2, ulysses=2, ring=1, dp=1, pp=2), TOKENS, HIDDEN, 3) == \
        pytest.approx(2 * 3 * _t(INTRA, message, 2))
    shape = Shape(tp=1, ulysses=1, ring=1, dp=4, pp=2)
    grads, params = 4e9, 2e9
    # distributed optimizer: a reduce-scatter of the fp32 gradients and an all-gather of the bf16 parameters
    plain = dp_seconds(_cluster(), shape, grads, params, 1, True, False, 0, 1.0)
    assert plain == pytest.approx(_t(INTRA, 3 / 4 * grads, 3) + _t(INTRA, 3 / 4 * params, 3))
    assert dp_seconds(_cluster(), shape, grads, params, 1, False, False, 0, 1.0) == \
        pytest.approx(2 * _t(INTRA, 3 / 4 * grads, 3))  # all-reduce
    # overlapped: stage 0 exposes its last of 4 buckets; stage 1 hides behind 1 step of stage 0's backward
    assert dp_seconds(_cluster(), shape, grads, params, 4, True, True, 0, 1.0) == \
        pytest.approx(_t(INTRA, 3 / 4 * grads / 4, 3) + _t(INTRA, 3 / 4 * params, 3))
    assert dp_seconds(_cluster(), shape, grads, params, 1, True, True, 1, 0.01) == \
        pytest.approx(_t(INTRA, 3 / 4 * grads, 3) - 2 / 3 * 0.01 + _t(INTRA, 3 / 4 * params, 3))
    assert dp_seconds(_cluster(), Shape(1, 1, 1, 1, 8), grads, params, 1, True, False, 0, 1.0) == 0.0


# --------------------------------------------------------------------------------------- the command

WAN = REPO / "examples/wan2.1/1.3b/t2v"
FULL_FLAGS = ["--attention-kernel", "flash3", "--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "1"]


def _wan_training(gbs=8):
    # the example's VAE directory is absent: mm-plan takes the Wan2.1 VAE's factors from the DiT's channels
    return ["--mm-model", str(WAN / "pretrain_t2v_model.json"), "--mm-data", str(WAN / "data.json"),
            "--micro-batch-size", "1", "--global-batch-size", str(gbs), "--bf16", "--lr", "1e-5", *FULL_FLAGS]


def test_mfu_and_the_order_of_the_rows(capsys, monkeypatch):
    from mm.families import resolve
    from mm.arguments.json_configs import load_json, parse_model_config
    from mm.families.wan.flops import wan_training_flops
    from mm.plan.cli import main

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    assert main(["--nodes", "1", "--gpus-per-node", "8", "--top", "0", "--gpu-memory-gib", "9", "--peak-tflops",
                 "500", "--calibration", str(WAN / "calibration_h100_full.json"), "--video", "81x480x832", "--",
                 *_wan_training()]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("TP")]
    model = parse_model_config(load_json(str(WAN / "pretrain_t2v_model.json"), "m"), "m", [])
    arch = resolve(model.predictor)[1]
    per_sample = wan_training_flops(arch, 21, 60, 104, 512)  # 81x480x832 through the 4x8x8 VAE; UMT5's 512 tokens
    fits = []
    for line in lines:
        numbers = line.split("  --")[0].split()[-14:]  # after the layout (which may be wider than its column)
        params, grads, optim, activ, total, left = map(float, numbers[:6])
        compute, tp, cp, pp, dp, bubble, seconds = map(float, numbers[6:13])
        mfu = float(numbers[13].rstrip("%")) / 100
        assert seconds == pytest.approx(compute + tp + cp + pp + dp + bubble, abs=0.003)
        assert mfu == pytest.approx(per_sample * 8 / (8 * 500e12 * seconds), abs=0.0006)
        fits.append((left >= 0, seconds))
        assert ("(does not fit)" in line) == (left < 0)
    # the layouts that fit first, each part by predicted time; with 9 GiB some do not fit (DP8's 7 GiB activations)
    assert any(f for f, _ in fits) and not all(f for f, _ in fits)
    first_misfit = [f for f, _ in fits].index(False)
    assert all(f for f, _ in fits[:first_misfit]) and not any(f for f, _ in fits[first_misfit:])
    for part in (fits[:first_misfit], fits[first_misfit:]):
        assert [s for _, s in part] == sorted(s for _, s in part)
    # the fastest layout of all (data parallelism, no model-parallel communication) does not fit: after the others
    assert min(s for _, s in fits) == fits[first_misfit][1] and lines[first_misfit].startswith("TP1 CP1 PP1 DP8")


def _refused(capsys, argv) -> str:
    from mm.plan.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [
    (["--inter-node-gb-per-s", "0"], "mm-plan: error: --inter-node-gb-per-s 0.0: must be > 0"),
    (["--intra-node-gb-per-s", "-5"], "mm-plan: error: --intra-node-gb-per-s -5.0: must be > 0"),
    (["--peak-tflops", "0"], "mm-plan: error: --peak-tflops 0.0: must be > 0"),
    (["--inter-node-latency-us", "-1"], "--inter-node-latency-us -1.0: must be >= 0"),
    (["--gpu", "b200"], "--gpu b200: not a kind mm-plan knows (h100, h200, 910b); give its figures: "
                        "--gpu-memory-gib, --peak-tflops"),
    (["--gpu", "b200", "--gpu-memory-gib", "180", "--peak-tflops", "2250", "--intra-node-gb-per-s", "900",
      "--intra-node-latency-us", "2", "--inter-node-latency-us", "5"], "give its figures: --inter-node-gb-per-s"),
])
def test_bad_cluster_flags_are_refused_naming_the_flag(flags, named, capsys, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    err = _refused(capsys, [*flags, "--calibration", str(WAN / "calibration_h100_full.json"), "--video",
                            "81x480x832", "--", *_wan_training()])
    assert named in err


def test_an_unknown_gpu_plans_memory_with_its_memory_given(capsys, monkeypatch):
    from mm.plan.cli import main

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    assert "--gpu-memory-gib" in _refused(capsys, ["--gpu", "b200", "--", *_wan_training()])
    assert main(["--gpu", "b200", "--gpu-memory-gib", "180", "--top", "1", "--", *_wan_training()]) == 0
    assert "b200 (179.4 GiB for the run)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- without weights

STEP = REPO / "examples/stepvideo/t2v"
STEP_TRAINING = ["--mm-model", str(STEP / "pretrain_t2v_model.json"), "--mm-data", str(STEP / "data.json"),
                 "--micro-batch-size", "1", "--bf16", "--lr", "1e-5", "--train-iters", "1"]


def test_step_video_plans_its_example_without_the_weights_the_entry_point_still_needs(capsys, monkeypatch, tmp_path):
    from mm.arguments import ConfigError, config_from_args, parse_flags
    from mm.plan.cli import main
    from mm.runtime import model_json_reader
    from mm.training.checks import check_task

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    monkeypatch.chdir(tmp_path)  # ./weights/stepvideo-t2v is nowhere
    assert main(["--nodes", "1", "--gpus-per-node", "8", "--top", "0", "--", *STEP_TRAINING]) == 0
    out = capsys.readouterr().out
    assert "TP8 SP CP1 PP1 DP1" in out and "35 layouts accepted" in out
    # pretrain_t2v.py's own check of the same layout still refuses the missing release files
    config = config_from_args(parse_flags([*STEP_TRAINING, "--tensor-model-parallel-size", "8", "--sequence-parallel"]),
                              8, mode="train", expand=model_json_reader())
    with pytest.raises(ConfigError) as refused:
        check_task("t2v", config, files=False)
    assert any(p.startswith("ae.from_pretrained = './weights/stepvideo-t2v/vae': no such file")
               for p in refused.value.problems)
    check_task("t2v", config, files=False, weights=False)


def test_wan_vae_factors_without_the_vae_files(tmp_path):
    import json

    from mm.arguments.json_configs import load_json, parse_model_config
    from mm.families import resolve
    from mm.plan.calibrate import latent_size

    def latent(path, video, **ae):
        data = load_json(str(path), "m")
        data["ae"].update(ae)
        (tmp_path / "m.json").write_text(json.dumps(data))
        model = parse_model_config(load_json(str(tmp_path / "m.json"), "m"), "m", [])
        return latent_size(resolve(model.predictor)[0], model, video)

    assert latent(REPO / "examples/wan2.1/14b/t2v/pretrain_t2v_model.json", (81, 720, 1280)) == (21, 90, 160)
    assert latent(REPO / "examples/wan2.2/5b/ti2v/pretrain_ti2v_model.json", (121, 704, 1280)) == (31, 44, 80)
    assert latent(REPO / "examples/wan2.1/14b/t2v/pretrain_t2v_model.json", (81, 720, 1280), z_dim=48) == (21, 45, 80)
    with pytest.raises(ValueError, match="ae.scale_factor_spatial and ae.scale_factor_temporal"):
        latent(REPO / "examples/wan2.1/14b/t2v/pretrain_t2v_model.json", (81, 720, 1280), z_dim=32)
    assert latent(REPO / "examples/wan2.1/14b/t2v/pretrain_t2v_model.json", (81, 720, 1280), z_dim=32,
                  scale_factor_spatial=16, scale_factor_temporal=4) == (21, 45, 80)
