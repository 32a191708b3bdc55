"""Distributed checkpoints (torch_dist): a checkpoint written by one parallel layout loads into
another with the same weights and optimizer state; resume restores scheduler, iteration, consumed
samples and RNG; a save that fails leaves the previous checkpoint loadable."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_helper import _free_port, run_distributed
from tests.wan_helpers import diffusers_model, megatron_config, tiny_kwargs

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

# name -> parallel layout; world size = tp * pp * cp * dp
LAYOUTS = {
    "tp1": dict(),
    "tp2": dict(tp=2),
    "dp2_distopt": dict(dp=2, dist_opt=True),
    "dp1_distopt": dict(dist_opt=True),
    "dp2_distopt_dp_reshardable": dict(dp=2, dist_opt=True, optimizer_sharding="dp_reshardable"),
    "tp2_distopt": dict(tp=2, dist_opt=True),
    "cp2_distopt": dict(cp=2, dist_opt=True),
    "pp2": dict(pp=2),
    "pp2_vpp2": dict(pp=2, vpp=2),
    "pp2_vpp2_dp2_distopt": dict(pp=2, vpp=2, dp=2, dist_opt=True),
    # megatron's per-rank files (--ckpt-format torch): same TP/PP/VPP; DP x CP may change
    "torch_tp2": dict(tp=2, ckpt_format="torch"),
    "torch_tp2_cp2_distopt": dict(tp=2, cp=2, dist_opt=True, ckpt_format="torch"),
    "torch_tp2_distopt": dict(tp=2, dist_opt=True, ckpt_format="torch"),
    "torch_tp2_dp2": dict(tp=2, dp=2, ckpt_format="torch"),
    "torch_pp2_vpp2_dp2_distopt": dict(pp=2, vpp=2, dp=2, dist_opt=True, ckpt_format="torch"),
    "torch_pp2_vpp2_distopt": dict(pp=2, vpp=2, dist_opt=True, ckpt_format="torch"),
    # with an EMA of the weights (--ema-decay)
    "tp2_pp2_ema": dict(tp=2, pp=2, ema=True),
    "tp1_ema": dict(ema=True),
    "torch_tp2_ema": dict(tp=2, ema=True, ckpt_format="torch"),
    "torch_tp2_dp2_ema": dict(tp=2, dp=2, ema=True, ckpt_format="torch"),
}


def _world(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1) * layout.get("dp", 1)


def _allow_writer_processes() -> None:
    # megatron-core's torch_dist writer starts a multiprocessing manager; run_distributed's ranks are
    # daemonic processes, which may not have children
    multiprocessing.current_process().daemon = False


class Run:
    """One rank's tiny WanDiT in a layout: model chunks (DDP), megatron optimizer, LR scheduler."""

    def __init__(self, layout: dict, layers: int = 4, seed: int = 0):
        from megatron.core import parallel_state as mpu
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from mm.models.predictor.pipeline import layer_layout, stage_span
        from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights
        from mm.parallel import ParallelSizes, initialize_parallel

        _allow_writer_processes()
        tp, pp, cp, vpp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1), layout.get("vpp")
        self.dist_opt = layout.get("dist_opt", False)
        initialize_parallel(ParallelSizes(world_size=_world(layout), tensor_parallel=tp, pipeline_parallel=pp,
                                          context_parallel=cp), virtual_pipeline_parallel=vpp, seed=1234)
        kwargs = tiny_kwargs(image=True, layers=layers)
        dtype = torch.bfloat16  # bf16 weights: the optimizers keep fp32 main copies
        config = megatron_config(kwargs, tp, dtype=dtype, bf16=True, context_parallel_size=cp,
                                 pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                 pipeline_dtype=dtype)
        stage, self.tp_rank = mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()
        spans = layer_layout(layers, pp, vpp)
        source = diffusers_model(kwargs, seed=seed).state_dict()
        chunks = []
        for c in range(len(spans)):
            offset, count = stage_span(spans, stage, c)
            chunk = WanDiT(WanDiTConfig(**kwargs), config, pre_process=stage == 0 and c == 0,
                           post_process=stage == pp - 1 and c == len(spans) - 1, layer_offset=offset,
                           num_layers=count)
            load_hf_weights(chunk, source, tp_size=tp, tp_rank=self.tp_rank)
            chunks.append(chunk)
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=self.dist_opt)
        self.model = [DistributedDataParallel(config, ddp, chunk, disable_bucketing=i > 0)
                      for i, chunk in enumerate(chunks)]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-2, min_lr=1e-4, weight_decay=0.01, bf16=True, params_dtype=dtype, clip_grad=1.0,
            use_distributed_optimizer=self.dist_opt), self.model)
        self.ema = None
        if layout.get("ema"):
            from mm.training.ema import ModelEMA

            self.ema = ModelEMA(self.model, decay=0.5)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-4, lr_warmup_steps=8, lr_decay_steps=64,
            lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=64, wd_incr_style="constant")

    def train(self, steps: int, first: int = 1) -> None:
        """Optimizer steps on gradients that depend only on the tensor, the step and the TP shard, so
        every DP/CP replica holds the same (already reduced) gradient."""
        from mm.models.predictor.name_table import global_name

        for step in range(first, first + steps):
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            for chunk in self.model:
                for name, p in chunk.module.named_parameters():
                    seed = zlib.crc32(f"{global_name(name, chunk.module.layer_offset)}/{step}/{self.tp_rank}".encode())
                    p.main_grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
            ok, _, _ = self.optimizer.step()
            assert ok
            self.scheduler.step(increment=8)
            if self.ema is not None:
                self.ema.update(step)

    def snapshot(self) -> dict:
        """This rank's main-replica pieces of every model and optimizer tensor in the checkpoint's
        global coordinates (megatron's own sharded_state_dict of both), the per-TP-rank weights by
        global name, the Adam step and the scheduler state."""
        from megatron.core import parallel_state as mpu
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

        from mm.models.predictor.name_table import global_name

        model_sd = {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(self.model)}
        state = {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(model_sd, metadata=SHARDING)}
        if self.ema is not None:
            state["ema"] = self.ema.sharded_state_dict([f"model{i}" for i in range(len(self.model))])
        apply_factories(state)
        pieces = [(sh.key, sh.global_shape, sh.global_slice(), sh.data.detach().clone())
                  for sh in nested_values(state) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]
        weights = {}
        if mpu.get_data_parallel_rank(with_context_parallel=True) == 0:
            for chunk in self.model:
                weights.update({global_name(k, chunk.module.layer_offset): v.clone()
                                for k, v in chunk.module.state_dict().items() if not k.endswith("_extra_state")})
        steps = {int(s["step"]) for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                 for s in opt.optimizer.state.values() if "step" in s}
        return {"pieces": pieces, "weights": (self.tp_rank, weights), "adam_steps": steps,
                "scheduler": self.scheduler.state_dict()}

    def close(self) -> None:
        from mm.parallel import destroy_parallel

        destroy_parallel()


