"""The pipelined-DiT shell (mm/models/predictor/dit.py) with a toy family of plain layers: what a
new family writes is the subclass below. Pipeline stages, full recompute, CP and TP + SP against the
whole model on one process (fp64, outputs and gradients); selective recompute refused by name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mm.models.predictor.common import FP32LayerNorm, TwoLayerMLP, mark_sequence_parallel, sinusoidal_embedding
from mm.models.predictor.dit import PipelinedDiT
from mm.models.predictor.pipeline import Hidden
from tests.dist_helper import run_distributed


@dataclass(frozen=True)
class ToyConfig:
    num_layers: int = 3
    num_heads: int = 2
    hidden_size: int = 8
    in_dim: int = 3
    out_dim: int = 3
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 16


class ToyLayer(torch.nn.Module):
    """A token-wise block: adaLN-scaled MLP with a residual."""

    def __init__(self, toy: ToyConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = FP32LayerNorm(toy.hidden_size, elementwise_affine=False)
        self.mlp = TwoLayerMLP(toy.hidden_size, 2 * toy.hidden_size, toy.hidden_size, F.gelu, dtype)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, tokens: int) -> torch.Tensor:
        return x + self.mlp(self.norm(x) * (1 + time_emb))


class ToyDiT(PipelinedDiT):
    display_name = "the toy DiT"
    MESSAGE = {"time_emb": Hidden()}
    RECOMPUTE_MODULES = ()

    def __init__(self, toy: ToyConfig, config, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(toy, config, pre_process, post_process, layer_offset, num_layers)
        dtype, h = config.params_dtype, toy.hidden_size
        self.patch_embedding = self.time_embedder = self.proj_out = None
        if pre_process:
            self.patch_embedding = torch.nn.Conv3d(toy.in_dim, h, toy.patch_size, toy.patch_size, dtype=dtype)
            self.time_embedder = TwoLayerMLP(toy.freq_dim, h, h, F.silu, dtype)
        self.blocks = torch.nn.ModuleList(ToyLayer(toy, dtype) for _ in self.layer_numbers)
        if post_process:
            self.proj_out = torch.nn.Linear(h, toy.out_dim * math.prod(toy.patch_size), dtype=dtype)
        for part in (self.time_embedder, self.blocks, self.proj_out):  # used on token shards under SP
            if part is not None:
                mark_sequence_parallel(part, config.sequence_parallel)

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor) -> dict:
        x = self.patch_embedding(latents)  # [b, h, f, gh, gw]
        grid = tuple(x.shape[2:])
        time_emb = self.time_embedder(sinusoidal_embedding(timestep, self.arch.freq_dim).to(x.dtype))[None]
        return {"x": self.shard_sequence(x.flatten(2).permute(2, 0, 1)), "time_emb": time_emb, "grid": grid}

    def layer_inputs(self, state: dict) -> dict:
        return {"time_emb": state["time_emb"], "tokens": math.prod(state["grid"])}

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.proj_out(x)


def _config(toy, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=toy.num_layers, hidden_size=toy.hidden_size, num_attention_heads=toy.num_heads,
                             params_dtype=torch.float64, pipeline_dtype=torch.float64, use_cpu_initialization=True,
                             **extra)


def _inputs(requires_grad: bool = True):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 3, 2, 6, generator=g, dtype=torch.float64)  # 9 tokens: padded for CP / SP
    return latents.requires_grad_(requires_grad), torch.tensor([37.0, 912.0])


def _step(model_or_stages, carry=None):
    """Forward (the stages chained through their messages) and backward with a fixed probe."""
    stages = model_or_stages if isinstance(model_or_stages, list) else [model_or_stages]
    latents, timestep = _inputs()
    out = stages[0](latents, timestep, carry=carry)
    for stage in stages[1:]:
        stage.set_input_tensor(out)
        out = stage()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), latents.grad


def _grads(stages):
    from mm.models.predictor.name_table import global_name

    return {global_name(n, s.layer_offset): p.grad.clone() for s in stages for n, p in s.named_parameters()}


def _single_worker(rank, world):
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    toy = ToyConfig()
    torch.manual_seed(0)
    whole = ToyDiT(toy, _config(toy))
    state = whole.state_dict()
    out, dlatents = _step(whole)
    results = {"whole": (out, dlatents, _grads([whole]))}
    stages = []
    for offset in range(3):  # three stages of one layer
        stage = ToyDiT(toy, _config(toy), pre_process=offset == 0, post_process=offset == 2, layer_offset=offset,
                       num_layers=1)
        stage.load_state_dict({k: v for k, v in _stage_state(state, offset).items() if k in stage.state_dict()})
        stages.append(stage)
    carry = torch.randn(2, 7, dtype=torch.float64)  # any [b, ...] rides along, shape and values exact
    results["stages"] = (*_step(stages, carry), _grads(stages))
    carried = stages[-1].carried
    layer_calls = {}
    for name, extra in {"uniform": dict(recompute_method="uniform", recompute_num_layers=2),
                        "block": dict(recompute_method="block", recompute_num_layers=1)}.items():
        model = ToyDiT(toy, _config(toy, recompute_granularity="full", **extra)).train()
        model.load_state_dict(state)
        layer_calls[name] = 0
        for block in model.blocks:
            block.register_forward_hook(lambda *_, name=name: layer_calls.__setitem__(name, layer_calls[name] + 1))
        results[name] = (*_step(model), _grads([model]))
    try:
        ToyDiT(toy, _config(toy, recompute_granularity="selective"))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    destroy_parallel()
    return results, torch.equal(carried, carry), layer_calls, refusal


def _stage_state(state: dict, offset: int) -> dict:
    """The whole model's state dict as the stage starting at layer ``offset`` (one layer) names it."""
    out = {}
    for k, v in state.items():
        if not k.startswith("blocks."):
            out[k] = v
        elif k.startswith(f"blocks.{offset}."):
            out["blocks.0." + k.split(".", 2)[2]] = v
    return out


