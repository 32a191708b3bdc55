"""mm-plan's calibration: the fits recover per-layer and rest figures from 1- and 3-layer points; the
in-flight micro-batches of a pipeline stage are megatron-core's own warm-up counts; ``mm-plan
calibrate`` runs the training iteration of the real loop on the CPU, writes its file, and ``mm-plan
--calibration`` predicts from it (and refuses a run with other settings)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.plan_assets import REPO, write_plan_assets


def _points(layer, rest, layer_mem, rest_mem, tokens):
    ev = lambda coef, t: sum(c * t ** k for k, c in enumerate(coef))  # noqa: E731
    return [dict(tokens=t, layers=n, seconds=n * ev(layer, t) + ev(rest, t),
                 peak_bytes=n * ev(layer_mem, t) + ev(rest_mem, t), static_bytes=1)
            for t in tokens for n in (1, 3)]


def test_the_fits_recover_the_per_layer_and_the_rest_figures():
    from mm.plan.calibrate import Calibration, fits_of

    layer, rest, layer_mem, rest_mem = [0.01, 2e-5, 3e-10], [0.2, 1e-6], [1e6, 4.5e4], [3e8, 2e4]
    fits = fits_of(_points(layer, rest, layer_mem, rest_mem, [7800, 20280, 32760]))
    cal = Calibration(settings={}, device="test", micro_batch_size=1, model={}, points=[], **fits)
    for tokens, layers in ((14040, 30), (26520, 40), (40000, 10)):  # none of them measured
        seconds = layers * (0.01 + 2e-5 * tokens + 3e-10 * tokens ** 2) + 0.2 + 1e-6 * tokens
        held = layers * (1e6 + 4.5e4 * tokens) + 3e8 + 2e4 * tokens
        assert cal.step_seconds(layers, tokens) == pytest.approx(seconds, rel=1e-9)
        assert cal.activation_bytes(layers, tokens) == pytest.approx(held, rel=1e-9)
    # a CPU calibration has no memory: no activation figure, the time still fits
    cpu = [dict(p, peak_bytes=None) for p in _points(layer, rest, layer_mem, rest_mem, [100, 200])]
    assert fits_of(cpu)["layer_bytes"] is None


def test_the_optimizer_step_is_fitted_apart_and_paid_once_per_iteration_on_a_ranks_shard(jsons, tmp_path, monkeypatch):
    from mm.plan.calibrate import Calibration, fits_of
    from mm.plan.estimate import estimate
    from mm.plan.layouts import Layout, layout_config

    layer, rest, opt_rest, opt_layer = [0.01, 2e-5, 3e-10], [0.2, 1e-6], 0.05, 0.004
    points = _points(layer, rest, [1e6, 4.5e4], [3e8, 2e4], [7800, 20280, 32760])
    for p in points:  # the measured iteration holds the optimizer step, which is also timed apart
        p["optimizer_seconds"] = opt_rest + p["layers"] * opt_layer
        p["seconds"] += p["optimizer_seconds"]
    fits = fits_of(points)
    assert fits["optimizer_seconds"] == pytest.approx([opt_rest, opt_layer], rel=1e-9)
    assert fits["rest_seconds"] == pytest.approx(rest, rel=1e-6)  # the optimizer is out of the per-micro-batch rest
    cal = Calibration(settings={}, device="test", micro_batch_size=1, model={}, points=[], **fits)
    assert cal.step_seconds(30, 14040) == pytest.approx(
        30 * (0.01 + 2e-5 * 14040 + 3e-10 * 14040 ** 2) + 0.2 + 1e-6 * 14040 + opt_rest + 30 * opt_layer, rel=1e-9)

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    base = ["--mm-model", str(jsons / "model.json"), "--mm-data", str(jsons / "data.json"), "--micro-batch-size", "1",
            "--lr", "1e-3", "--train-iters", "1"]

    def compute(gbs, *flags):
        config = layout_config([*base, "--global-batch-size", str(gbs), *flags], Layout(1, 1, 1, 8), tmp_path)
        return estimate(cal, config, 30, 14040, 1).compute_seconds

    per_micro = 30 * (0.01 + 2e-5 * 14040 + 3e-10 * 14040 ** 2) + 0.2 + 1e-6 * 14040
    step = opt_rest + 30 * opt_layer
    # DP8 (mm-plan's layouts shard the optimizer over DP x CP), 4 micro-batches each: the step once, on an
    # eighth of the parameters; with one micro-batch the same step
    assert compute(32) == pytest.approx(4 * per_micro + step / 8, rel=1e-9)
    assert compute(8) == pytest.approx(per_micro + step / 8, rel=1e-9)


@pytest.mark.parametrize("pp,vpp,micro", [(2, None, 1), (2, None, 8), (4, None, 3), (4, 2, 8), (2, 3, 4),
                                          (4, 4, 2), (8, 2, 16)])
def test_in_flight_micro_batches_are_megatrons_warm_up_counts(pp, vpp, micro):
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from mm.plan.estimate import in_flight

    for stage in range(pp):
        group = SimpleNamespace(size=lambda: pp, rank=lambda s=stage: s)
        comm = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)
        chunks = vpp or 1
        total, _, warmup, _ = get_pp_rank_microbatches(micro, chunks, pp, p2p_communicator=comm)
        # the chunk forwards whose activations are held at the first backward: the warm-up and the one in progress
        assert in_flight(stage, pp, vpp, micro) * chunks == min(warmup + 1, total)


@pytest.fixture(scope="module")
def jsons(tmp_path_factory):
    return write_plan_assets(tmp_path_factory.mktemp("plan"))


def _run(args, **env):
    return subprocess.run([sys.executable, "-m", "mm.plan", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env), timeout=600)


@pytest.mark.slow
def test_calibrate_then_plan_with_it(jsons, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    training = ["--mm-model", str(jsons / "model.json"), "--mm-data", str(jsons / "data.json"),
                "--micro-batch-size", "1", "--lr", "1e-3"]
    out = tmp_path / "calibration.json"
    done = _run(["calibrate", "--videos", "9x64x64", "17x64x64", "--repeats", "1", "--warmups", "1",
                 "--output", str(out), "--", *training])
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert sorted((p["layers"], p["tokens"]) for p in data["points"]) == [(1, 48), (1, 80), (3, 48), (3, 80)]
    assert all(p["seconds"] > 0 and p["peak_bytes"] is None for p in data["points"])  # the CPU: time only
    assert data["settings"]["recompute_granularity"] is None and data["fits"]["layer_bytes"] is None
    assert not out.with_name(out.name + ".tmp").exists()

    from mm.plan.cli import main

    assert main(["--nodes", "1", "--gpus-per-node", "2", "--calibration", str(out), "--video", "17x64x64", "--",
                 *training, "--global-batch-size", "4"]) == 0
    stdout = capsys.readouterr().out
    assert "at 80 tokens per sample" in stdout and "s/it" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("TP")]
    # the s/it column, before the MFU (CPU timings of a tiny model are noise: only that there is one)
    assert rows and all(math.isfinite(float(r.split("  --")[0].split()[-2])) for r in rows)


def _refusal(capsys, args) -> str:
    """mm-plan in this process (each case fails before any process group or model): its stderr."""
    from mm.plan.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_bad_calibration_input_is_refused_with_exit_2(jsons, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    training = ["--mm-model", str(jsons / "model.json"), "--mm-data", str(jsons / "data.json"),
                "--micro-batch-size", "1", "--lr", "1e-3"]
    out = tmp_path / "calibration.json"
    points = _points([0.01, 1e-5], [0.1, 1e-6], [1e6, 1e4], [1e8, 1e3], [48, 80])
    from mm.plan.calibrate import fits_of

    settings = {k: None for k in ("recompute_granularity", "recompute_method", "recompute_num_layers",
                                  "recompute_modules")}
    settings.update(compile_dit_blocks=False, attention_kernel="auto", bf16=False, fp16=False)
    from mm.arguments.json_configs import load_json, parse_model_config
    from mm.plan.calibrate import _architecture

    model = _architecture(parse_model_config(load_json(str(jsons / "model.json"), "m"), "m", []).predictor)
    out.write_text(json.dumps({"format": 1, "device": "test", "micro_batch_size": 1, "settings": settings,
                               "model": model, "points": points, "fits": fits_of(points)}))
    # settings that change what a layer costs: refused with the flag named
    err = _refusal(capsys, ["--calibration", str(out), "--video", "17x64x64", "--", *training,
                            "--recompute-granularity", "full", "--recompute-method", "uniform",
                            "--recompute-num-layers", "1"])
    assert "--recompute-granularity 'full'" in err
    assert "18 frames" in _refusal(capsys, ["--calibration", str(out), "--video", "18x64x64", "--", *training])
    assert "--calibration and --video go together" in _refusal(capsys, ["--calibration", str(out), "--", *training])
    (tmp_path / "broken.json").write_text("{")
    assert "broken.json" in _refusal(capsys, ["--calibration", str(tmp_path / "broken.json"), "--video", "17x64x64",
                                              "--", *training])
    assert "--tensor-model-parallel-size" in _refusal(capsys, [
        "calibrate", "--videos", "9x64x64", "--output", str(tmp_path / "c.json"), "--", *training,
        "--tensor-model-parallel-size", "2"])
    assert "FRAMESxHEIGHTxWIDTH" in _refusal(capsys, ["calibrate", "--videos", "9x64", "--output",
                                                      str(tmp_path / "c.json"), "--", *training])
    assert "--output" in _refusal(capsys, ["calibrate", "--videos", "9x64x64", "--", *training])


def _with_tiny_vae(model_json: Path, root: Path) -> Path:
    """A copy of ``model_json`` whose VAE section names a tiny Wan VAE (mm-plan reads its compression)."""
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae

    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)), root / "vae")
    model = json.loads(model_json.read_text())
    model["ae"] = {"model_id": "wan_vae", "from_pretrained": str(root / "vae")}
    out = root / "model.json"
    out.write_text(json.dumps(model))
    return out


@pytest.mark.parametrize("name,flags", [
    ("calibration_h100_compiled_layernorm.json", ["--compile-dit-blocks", "--attention-kernel", "flash3",
                                                  "--recompute-granularity", "selective", "--recompute-modules",
                                                  "layernorm"]),
    ("calibration_h100_full.json", ["--attention-kernel", "flash3", "--recompute-granularity", "full",
                                    "--recompute-method", "uniform", "--recompute-num-layers", "1"])])
def test_the_shipped_h100_calibrations_plan_wan_1_3b_and_refuse_another_model(name, flags, jsons, tmp_path, capsys,
                                                                            monkeypatch):
    from mm.plan.calibrate import Calibration
    from mm.plan.cli import main

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    example = REPO / "examples/wan2.1/1.3b/t2v"
    cal = Calibration.read(example / name)
    assert cal.device.startswith("NVIDIA H100") and cal.layer_bytes is not None
    # each whole-model figure the file holds beside its fits is reproduced by them within 10% / 15%
    model = _with_tiny_vae(example / "pretrain_t2v_model.json", tmp_path)
    training = ["--mm-model", str(model), "--mm-data", str(example / "data.json"), "--micro-batch-size", "1",
                "--global-batch-size", "8", "--bf16", "--lr", "1e-5", *flags]
    assert main(["--nodes", "1", "--gpus-per-node", "8", "--top", "0", "--calibration", str(example / name),
                 "--video", "81x480x832", "--", *training]) == 0
    out = capsys.readouterr().out
    assert "at 32760 tokens per sample" in out
    # data parallelism leaves a rank the whole model's activations of one sample: the calibration's figure
    row = next(line for line in out.splitlines() if line.startswith("TP1 CP1 PP1 DP8"))
    assert float(row[40:].split()[3]) == pytest.approx(cal.activation_bytes(30, 32760) / 2**30, abs=0.006)
    # the tiny model of the other tests is not what was measured: refused, the differing keys named
    other = ["--mm-model", str(jsons / "model.json"), "--mm-data", str(jsons / "data.json"), "--micro-batch-size",
             "1", "--bf16", "--lr", "1e-5", *flags]
    err = _refusal(capsys, ["--calibration", str(example / name), "--video", "17x64x64", "--", *other])
    assert "the model JSON's predictor" in err and "hidden_size" in err


def test_a_points_model_state_is_freed_when_it_returns(jsons, monkeypatch):
    """Each point's trainer (model, gradient buffers, optimizer state) is gone when the point returns,
    without waiting for a garbage collection: the next point's "model state" is the device memory held
    between its iterations, which must not include the previous point's."""
    import gc
    import weakref

    from mm.accelerator import destroy_distributed
    from mm.parallel import destroy_parallel
    from mm.plan import calibrate
    from mm.runtime import start
    from mm.training.checks import check_task
    from mm.training.pretrain import Trainer

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    training = ["--mm-model", str(jsons / "model.json"), "--mm-data", str(jsons / "data.json"), "--micro-batch-size",
                "1", "--global-batch-size", "1", "--lr", "1e-3", "--train-iters", "2"]
    runtime = start(training, mode="train", prog="test", check=lambda c: check_task("t2v", c, files=False, weights=False))
    optimizers = []

    class Watched(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self.optimizer))

    enabled = gc.isenabled()
    gc.disable()  # only reference counts free it
    try:
        model = json.loads((jsons / "model.json").read_text())["predictor"]
        calibrate._measure_point(Watched, runtime, (2, 8, 8), model["in_dim"], (model["text_dim"],), [16], 1, 1)
        assert optimizers and optimizers[0]() is None
    finally:
        if enabled:
            gc.enable()
        destroy_parallel()
        destroy_distributed()