def _assemble(snapshots: list[dict]) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's pieces; each element must be covered."""
    full: dict[str, torch.Tensor] = {}
    for snap in snapshots:
        for key, shape, index, data in snap["pieces"]:
            t = full.setdefault(key, torch.full(shape, float("nan"), dtype=data.dtype))
            t[index] = data
    holes = [k for k, t in full.items() if t.isnan().any()]
    assert not holes, f"not covered by any rank: {holes}"
    return full


def _hf_weights(snapshots: list[dict]) -> dict[str, torch.Tensor]:
    """diffusers-named whole weights: each TP rank's tensors from all stages, merged over TP by the
    name table's own (independent) fused-q/k/v logic."""
    from mm.models.predictor.wan import mm_to_hf

    by_tp: dict[int, dict] = {}
    for snap in snapshots:
        tp_rank, weights = snap["weights"]
        by_tp.setdefault(tp_rank, {}).update(weights)
    return mm_to_hf([by_tp[r] for r in sorted(by_tp)])


def _save_worker(rank, world, layout, directory, steps):
    from mm.training.checkpointing import save_checkpoint

    run = Run(layout)
    run.train(steps)
    save_checkpoint(directory, steps, run.model, run.optimizer, run.scheduler, consumed_samples=8 * steps,
                    optimizer_sharding=layout.get("optimizer_sharding", "fully_reshardable"),
                    ckpt_format=layout.get("ckpt_format", "torch_dist"), ema=run.ema)
    snapshot = run.snapshot()
    run.close()
    return snapshot