def test_stages_and_full_recompute_match_the_whole_model():
    ((results, carried, layer_calls, refusal),) = run_distributed(1, _single_worker)
    ref_out, ref_dlatents, ref_grads = results.pop("whole")
    for name, (out, dlatents, grads) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(dlatents, ref_dlatents, rtol=1e-12, atol=1e-12, msg=name)
        assert set(grads) == set(ref_grads), name
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-12, atol=1e-12, msg=f"{name}: {key}")
    assert carried
    # uniform: every layer checkpointed (run twice); block 1: only the first layer
    assert layer_calls == {"uniform": 6, "block": 4}
    assert refusal.startswith("--recompute-modules core_attn: the toy DiT recomputes no module selectively")


def _parallel_worker(rank, world, layout):
    from megatron.core import parallel_state as mpu

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    tp, cp, sp = layout.get("tp", 1), layout.get("cp", 1), layout.get("sp", False)
    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, context_parallel=cp), seed=0)
    toy = ToyConfig()
    torch.manual_seed(0)
    model = ToyDiT(toy, _config(toy, tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp))
    out, dlatents = _step(model)
    # what DDP (over CP) and finalize_model_grads (over TP, sequence-parallel parameters) do
    cp_group, tp_group = mpu.get_context_parallel_group(), mpu.get_tensor_model_parallel_group()
    for p in model.parameters():
        torch.distributed.all_reduce(p.grad, group=cp_group)
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=tp_group)
    torch.distributed.all_reduce(dlatents, group=cp_group)
    grads = _grads([model])
    destroy_parallel()
    return out, dlatents, grads


@pytest.mark.parametrize("layout", [dict(cp=2), dict(tp=2, sp=True)], ids=["cp2", "tp2_sp"])
def test_context_and_sequence_parallel_match_one_process(layout):
    (ref_out, ref_dlatents, ref_grads), = run_distributed(1, _parallel_worker, {})
    for out, dlatents, grads in run_distributed(2, _parallel_worker, layout):
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dlatents, ref_dlatents, rtol=1e-12, atol=1e-12)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-12, atol=1e-12, msg=key)
