"""The pipelined-DiT shell every DiT family shares: one pipeline stage of a video diffusion
transformer on megatron-core, around the family's embedding, layers and head.

What the shell owns: the stage (``pre_process`` holds the embeddings, ``post_process`` the head,
``blocks`` the layers ``layer_offset ..``), this rank's token shard under context and sequence
parallelism (the sequence padded to a multiple of CP x (SP: TP) x the family's own multiple, a
contiguous CP shard, the TP slice between layers under SP), activation recompute of the layers
(``--recompute-granularity full`` with megatron's ``uniform`` / ``block`` methods here; the family's
layers honour ``selective``, and under ``block`` the selective modules of the layers not recomputed
whole: ``layer_config``), the message between stages (``pipeline.MessageSpec``; the
``carry`` rides to the last stage), and at the head the SP gather, the CP ``gather_sequence`` and
unpatchify. Activations are ``[s, b, h]``; a video latent ``[b, c, f, h, w]`` becomes
``s = f/pt * h/ph * w/pw`` tokens in (frame, row, column) order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch.utils._pytree import tree_flatten, tree_unflatten

from mm.models.predictor.common import MEGATRON_DEFAULT_MODULES, selective_recompute_modules
from mm.models.predictor.pipeline import Hidden, Ints, MessageSpec, PerSample
from mm.parallel.context_parallel import gather_sequence
from mm.parallel.dynamic_cp import context_parallel_size

RECOMPUTE_METHODS = ("uniform", "block")


class PipelinedDiT(MegatronModule):
    """One pipeline stage of a DiT: ``forward(*batch, carry=None, **batch_kwargs)``.

    The first stage embeds the batch (``embed``); a later one reads the previous stage's message
    (``set_input_tensor``, megatron-core's hook) and ignores the arguments. Every stage runs its
    layers; stages other than the last return their message, the last returns
    ``[b, out_dim, f, h, w]``. ``carry`` (a ``[b, ...]`` tensor of at most 5 dims, e.g. the training
    target) given to the first stage reaches the last one's ``self.carried``.

    How to subclass (a family gives its embedding, its layers' inputs and its head)::

        class MyDiT(PipelinedDiT):
            display_name = "my DiT"                   # in error messages
            MESSAGE = {"time_emb": Hidden()}          # what travels besides "x", "grid" and the carry
            RECOMPUTE_MODULES = ()                    # what the layers recompute selectively

            def __init__(self, arch, config, pre_process=True, post_process=True, layer_offset=0,
                         num_layers=None):
                super().__init__(arch, config, pre_process, post_process, layer_offset, num_layers)
                if pre_process:                       # parameter names are the checkpoint's keys
                    self.patch_embedding = ...
                self.blocks = torch.nn.ModuleList(MyLayer(arch, self.layer_config(i), i) for i in self.layer_numbers)
                if post_process:
                    self.proj_out = ...

            def embed(self, latents, timestep):       # stage 0: the batch -> the state
                x = ...                               # [s, b, h], the whole sequence
                return {"x": self.shard_sequence(x), "time_emb": ..., "grid": (f, gh, gw)}

            def layer_inputs(self, state):            # each layer runs as block(x, **these)
                return {"time_emb": state["time_emb"], "valid_tokens": self.valid_tokens(...)}

            def apply_head(self, x, state):           # this rank's [s', b, out_dim * pt * ph * pw]
                return self.proj_out(x)

    ``arch`` is the family's config with ``num_layers``, ``num_heads``, ``hidden_size``,
    ``patch_size`` (t, h, w) and ``out_dim``. ``embed`` may put more in the state than ``MESSAGE``
    names, but a later stage sees only the message: ``layer_inputs`` and ``apply_head`` read message
    fields only. In ``layer_inputs``, tensors (or tuples of them, or None) are the inputs a
    recomputed group of layers saves; other values (ints) are bound to every call. Override
    ``token_multiple`` when the layers need the sequence in multiples of more than the parallel split,
    and ``weight_rule`` (the family's name table) for distributed checkpoints.
    """

    display_name = "this DiT"
    MESSAGE: dict[str, Hidden | PerSample | Ints] = {}
    RECOMPUTE_MODULES: tuple[str, ...] = ()  # a family names the ones its layers implement (common.RECOMPUTE_MODULES)
    # whether --compile-dit-blocks may compile the layers (a family turns it on once its layers are
    # known to trace without graph breaks; the entry points refuse the flag otherwise)
    COMPILES_BLOCKS = False

    def __init__(self, arch: Any, config: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_layers: int | None = None):
        super().__init__(config)
        if arch.num_heads % config.tensor_model_parallel_size:
            raise ValueError(f"predictor.num_heads = {arch.num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {config.tensor_model_parallel_size}")
        self.arch = arch
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset  # global index of blocks[0]
        count = arch.num_layers if num_layers is None else num_layers
        self.layer_numbers = range(layer_offset, layer_offset + count)  # global indices of this stage's layers
        self.recompute_modules = self._check_recompute(config)
        self._layer_config = self._rest_config(config)
        self._message = MessageSpec({"x": Hidden(), **self.MESSAGE, "grid": Ints(3), "carry": PerSample(4)})
        # what megatron-core's schedules and finalize_model_grads ask of a model
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None  # a later stage's input: the previous stage's message
        self.carried = None  # on the last stage: the tensor stage 0 passed along (``carry``)

    # ------------------------------------------------------------------ what a family gives

    def embed(self, *batch, **batch_kwargs) -> dict:
        """Stage 0: the batch -> the state: ``"x"`` (this rank's ``[s', b, h]`` token shard, from
        ``shard_sequence``), ``"grid"`` (frames, rows, columns of patches) and the family's
        ``MESSAGE`` fields."""
        raise NotImplementedError

    def layer_inputs(self, state: dict) -> dict:
        """The keyword arguments of every layer call besides ``x``."""
        raise NotImplementedError

    def apply_head(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """The last layer's ``[s', b, h]`` -> ``[s', b, out_dim * pt * ph * pw]`` patches (this rank's)."""
        raise NotImplementedError

    def token_multiple(self) -> int:
        """The layers' own multiple of the sequence length (on top of CP x SP's)."""
        return 1

    def weight_rule(self, name: str):
        """The family's name-table lookup of a global parameter name (``NameTable.rule_for``)."""
        raise NotImplementedError(f"{type(self).__name__} has no weight name table: no distributed checkpoints")

    # ------------------------------------------------------------------ sequence layout

    def split_multiple(self) -> int:
        """The sequence is padded to a multiple of this: CP x (under SP) TP x ``token_multiple()``."""
        cfg = self.config
        tp = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        return context_parallel_size(cfg.context_parallel_size) * tp * self.token_multiple()

    def padded_tokens(self, tokens: int) -> int:
        """The padded length of a ``tokens``-long sequence."""
        m = self.split_multiple()
        return -(-tokens // m) * m

    def valid_tokens(self, tokens: int) -> int | None:
        """``tokens`` when padding was added (padded keys take no part in attention), else None."""
        return tokens if self.padded_tokens(tokens) != tokens else None

    def shard_tokens(self, t: torch.Tensor, tp_slice: bool) -> torch.Tensor:
        """This rank's tokens of a whole-sequence ``[s, ...]`` tensor: the sequence padded to
        ``split_multiple()``, this rank's CP shard of it, and (``tp_slice``) its TP slice of that.

        Plain slicing: each rank's gradient covers its own tokens; parameters behind the tensor get
        partial gradients, summed by DDP over CP and (for ``sequence_parallel`` ones) over TP."""
        cfg = self.config
        pad = self.padded_tokens(t.shape[0]) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)
        cp = context_parallel_size(cfg.context_parallel_size)
        if cp > 1:
            t = t.chunk(cp)[mpu.get_context_parallel_rank()]
        if tp_slice and cfg.tensor_model_parallel_size > 1:
            t = t.chunk(cfg.tensor_model_parallel_size)[mpu.get_tensor_model_parallel_rank()]
        return t

    def shard_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded ``[s, b, h]`` sequence -> this rank's part between the layers: its CP shard
        (padded; padded outputs are dropped at the end), under SP scattered over TP ranks."""
        x = self.shard_tokens(x, tp_slice=False)
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    # ------------------------------------------------------------------ the stage

    def _check_recompute(self, config: TransformerConfig) -> set[str]:
        if config.recompute_granularity == "full" and (config.recompute_method not in RECOMPUTE_METHODS
                                                       or not config.recompute_num_layers
                                                       or config.recompute_num_layers < 1):
            raise ValueError(f"--recompute-granularity full with --recompute-method {config.recompute_method} "
                             f"--recompute-num-layers {config.recompute_num_layers}: needs a method of "
                             f"{' or '.join(RECOMPUTE_METHODS)} and a number of layers >= 1")
        return selective_recompute_modules(self._rest_config(config), self.display_name, self.RECOMPUTE_MODULES)

    @staticmethod
    def _rest_config(config: TransformerConfig) -> TransformerConfig:
        """Under ``--recompute-granularity full --recompute-method block`` with ``--recompute-modules``:
        the config of the layers after the first ``recompute_num_layers`` (selective, those modules);
        otherwise ``config`` itself."""
        if (config.recompute_granularity != "full" or config.recompute_method != "block"
                or list(config.recompute_modules or ()) in ([], MEGATRON_DEFAULT_MODULES)):
            return config
        return dataclasses.replace(config, recompute_granularity="selective", recompute_method=None,
                                   recompute_num_layers=None)

    def layer_config(self, layer_number: int) -> TransformerConfig:
        """The config this stage's layer ``layer_number`` (global index) is built with: the stage's,
        except under ``--recompute-granularity full --recompute-method block`` with
        ``--recompute-modules``, where the first ``recompute_num_layers`` layers of the stage are
        recomputed whole (``_run_blocks``) and the others recompute those modules selectively, so that
        a run fills the memory left by the whole-layer recompute with cheaper op-level recompute (as
        MindSpeed combines its activation-function recompute with block recompute: no layer does
        both). ``core_attn`` alone is megatron-core's default ``recompute_modules``, which it ignores
        under ``full``: it stays ignored here (the flags refuse it with ``block``)."""
        cfg = self.config
        if cfg.recompute_granularity == "full" and layer_number - self.layer_offset < (cfg.recompute_num_layers or 0):
            return cfg  # recomputed whole; its own selective recompute stays off
        return self._layer_config

    def compile_blocks(self, **options) -> None:
        """Regional compilation (``--compile-dit-blocks``): ``torch.compile`` each layer in place, so
        that its elementwise work fuses into few kernels. The layers share one compiled graph (same
        code, parameters as inputs); parameter names and the state dict are unchanged. Embeddings,
        head and the full-recompute wrappers stay eager. Layers whose Python attributes differ (e.g.
        Open-Sora-Plan's sparse patterns) get a graph each, per mode and input kind: dynamo's
        recompile limit is raised so that none of them silently falls back to eager."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            block.compile(**options)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core distributed-checkpoint view of this stage's weights, in layout-independent
        (TP/PP/VPP-free) global names and shapes; see ``sharding.py``."""
        from mm.models.predictor.sharding import layout_free_sharded_state_dict

        return layout_free_sharded_state_dict(self, self.weight_rule, prefix, sharded_offsets, metadata)

    def set_input_tensor(self, tensor) -> None:
        """megatron-core's pipeline hook: a later stage's input (stage 0's input is the batch)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def _run_blocks(self, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training:
            for block in self.blocks:
                x = block(x, **inputs)
            return x
        # megatron's methods: "uniform" checkpoints groups of recompute_num_layers layers,
        # "block" checkpoints the first recompute_num_layers layers one by one
        n, chunk = len(self.blocks), cfg.recompute_num_layers
        start = 0
        while start < n:
            end = min(start + chunk, n) if cfg.recompute_method == "uniform" else start + 1
            if cfg.recompute_method == "uniform" or start < chunk:
                x = self._checkpointed(self.blocks[start:end], x, inputs)
            else:
                x = self.blocks[start](x, **inputs)
            start = end
        return x

    @staticmethod
    def _checkpointed(blocks, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``blocks`` run on ``x`` keeping only their inputs; the tensors among ``inputs`` pass
        through megatron's checkpoint (which saves tensors only), the rest is bound."""
        leaves, spec = tree_flatten(inputs)
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        if torch.is_grad_enabled() and not x.requires_grad and \
                any(p.requires_grad for block in blocks for p in block.parameters()):
            # frozen embeddings (LoRA): megatron's checkpoint, a reentrant autograd Function, gives an output that
            # needs gradients only when an input does, so the backward would never reach the blocks' trainable
            # parameters (what MindSpeed-MM's --lora-register-forward-hook on the patch embedding is for)
            x = x.detach().requires_grad_()

        def run(x_, *tensors):
            filled = list(leaves)
            for i, t in zip(where, tensors):
                filled[i] = t
            kwargs = tree_unflatten(filled, spec)
            for block in blocks:
                x_ = block(x_, **kwargs)
            return x_

        return tensor_parallel.checkpoint(run, False, x, *(leaves[i] for i in where))

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """This rank's ``[s', b, out * pt * ph * pw]`` -> the whole ``[b, out, f * pt, gh * ph, gw * pw]``."""
        cfg = self.config
        if cfg.sequence_parallel:
            # the unpatchified output is used whole on every TP rank: backward keeps this rank's slice
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        if context_parallel_size(cfg.context_parallel_size) > 1:
            x = gather_sequence(x, mpu.get_context_parallel_group())
        f, gh, gw = grid
        b, out = x.shape[1], self.arch.out_dim
        pt, ph, pw = self.arch.patch_size
        x = x[:math.prod(grid)].transpose(0, 1).reshape(b, f, gh, gw, pt, ph, pw, out)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, out, f * pt, gh * ph, gw * pw)

    def forward(self, *batch, carry: torch.Tensor | None = None, **batch_kwargs) -> torch.Tensor:
        """``batch``: ``embed``'s arguments (first stage only). Returns the message (stages before
        the last) or the prediction ``[b, out_dim, f, h, w]`` (the last)."""
        if self.pre_process:
            state = dict(self.embed(*batch, **batch_kwargs), carry=carry)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a later pipeline stage ran without its input (set_input_tensor)")
            state = self._message.unpack(self.input_tensor)
        x = self._run_blocks(state["x"], self.layer_inputs(state))
        if not self.post_process:
            return self._message.pack(dict(state, x=x), self.arch.hidden_size,
                                      self.config.pipeline_dtype or x.dtype)
        self.carried = state["carry"]
        return self._unpatchify(self.apply_head(x, state), state["grid"])