def _load_worker(rank, world, layout, directory):
    from mm.training.checkpointing import load_checkpoint

    run = Run(layout, seed=7)  # other initial weights: everything must come from the checkpoint
    resumed = load_checkpoint(directory, run.model, run.optimizer, run.scheduler, load_rng=False, ema=run.ema)
    snapshot = run.snapshot()
    run.close()
    return resumed, snapshot


RESHARDING = [("tp2", "tp1"), ("tp1", "tp2"), ("dp2_distopt", "dp1_distopt"), ("dp2_distopt", "tp2_distopt"),
              ("cp2_distopt", "dp1_distopt"), ("pp2", "tp1"), ("pp2_vpp2", "tp1"), ("tp1", "pp2_vpp2"),
              ("pp2_vpp2_dp2_distopt", "tp2_distopt"), ("dp2_distopt_dp_reshardable", "dp2_distopt"),
              ("dp2_distopt_dp_reshardable", "dp1_distopt"),
              ("torch_tp2", "torch_tp2_dp2"), ("torch_tp2_cp2_distopt", "torch_tp2_distopt"),
              ("torch_pp2_vpp2_dp2_distopt", "torch_pp2_vpp2_distopt"), ("tp2_pp2_ema", "tp1_ema"),
              ("torch_tp2_ema", "torch_tp2_dp2_ema")]


@pytest.mark.parametrize("source,target", RESHARDING, ids=[f"{s}-to-{t}" for s, t in RESHARDING])
def test_checkpoint_loads_into_another_layout(tmp_path, source, target):
    saved = run_distributed(_world(LAYOUTS[source]), _save_worker, LAYOUTS[source], str(tmp_path), 2)
    results = run_distributed(_world(LAYOUTS[target]), _load_worker, LAYOUTS[target], str(tmp_path))
    assert all(resumed == (2, 16) for resumed, _ in results)
    loaded = [snap for _, snap in results]
    before, after = _assemble(saved), _assemble(loaded)
    assert set(before) == set(after)
    # the Adam moments and fp32 main weights, not only the model
    assert {k.split(".")[2] for k in before if k.startswith("optimizer.")} >= {"exp_avg", "exp_avg_sq"}
    if LAYOUTS[source].get("ema"):  # the averages came back, and they are not the weights
        ema_keys = [k for k in before if k.startswith("ema.")]
        assert len(ema_keys) > 40
        assert any(not torch.equal(before[k].float(), before[k[len("ema."):]].float()) for k in ema_keys)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    hf_before, hf_after = _hf_weights(saved), _hf_weights(loaded)
    assert set(hf_before) == set(hf_after) and len(hf_before) > 40
    for key in hf_before:
        assert torch.equal(hf_before[key], hf_after[key]), key
    assert all(s["adam_steps"] == {2} for s in saved + loaded)
    assert all(s["scheduler"] == saved[0]["scheduler"] for s in loaded)


def _draws() -> list:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return [random.random(), np.random.rand(2).tolist(), torch.rand(3), tracked]


