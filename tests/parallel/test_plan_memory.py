"""mm-plan's per-rank static memory equals what the ranks of a real training set-up allocate: the
model chunks ``build_model_chunks`` builds, wrapped by ``wrap_for_training`` (megatron-core's DDP and
optimizer) after one optimizer step, on gloo ranks, for several layouts."""

from __future__ import annotations

import json

import pytest

from tests.dist_helper import run_distributed
from tests.plan_assets import write_plan_assets


@pytest.fixture(scope="module")
def jsons(tmp_path_factory):
    root = write_plan_assets(tmp_path_factory.mktemp("plan"))
    model = json.loads((root / "model.json").read_text())
    model["predictor"]["pipeline_num_layers"] = [[1, 1], [1, 1]]  # PP2 x VPP2
    (root / "model_pp.json").write_text(json.dumps(model))
    return str(root / "model.json"), str(root / "data.json")


def _argv(jsons, flags, world):
    model = jsons[0].replace("model.json", "model_pp.json") if "--pipeline-model-parallel-size" in flags else jsons[0]
    return ["--mm-model", model, "--mm-data", jsons[1], "--micro-batch-size", "1", "--global-batch-size",
            str(2 * world), "--lr", "1e-3", "--train-iters", "1", *flags]


def _allocated(rank, world, argv):
    import torch

    from mm.accelerator import select_accelerator
    from mm.arguments import config_from_args, parse_flags
    from mm.families import resolve
    from mm.models.predictor.transformer_config import transformer_config
    from mm.parallel import destroy_parallel, initialize_parallel
    from mm.training.pretrain import build_model_chunks, wrap_for_training

    config = config_from_args(parse_flags(argv), world)
    vpp = config.virtual_pipeline_size
    initialize_parallel(config.sizes, virtual_pipeline_parallel=vpp, seed=0, cp_algo=config.args.context_parallel_algo)
    family, arch = resolve(config.model.predictor)
    tf_config = transformer_config(config.args, arch, on_cpu=True, vpp=vpp)
    chunks = build_model_chunks(family, config.model.predictor, arch, tf_config, vpp)
    model, optimizer = wrap_for_training(chunks, tf_config, config.args, select_accelerator("cpu"))
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.step()  # Adam's moments exist from the first step

    def size(t):
        return t.numel() * t.element_size()

    buffers = [b for chunk in model for b in chunk.buffers]
    if config.args.use_distributed_optimizer:
        params = sum(size(b.param_data) for b in buffers)
    else:
        params = sum(size(p) for chunk in model for p in chunk.parameters() if p.requires_grad)
    grads = sum(size(b.grad_data) for b in buffers)
    opt = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for groups in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            opt += sum(size(t) for group in getattr(inner, groups, []) for t in group)
        opt += sum(size(v) for state in inner.optimizer.state.values() for k, v in state.items()
                   if k in ("exp_avg", "exp_avg_sq"))
    from megatron.core import parallel_state as mpu

    stage = mpu.get_pipeline_model_parallel_rank()
    destroy_parallel()
    return stage, (params, grads, opt)


def _predicted(rank, one, argv, world):
    from mm.arguments import config_from_args, parse_flags
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.plan.memory import static_memory

    initialize_parallel(ParallelSizes(world_size=1), seed=0)  # what single_process_groups sets up in mm-plan
    try:
        return static_memory(config_from_args(parse_flags(argv), world))
    finally:
        destroy_parallel()


LAYOUTS = {
    "tp2_sp_bf16": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--bf16"]),
    "dp2_distopt_bf16": (2, ["--use-distributed-optimizer", "--bf16"]),
    "dp2_distopt_overlap_fp32": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"]),
    "cp2_distopt_bf16": (2, ["--context-parallel-size", "2", "--use-distributed-optimizer", "--bf16"]),
    "pp2_vpp2_bf16": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                          "--bf16"]),
    "tp2_dp2_distopt_bf16": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--use-distributed-optimizer", "--bf16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_static_memory_equals_what_the_ranks_allocate(jsons, name):
    world, flags = LAYOUTS[name]
    argv = _argv(jsons, flags, world)
    measured = {}
    for stage, values in run_distributed(world, _allocated, argv):
        measured[stage] = [max(a, b) for a, b in zip(measured.get(stage, values), values)]
    # in a process of its own, as mm-plan runs: forked ranks must not inherit a gloo group's threads
    (predicted,) = run_distributed(1, _predicted, argv, world)
    assert sorted(measured) == list(range(len(predicted)))
    for stage, memory in enumerate(predicted):
        assert [memory.params, memory.grads, memory.optimizer] == measured[stage], (name, stage)
        assert memory.params > 0 and memory.grads > 0 and memory.optimizer > 0
