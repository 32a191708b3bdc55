"""megatron-core as it is, on CPU processes over gloo, against single-process twins (fp64).

Covers what the CPU mode of mm.accelerator promises: tensor-parallel layers with and without
sequence parallelism, the RNG tracker, the pipeline schedules (PP and PP x VPP) with p2p
communication, DDP and the distributed optimizer.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed

HIDDEN, FFN, SEQ, BATCH = 8, 16, 6, 2


def _reference_mlp_weights():
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(FFN, HIDDEN, generator=g, dtype=torch.float64)
    b1 = torch.randn(FFN, generator=g, dtype=torch.float64)
    w2 = torch.randn(HIDDEN, FFN, generator=g, dtype=torch.float64)
    b2 = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    probe = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    return w1, b1, w2, b2, x, probe


def _twin_mlp():
    w1, b1, w2, b2, x, probe = (t.clone().requires_grad_() for t in _reference_mlp_weights())
    out = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    (out * probe).sum().backward()
    return out.detach(), w1.grad, b1.grad, w2.grad, b2.grad, x.grad


def _tp_mlp_worker(rank: int, world: int, sequence_parallel: bool):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=world), seed=1234)
    config = ModelParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sequence_parallel,
                                 use_cpu_initialization=True, params_dtype=torch.float64,
                                 gradient_accumulation_fusion=False)
    fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                               gather_output=False)
    fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    w1, b1, w2, b2, x, probe = _reference_mlp_weights()
    shard = FFN // world
    with torch.no_grad():
        fc1.weight.copy_(w1[rank * shard:(rank + 1) * shard])
        fc1.bias.copy_(b1[rank * shard:(rank + 1) * shard])
        fc2.weight.copy_(w2[:, rank * shard:(rank + 1) * shard])
        fc2.bias.copy_(b2)
    if sequence_parallel:  # each rank holds its slice of the sequence
        s = SEQ // world
        x, probe = x[rank * s:(rank + 1) * s], probe[rank * s:(rank + 1) * s]
    x = x.clone().requires_grad_()
    hidden, _ = fc1(x)
    out, _ = fc2(torch.nn.functional.gelu(hidden))
    (out * probe).sum().backward()
    result = dict(out=out.detach(), w1=fc1.weight.grad, b1=fc1.bias.grad, w2=fc2.weight.grad,
                  b2=fc2.bias.grad, x=x.grad)
    destroy_parallel()
    return result


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_mlp_matches_single_process(sequence_parallel):
    out, w1, b1, w2, b2, xg = _twin_mlp()
    results = run_distributed(2, _tp_mlp_worker, sequence_parallel)
    shard, s = FFN // 2, SEQ // 2
    for rank, r in enumerate(results):
        rows = slice(rank * shard, (rank + 1) * shard)
        seq = slice(rank * s, (rank + 1) * s) if sequence_parallel else slice(None)
        torch.testing.assert_close(r["out"], out[seq])
        torch.testing.assert_close(r["x"], xg[seq])
        torch.testing.assert_close(r["w1"], w1[rows])
        torch.testing.assert_close(r["b1"], b1[rows])
        torch.testing.assert_close(r["w2"], w2[:, rows])
        if sequence_parallel:
            # the bias of a row-parallel layer under SP sees only this rank's tokens; megatron
            # all-reduces such grads across TP in finalize_model_grads (sequence_parallel attr)
            torch.testing.assert_close(sum(x["b2"] for x in results), b2)
        else:
            torch.testing.assert_close(r["b2"], b2)


def _rng_worker(rank: int, world: int):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=world), seed=99)
    default_before = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(3)
    default_after = torch.rand(3)
    destroy_parallel()
    return default_before, tp_draw, default_after


def test_rng_tracker_forks_the_cpu_generator():
    results = run_distributed(2, _rng_worker)
    (b0, t0, a0), (b1, t1, a1) = results
    # the default stream is the data-parallel seed, the same on both TP ranks ...
    torch.testing.assert_close(b0, b1)
    torch.testing.assert_close(a0, a1)
    # ... the tracker's stream differs per TP rank, and forking it leaves the default stream alone
    assert not torch.equal(t0, t1)
    torch.manual_seed(99)
    expected = torch.rand(6)
    torch.testing.assert_close(torch.cat([b0, a0]), expected)


# ---------------------------------------------------------------- pipeline schedules

LAYERS, WIDTH, MICRO, NUM_MICRO = 4, 5, 3, 4


def _pipeline_data():
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) / WIDTH**0.5 for _ in range(LAYERS)]
    batches = [torch.randn(MICRO, 1, WIDTH, generator=g, dtype=torch.float64) for _ in range(NUM_MICRO)]
    targets = [torch.randn(MICRO, 1, WIDTH, generator=g, dtype=torch.float64) for _ in range(NUM_MICRO)]
    return weights, batches, targets


def _twin_pipeline_grads():
    weights, batches, targets = _pipeline_data()
    weights = [w.clone().requires_grad_() for w in weights]
    total = 0
    for x, y in zip(batches, targets):
        h = x
        for w in weights:
            h = torch.tanh(h @ w.t())
        total = total + ((h - y) ** 2).mean() / NUM_MICRO
    total.backward()
    return [w.grad for w in weights], total.detach()


from megatron.core.enums import ModelType  # noqa: E402


class _Chunk(torch.nn.Module):
    """Some consecutive layers of the toy model; the first chunk of stage 0 reads the batch."""

    def __init__(self, weights, config, reads_batch: bool):
        super().__init__()
        self.layers = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in weights])
        self.config = config
        self.reads_batch = reads_batch
        self.input_tensor = None
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, batch):
        h = batch if self.reads_batch else self.input_tensor
        for w in self.layers:
            h = torch.tanh(h @ w.t())
        return h


def _pipeline_worker(rank: int, world: int, vpp: int | None):
    from megatron.core import ModelParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, pipeline_parallel=world), virtual_pipeline_parallel=vpp)
    weights, batches, targets = _pipeline_data()
    config = ModelParallelConfig(pipeline_model_parallel_size=world, virtual_pipeline_model_parallel_size=vpp,
                                 pipeline_dtype=torch.float64, params_dtype=torch.float64,
                                 # Megatron-LM's setting for interleaving: separate isend/irecv per
                                 # direction. The batched path cannot tell the two directions apart
                                 # when both peers are the same rank (PP=2) on gloo.
                                 overlap_p2p_comm=vpp is not None, batch_p2p_comm=vpp is None)
    config.hidden_size = WIDTH  # p2p buffers are [seq_length, micro_batch_size, hidden_size]
    chunks = vpp or 1
    per_chunk = LAYERS // (world * chunks)
    model, layer_ids = [], []
    for v in range(chunks):
        first = (v * world + rank) * per_chunk  # chunk v of stage p holds global chunk v * PP + p
        ids = list(range(first, first + per_chunk))
        layer_ids.append(ids)
        model.append(_Chunk([weights[i] for i in ids], config, reads_batch=(first == 0)))
    # the first and last chunks each read the data stream once per micro-batch
    streams = {}
    for v, chunk in enumerate(model):
        chunk.vp = v
        last = (v == chunks - 1) and rank == world - 1
        if chunk.reads_batch or last:
            streams[v] = iter(list(zip(batches, targets)))

    def step(data_iterator, chunk):
        x, y = next(streams[chunk.vp]) if chunk.vp in streams else (None, None)
        out = chunk(x)

        def loss_func(output):
            loss = ((output - y) ** 2).mean()
            return loss, {"loss": loss.detach().clone()}  # megatron scales loss in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=[None] * chunks if vpp else None,
        model=model if vpp else model[0], num_microbatches=NUM_MICRO, seq_length=MICRO,
        micro_batch_size=1, forward_only=False,
    )
    grads = {i: chunk.layers[k].grad for chunk, ids in zip(model, layer_ids) for k, i in enumerate(ids)}
    destroy_parallel()
    return grads, [l["loss"] for l in losses]


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2_vpp2"])
def test_pipeline_schedule_matches_single_process(vpp):
    twin_grads, twin_loss = _twin_pipeline_grads()
    results = run_distributed(2, _pipeline_worker, vpp)
    grads = {}
    for rank_grads, _ in results:
        grads.update(rank_grads)
    assert sorted(grads) == list(range(LAYERS))
    for i in range(LAYERS):
        torch.testing.assert_close(grads[i], twin_grads[i])
    last_rank_losses = results[-1][1]
    assert len(last_rank_losses) == NUM_MICRO
    torch.testing.assert_close(sum(last_rank_losses) / NUM_MICRO, twin_loss)


# ---------------------------------------------------------------- DDP and the distributed optimizer

DDP_IN, DDP_HIDDEN, DDP_BATCH, DDP_STEPS, LR = 6, 10, 4, 3, 0.05


def _ddp_data(world: int):
    g = torch.Generator().manual_seed(11)
    w1 = torch.randn(DDP_HIDDEN, DDP_IN, generator=g)
    w2 = torch.randn(1, DDP_HIDDEN, generator=g)
    xs = [torch.randn(world * DDP_BATCH, DDP_IN, generator=g) for _ in range(DDP_STEPS)]
    ys = [torch.randn(world * DDP_BATCH, 1, generator=g) * 10 for _ in range(DDP_STEPS)]
    return w1, w2, xs, ys


def _make_mlp(w1, w2):
    net = torch.nn.Sequential(torch.nn.Linear(DDP_IN, DDP_HIDDEN, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(DDP_HIDDEN, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(w1)
        net[2].weight.copy_(w2)
    return net


def _twin_ddp(world: int):
    w1, w2, xs, ys = _ddp_data(world)
    net = _make_mlp(w1, w2)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    norms = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)))
        opt.step()
    return [p.detach() for p in net.parameters()], norms


def _ddp_worker(rank: int, world: int, distributed_optimizer: bool, overlap: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world), seed=5)
    w1, w2, xs, ys = _ddp_data(world)
    config = TransformerConfig(num_layers=1, hidden_size=DDP_HIDDEN, num_attention_heads=1,
                               use_cpu_initialization=True)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               use_distributed_optimizer=distributed_optimizer,
                                               bucket_size=16 if overlap else None)
    model = DistributedDataParallel(config, ddp_config, _make_mlp(w1, w2))
    opt_config = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                 adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [model])
    norms = []
    local = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
    for x, y in zip(xs, ys):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        ((model(x[local]) - y[local]) ** 2).mean().backward()
        finalize_model_grads([model])
        ok, norm, _ = optimizer.step()
        assert ok
        norms.append(float(norm))
    params = [p.detach().clone() for p in model.module.parameters()]
    destroy_parallel()
    return params, norms


@pytest.mark.parametrize("distributed_optimizer,overlap", [(False, False), (True, True)],
                         ids=["ddp", "distributed_optimizer_overlap"])
def test_ddp_and_distributed_optimizer_match_single_process(distributed_optimizer, overlap):
    twin_params, twin_norms = _twin_ddp(2)
    results = run_distributed(2, _ddp_worker, distributed_optimizer, overlap)
    for params, norms in results:
        assert norms == pytest.approx(twin_norms, rel=1e-5)
        assert twin_norms[0] > 1.0  # the clip really acted
        for p, q in zip(params, twin_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