def _resume_worker(rank, world, layout, directory, phase):
    from mm.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint

    run = Run(layout)
    out = {}
    if phase == "save":
        run.train(3)
        save_checkpoint(directory, 3, run.model, run.optimizer, run.scheduler, consumed_samples=24,
                        extra={"run": "resume"}, ckpt_format=layout.get("ckpt_format", "torch_dist"))
        out["draws"] = _draws()
        out["scheduler"] = run.scheduler.state_dict()
        out["lr"] = run.optimizer.param_groups[0]["lr"]
        run.train(1, first=4)  # what an uninterrupted run does next
        out["snapshot"] = run.snapshot()
    elif phase == "resume":
        random.seed(99 + rank)
        np.random.seed(99 + rank)
        torch.manual_seed(99 + rank)
        out["resumed"] = load_checkpoint(directory, run.model, run.optimizer, run.scheduler)
        out["draws"] = _draws()
        out["scheduler"] = run.scheduler.state_dict()
        out["lr"] = run.optimizer.param_groups[0]["lr"]
        run.train(1, first=4)
        out["snapshot"] = run.snapshot()
    elif phase == "finetune":
        out["resumed"] = load_checkpoint(directory, run.model, run.optimizer, run.scheduler, finetune=True)
        out["scheduler"] = run.scheduler.state_dict()
    elif phase == "other_layout":
        try:
            load_checkpoint(directory, run.model, run.optimizer, run.scheduler)
        except CheckpointError as e:
            out["error"] = str(e)
        out["resumed"] = load_checkpoint(directory, run.model, run.optimizer, run.scheduler, load_rng=False)
    run.close()
    return out


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_resume_restores_scheduler_iteration_samples_and_rng(tmp_path, ckpt_format):
    layout = dict(LAYOUTS["dp2_distopt"], ckpt_format=ckpt_format)
    saved = run_distributed(2, _resume_worker, layout, str(tmp_path), "save")
    resumed = run_distributed(2, _resume_worker, layout, str(tmp_path), "resume")
    for before, after in zip(saved, resumed):
        assert after["resumed"] == (3, 24)
        assert after["scheduler"] == before["scheduler"] and after["lr"] == before["lr"]
        for a, b in zip(before["draws"], after["draws"]):  # python, numpy, torch, megatron's TP tracker
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # one more step after the resume is the step the uninterrupted run took
    continued, after_resume = _assemble([s["snapshot"] for s in saved]), _assemble([s["snapshot"] for s in resumed])
    for key in continued:
        assert torch.equal(continued[key], after_resume[key]), key
    (finetuned,) = run_distributed(1, _resume_worker, LAYOUTS["dp1_distopt"], str(tmp_path), "finetune")
    assert finetuned["resumed"] == (0, 0)
    assert finetuned["scheduler"]["num_steps"] == 0
    (other,) = run_distributed(1, _resume_worker, LAYOUTS["dp1_distopt"], str(tmp_path), "other_layout")
    assert "per-rank RNG states of TP1 PP1 CP1 DP2" in other["error"] and "--no-load-rng" in other["error"]
    assert other["resumed"] == (3, 24)


def _errors_worker(rank, world, root):
    from mm.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint

    root = Path(root)
    errors = {}

    def attempt(name, run, directory, **kwargs):
        try:
            load_checkpoint(directory, run.model, run.optimizer, run.scheduler, **kwargs)
        except CheckpointError as e:
            errors[name] = str(e)

    run = Run(LAYOUTS["tp1"], layers=2)
    out = {"fresh": load_checkpoint(root / "empty", run.model, run.optimizer, run.scheduler)}
    save_checkpoint(root / "ckpt", 5, run.model, None, None, consumed_samples=40, save_optim=False)
    attempt("no_optimizer", run, root / "ckpt")
    out["weights_only"] = load_checkpoint(root / "ckpt", run.model, run.optimizer, run.scheduler, load_optim=False)
    attempt("iteration_dir", run, root / "ckpt" / "iter_0000005")
    (root / "ckpt" / "iter_0000005").rename(root / "ckpt" / "moved")
    attempt("missing_dir", run, root / "ckpt")
    (root / "ckpt" / "moved").rename(root / "ckpt" / "iter_0000005")
    run.close()
    deeper = Run(LAYOUTS["tp1"], layers=3)
    attempt("deeper_model", deeper, root / "ckpt", load_optim=False)
    deeper.close()
    # torch format: per-rank files of one layout; a release (converted weights: model only)
    run = Run(LAYOUTS["tp1"], layers=2, seed=3)
    save_checkpoint(root / "torch", 4, run.model, run.optimizer, run.scheduler, consumed_samples=32,
                    ckpt_format="torch")
    weights = {k: v.clone() for k, v in run.model[0].module.state_dict().items() if v is not None}
    save_checkpoint(root / "release", 0, run.model, None, None, consumed_samples=0, save_optim=False,
                    save_rng=False, ckpt_format="torch")
    (root / "release" / "iter_0000000").rename(root / "release" / "release")
    (root / "release" / "latest_checkpointed_iteration.txt").write_text("release\n")
    run.close()
    fresh = Run(LAYOUTS["tp1"], layers=2, seed=7)
    attempt("release_with_optim", fresh, root / "release")
    attempt("release_with_rng", fresh, root / "release", load_optim=False)
    out["release"] = load_checkpoint(root / "release", fresh.model, fresh.optimizer, fresh.scheduler,
                                     load_optim=False, load_rng=False)
    loaded = {k: v for k, v in fresh.model[0].module.state_dict().items() if v is not None}
    out["release_weights_equal"] = set(loaded) == set(weights) and all(torch.equal(weights[k], v)
                                                                       for k, v in loaded.items())
    fresh.close()
    out["errors"] = errors
    return out


