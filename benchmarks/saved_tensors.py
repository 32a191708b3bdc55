"""What a Wan DiT layer keeps for its backward: every tensor autograd saves during one training
forward, attributed to the innermost module running when it was saved, with its dtype, shape and
bytes (a storage saved twice counts once; parameters, held anyway, are left out).

    python benchmarks/saved_tensors.py --model examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json \
        --latent 21 60 104 --text-len 512 [--recompute mlp] [--compile] [--accelerator cpu]

Random weights and inputs, bf16, batch 1, one layer (the table is per layer; the embedders' and the
head's savings are listed apart). On the CPU the attention kernel is the math one, which saves other
tensors than the GPU's fused kernels (the table says which kernel ran); everything else saves what it
saves on a GPU. ``--compile``: the compiled block's saved tensors, attributed to the block.

Op-level recompute (``--recompute layernorm``) keeps its matmul and attention outputs in the
checkpoint's own cache, which saved-tensor hooks do not see; on a GPU the script therefore also
reports what the allocator holds after the forward, per layer ((held with 3 layers - with 1) / 2).
"""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import argparse
import collections
import json
from pathlib import Path

import torch

from mm.accelerator import init_distributed, select_accelerator
from mm.accelerator.attention_kernels import get_kernel
from mm.families import build_predictor, predictor_config
from mm.parallel import ParallelSizes, initialize_parallel

RECOMPUTE = {"none": {}, "mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
             "core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
             "layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
             "layernorm+mlp": dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"])}


class SavedTensors:
    """Saved-tensor hooks that record (module, dtype, shape, bytes) of each new storage saved."""

    def __init__(self, model: torch.nn.Module):
        self.stack, self.seen, self.rows = ["(outside)"], set(), []
        # parameters are held anyway: only activations count
        self.seen.update((p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters())
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._enter(name or "(model)"))
            module.register_forward_hook(self._leave)

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self.stack.append(name)
        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self.seen and storage.nbytes():
            self.seen.add(key)
            self.rows.append((self.stack[-1], str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape),
                              storage.nbytes()))
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"))
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--recompute", choices=tuple(RECOMPUTE), default="none")
    parser.add_argument("--compile", action="store_true", help="compile the block (--compile-dit-blocks)")
    parser.add_argument("--attention-kernel", default="auto")
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    from megatron.core.transformer import TransformerConfig

    acc = select_accelerator(args.accelerator)
    init_distributed(acc, 10)
    initialize_parallel(ParallelSizes(world_size=1), seed=0, attention_kernel=args.attention_kernel)
    pred = json.load(open(args.model))["predictor"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "from_pretrained", "dtype", "num_layers",
                                                         "num_heads", "pipeline_num_layers")}
    dev = acc.device()
    f, h, w = args.latent

    def build(layers: int):
        arch = predictor_config("wan_dit", params, layers, pred["num_heads"])
        config = TransformerConfig(num_layers=layers, hidden_size=arch.hidden_size,
                                   num_attention_heads=arch.num_heads, params_dtype=torch.bfloat16, bf16=True,
                                   use_cpu_initialization=args.accelerator == "cpu", **RECOMPUTE[args.recompute])
        model = build_predictor("wan_dit", arch, config).to(dev).train()
        if args.compile:
            model.compile_blocks()
        batch = (torch.randn(1, arch.in_dim, f, h, w, device=dev, dtype=torch.bfloat16), torch.tensor([500.0], device=dev),
                 torch.randn(1, args.text_len, arch.text_dim, device=dev, dtype=torch.bfloat16))
        if args.compile:  # compile outside the measured step
            model(*batch).float().mean().backward()
            model.zero_grad(set_to_none=True)
        return arch, model, batch

    held = {}
    if acc.name == "cuda":  # what the allocator holds for the backward, per layer
        for layers in (1, 3):
            _, model, batch = build(layers)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out = model(*batch)
            torch.cuda.synchronize()
            held[layers] = torch.cuda.memory_allocated() - before
            out.float().mean().backward()
            del model, batch, out
            torch.cuda.empty_cache()
    arch, model, batch = build(1)
    recorder = SavedTensors(model)
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
        out = model(*batch)
    out.float().mean().backward()

    kernel = get_kernel(args.attention_kernel, torch.bfloat16).name
    layer = [r for r in recorder.rows if r[0].startswith("blocks.0")]
    rest = [r for r in recorder.rows if not r[0].startswith("blocks.0")]
    tokens = f * h * w // (arch.patch_size[1] * arch.patch_size[2])
    print(f"{acc.name} | attention {kernel} | recompute {args.recompute}{' | compiled block' if args.compile else ''} "
          f"| {tokens} tokens, hidden {arch.hidden_size}, FFN {arch.ffn_dim}, {args.text_len} text tokens, bf16")
    print(f"\n| module (in blocks.0) | dtype | shape | MiB |\n| --- | --- | --- | --- |")
    for module, dtype, shape, nbytes in layer:
        print(f"| {module[len('blocks.0'):].lstrip('.') or '(block)'} | {dtype} | {list(shape)} | "
              f"{nbytes / 2**20:.1f} |")
    by_dtype = collections.Counter()
    for _, dtype, _, nbytes in layer:
        by_dtype[dtype] += nbytes
    print(f"\nsaved per layer: {sum(r[3] for r in layer) / 2**30:.3f} GiB in {len(layer)} tensors ("
          + ", ".join(f"{d} {b / 2**30:.3f} GiB" for d, b in by_dtype.most_common()) + "); outside the layers: "
          f"{sum(r[3] for r in rest) / 2**30:.3f} GiB in {len(rest)} tensors")
    if held:
        print(f"held by the allocator after the forward: {(held[3] - held[1]) / 2 / 2**30:.3f} GiB per layer "
              f"(1 layer: {held[1] / 2**30:.3f} GiB, 3 layers: {held[3] / 2**30:.3f} GiB)")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(
            rows=[dict(module=m, dtype=d, shape=list(s), bytes=b) for m, d, s, b in recorder.rows],
            held_per_layer=(held[3] - held[1]) / 2 if held else None), indent=1))


if __name__ == "__main__":
    main()