def _torch_layout_worker(rank, world, root):
    from mm.training.checkpointing import CheckpointError, load_checkpoint

    run = Run(LAYOUTS["tp2"], layers=2)
    try:
        load_checkpoint(Path(root) / "torch", run.model, run.optimizer, run.scheduler, load_rng=False)
    except CheckpointError as e:
        return str(e)
    finally:
        run.close()


def test_load_explains_what_is_wrong(tmp_path, capfd):
    (out,) = run_distributed(1, _errors_worker, str(tmp_path))
    assert out["fresh"] == (0, 0)
    assert "--load" in capfd.readouterr().out  # the start-from-scratch message names the directory
    errors = out["errors"]
    assert f"--load {tmp_path}/ckpt: latest_checkpointed_iteration.txt names iteration 5, but " \
           f"{tmp_path}/ckpt/iter_0000005 does not exist" in errors["missing_dir"]
    assert "one checkpoint's directory; pass its parent" in errors["iteration_dir"]
    assert "holds no optimizer state" in errors["no_optimizer"] and "--no-load-optim" in errors["no_optimizer"]
    assert out["weights_only"] == (5, 40)
    assert "not in the checkpoint (" in errors["deeper_model"] and "blocks.2." in errors["deeper_model"]
    assert "holds no optimizer state" in errors["release_with_optim"]
    assert "holds no RNG state" in errors["release_with_rng"] and "--no-load-rng" in errors["release_with_rng"]
    assert out["release"] == (0, 0) and out["release_weights_equal"]
    message = run_distributed(2, _torch_layout_worker, str(tmp_path))[0]
    assert "torch-format checkpoint (one file per model-parallel rank) of TP1 PP1 CP1 DP1" in message
    assert "this run: TP2 PP1 CP1 DP1" in message and "mm-convert" in message


def _failing_save_worker(rank, world, root, failure):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from mm.ckpt import read_tracker
    from mm.training import checkpoint_torch, checkpointing
    from mm.training.checkpointing import load_checkpoint, save_checkpoint

    ckpt_format = "torch" if failure.startswith("torch") else "torch_dist"
    run = Run(LAYOUTS["tp2"], layers=2)
    run.train(1)
    save_checkpoint(root, 1, run.model, run.optimizer, run.scheduler, consumed_samples=8, ckpt_format=ckpt_format)
    at_one = run.snapshot()
    run.train(1, first=2)
    out = {}
    original = (FileSystemWriterAsync.write_preloaded_data, checkpointing._publish, checkpoint_torch._save_file)
    if failure == "write" and rank == 1:  # one rank's disk write fails part-way
        def broken_write(*args, **kwargs):
            raise OSError("No space left on device")
        FileSystemWriterAsync.write_preloaded_data = staticmethod(broken_write)
    if failure == "torch_write" and rank == 1:  # --ckpt-format torch: one rank's file write fails
        def broken_save_file(*args):
            raise OSError("No space left on device")
        checkpoint_torch._save_file = broken_save_file
    if failure == "publish":  # every shard written, rank 0 fails to rename the directory into place
        def broken_publish(*args):
            raise OSError("Read-only file system")
        checkpointing._publish = broken_publish
    try:
        save_checkpoint(root, 2, run.model, run.optimizer, run.scheduler, consumed_samples=16,
                        ckpt_format=ckpt_format)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    FileSystemWriterAsync.write_preloaded_data, checkpointing._publish, checkpoint_torch._save_file = original
    out["tracker"] = read_tracker(root)
    out["left_over"] = sorted(p.name for p in Path(root).iterdir())
    run.close()
    reloaded = Run(LAYOUTS["tp2"], layers=2, seed=7)
    out["resumed"] = load_checkpoint(root, reloaded.model, reloaded.optimizer, reloaded.scheduler)
    out["same"] = _pieces_equal(reloaded.snapshot(), at_one)
    # the next save clears what the failed one left
    save_checkpoint(root, 3, reloaded.model, reloaded.optimizer, reloaded.scheduler, consumed_samples=24,
                    ckpt_format=ckpt_format)
    out["after_next_save"] = sorted(p.name for p in Path(root).iterdir())
    reloaded.close()
    return out


def _pieces_equal(a: dict, b: dict) -> bool:
    return len(a["pieces"]) == len(b["pieces"]) and all(
        x[0] == y[0] and torch.equal(x[3], y[3]) for x, y in zip(a["pieces"], b["pieces"]))


@pytest.mark.parametrize("failure", ["write", "publish", "torch_write"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, failure):
    results = run_distributed(2, _failing_save_worker, str(tmp_path), failure)
    for out in results:
        assert "error" in out, "the failed save must raise on every rank"
        assert out["tracker"] == 1
        assert "iter_0000002" not in out["left_over"] and "iter_0000001" in out["left_over"]
        assert out["resumed"] == (1, 8) and out["same"]
        assert out["after_next_save"] == ["iter_0000001", "iter_0000003", "latest_checkpointed_iteration.txt"]


def die_mid_save(root: str) -> None:
    """A one-rank training process (started on its own, as torchrun would) that saves iteration 1,
    then dies while writing iteration 2: what a node failure or an OOM kill does."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from mm.accelerator import init_distributed, select_accelerator
    from mm.training.checkpointing import save_checkpoint

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    init_distributed(select_accelerator("cpu"), timeout_minutes=5)
    run = Run(LAYOUTS["tp1"], layers=2)
    run.train(1)
    save_checkpoint(root, 1, run.model, run.optimizer, run.scheduler, consumed_samples=8)
    torch.save(run.snapshot(), Path(root).parent / "at_one.pt")
    run.train(1, first=2)
    write = FileSystemWriterAsync.write_preloaded_data

    def dying_write(*args, **kwargs):
        write(*args, **kwargs)  # one file of the checkpoint is on disk
        os._exit(3)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(dying_write)
    save_checkpoint(root, 2, run.model, run.optimizer, run.scheduler, consumed_samples=16)


def _reload_worker(rank, world, root):
    from mm.training.checkpointing import load_checkpoint

    run = Run(LAYOUTS["tp1"], layers=2, seed=7)
    resumed = load_checkpoint(root, run.model, run.optimizer, run.scheduler)
    snapshot = run.snapshot()
    run.close()
    return resumed, snapshot


def test_process_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    from mm.ckpt import read_tracker

    root = tmp_path / "ckpt"
    repo = Path(__file__).resolve().parents[2]
    log = tmp_path / "died.log"
    with open(log, "w") as out:
        # its own process group: the dead rank's writer helper (megatron's multiprocessing manager)
        # outlives it and is ended with the group
        died = subprocess.Popen([sys.executable, "-c", "from tests.parallel.test_checkpointing import die_mid_save; "
                                 f"die_mid_save({str(root)!r})"], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = died.wait(timeout=300)
        finally:
            try:
                os.killpg(died.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == 3, log.read_text()[-3000:]
    assert read_tracker(root) == 1
    assert any((root / ".iter_0000002.tmp").iterdir())  # the dead save got part of the way
    (resumed, snapshot), = run_distributed(1, _reload_worker, str(root))
    assert resumed == (1, 8)
    assert _pieces_equal(snapshot, torch.load(tmp_path / "at_one.pt", weights_only=False))


def _ema_mismatch_worker(rank, world, root):
    from mm.training.checkpointing import load_checkpoint, save_checkpoint

    out = {}
    plain = Run(LAYOUTS["tp1"], layers=2)
    plain.train(2)
    save_checkpoint(Path(root) / "no_ema", 2, plain.model, plain.optimizer, plain.scheduler, consumed_samples=16)
    plain.close()
    with_ema = Run(LAYOUTS["tp1_ema"], layers=2, seed=7)
    out["no_ema"] = load_checkpoint(Path(root) / "no_ema", with_ema.model, with_ema.optimizer, with_ema.scheduler,
                                    ema=with_ema.ema)
    weights = dict(with_ema.model[0].module.named_parameters())
    out["reset_to_weights"] = all(torch.equal(v, weights[k].float()) for k, v in with_ema.ema.state_dict()[0].items())
    with_ema.train(2, first=3)
    save_checkpoint(Path(root) / "ema", 4, with_ema.model, with_ema.optimizer, with_ema.scheduler,
                    consumed_samples=32, ema=with_ema.ema)
    with_ema.close()
    again = Run(LAYOUTS["tp1"], layers=2, seed=5)  # a run without EMA ignores the checkpoint's
    out["ignored"] = load_checkpoint(Path(root) / "ema", again.model, again.optimizer, again.scheduler)
    again.close()
    return out


def test_ema_absent_from_the_checkpoint_starts_from_the_weights(tmp_path):
    (out,) = run_distributed(1, _ema_mismatch_worker, str(tmp_path))
    assert out["no_ema"] == (2, 16) and out["reset_to_weights"]
    assert out["ignored"] == (4, 32)


def _damaged_worker(rank, world, root):
    from mm.ckpt import MANIFEST, DamagedCheckpointError
    from mm.training.checkpointing import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    run = Run(LAYOUTS["tp2"], layers=2)
    for step in (1, 2):
        run.train(1, first=step)
        save_checkpoint(root, step, run.model, run.optimizer, run.scheduler, consumed_samples=8 * step)
        if step == 1:
            at_one = run.snapshot()
    out["manifest"] = sorted(json_files(root / "iter_0000002" / MANIFEST))
    run.close()
    if rank == 0:  # the newest checkpoint loses the end of one data file
        data = root / "iter_0000002" / "__1_0.distcp"
        data.write_bytes(data.read_bytes()[:1000])
    torch.distributed.barrier()
    again = Run(LAYOUTS["tp2"], layers=2, seed=7)
    try:
        load_checkpoint(root, again.model, again.optimizer, again.scheduler)
    except DamagedCheckpointError as e:
        out["error"] = str(e)
    resumed = load_checkpoint(root, again.model, again.optimizer, again.scheduler, fallback=True)
    out["resumed"], out["path"] = tuple(resumed), resumed.path
    out["same"] = _pieces_equal(again.snapshot(), at_one)
    # iteration 2 again, keeping one checkpoint: the damaged one is replaced, the loaded one stays
    again.train(1, first=2)
    save_checkpoint(root, 2, again.model, again.optimizer, again.scheduler, consumed_samples=16, keep_last=1,
                    protect=resumed.path)
    again.train(1, first=3)
    save_checkpoint(root, 3, again.model, again.optimizer, again.scheduler, consumed_samples=24, keep_last=1,
                    protect=resumed.path)
    torch.distributed.barrier()  # rank 0 deletes after the save, without holding the others
    out["left"] = sorted(p.name for p in root.iterdir())
    again.close()
    return out


def json_files(manifest: Path) -> dict:
    import json

    return json.loads(manifest.read_text())["files"]


def test_damaged_checkpoint_is_found_before_loading_and_fallback_loads_the_one_before(tmp_path):
    """Saves record a manifest; a truncated data file of the latest checkpoint is a
    DamagedCheckpointError naming it on every rank, or with fallback the previous checkpoint loads
    with its exact state; keep_last prunes older checkpoints but never the one loaded."""
    results = run_distributed(2, _damaged_worker, str(tmp_path))
    data = tmp_path / "iter_0000002" / "__1_0.distcp"
    for out in results:
        assert out["manifest"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "metadata.json"]
        assert out["error"].startswith(f"--load {tmp_path}: {tmp_path}/iter_0000002 is damaged: {data} has 1000 "
                                       "bytes, the manifest records")
        assert "--load-fallback would load the newest earlier checkpoint" in out["error"]
        assert out["resumed"] == (1, 8) and out["path"] == tmp_path / "iter_0000001" and out["same"]
        assert out["left"] == ["iter_0000001", "iter_0000003", "latest_checkpointed_iteration.txt"]
