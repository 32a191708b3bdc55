"""mm-convert's ``--cfg.*`` options and the parallel layout they describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from mm.arguments.pipeline_layout import pipeline_rows
from mm.models.predictor.pipeline import stage_span


class ConvertError(ValueError):
    """Bad input to mm-convert: the message names the option or file, the value and what is valid."""


class SourceDataError(RuntimeError):
    """A source file that is not what its own header says (truncated, corrupt): the message names
    the file and, where there is one, the tensor."""


@dataclass
class ParallelConfig:
    """How a DiT checkpoint is split.

    Args:
        tp_size: tensor-parallel ranks.
        pp_layers: layers per pipeline stage: [] no pipelining, [8, 8, 8, 8] four stages,
            [[4, 4, 4, 4], [4, 4, 4, 4]] four stages with two virtual chunks each (row = chunk).
    """

    tp_size: int = 1
    pp_layers: Union[list[int], list[list[int]]] = field(default_factory=list)


@dataclass
class ConvertConfig:
    """What to convert, and where to.

    Args:
        source_path: the weights to read: a release's DiT directory (hf_to_mm: config.json and
            *.safetensors, e.g. diffusers or original Wan) or one weights file (a .safetensors, or a
            .pth state dict such as Phantom-Wan-1.3B.pth), an mm checkpoint directory (resplit,
            mm_to_hf: the one holding latest_checkpointed_iteration.txt), a released VAE checkpoint
            file (vae_convert: Wan2.1_VAE.pth, Wan2.2_VAE.pth, Open-Sora-Plan's merged.ckpt), or one
            of Wan's encoder release files (t5_convert, clip_convert).
        target_path: where to write (a directory; OpenSoraPlan's vae_convert: a file); it must not
            exist unless overwrite is true.
        target_parallel_config: the split to write (hf_to_mm, resplit).
        source_parallel_config: the split of an mm source; read from the checkpoint, checked when given.
        source_config: hf_to_mm from one weights file: the release's config.json (default: the one
            beside the file; for Phantom's .pth, the Wan2.1 base model's).
        overwrite: replace an existing target_path.
        max_shard_size_gb: mm_to_hf's size of one safetensors file.
        lora_path: mm_to_hf: a LoRA run's adapter checkpoint (its --save directory) to merge into the
            source's weights (W + lora_scale x alpha / r x B A) before writing them.
        lora_scale: the adapters' strength where they are merged (mm_to_hf) or written (lora_to_hf, as
            their alpha); 1 is as trained.
    """

    source_path: str
    target_path: str
    target_parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    source_parallel_config: Optional[ParallelConfig] = None
    source_config: Optional[str] = None
    overwrite: bool = False
    max_shard_size_gb: float = 5.0
    lora_path: Optional[str] = None
    lora_scale: float = 1.0


@dataclass(frozen=True)
class Layout:
    """A concrete split: ``rows[chunk][stage]`` layers (megatron's virtual-pipeline order)."""

    tp: int
    rows: tuple[tuple[int, ...], ...]

    @property
    def pp(self) -> int:
        return len(self.rows[0])

    @property
    def vpp(self) -> int | None:
        return len(self.rows) if len(self.rows) > 1 else None

    @property
    def num_layers(self) -> int:
        return sum(map(sum, self.rows))

    def span(self, stage: int, chunk: int) -> tuple[int, int]:
        """(global index of the first layer, number of layers) of ``chunk`` on ``stage``."""
        return stage_span([list(r) for r in self.rows], stage, chunk)

    def holds_embedders(self, stage: int, chunk: int) -> bool:
        return stage == 0 and chunk == 0

    def holds_head(self, stage: int, chunk: int) -> bool:
        return stage == self.pp - 1 and chunk == len(self.rows) - 1

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp}{f' VPP{self.vpp}' if self.vpp else ''} layers {[list(r) for r in self.rows]}"

    def as_pp_layers(self) -> list:
        rows = [list(r) for r in self.rows]
        return rows[0] if len(rows) == 1 else rows


def layout_from(config: ParallelConfig, num_layers: int, num_heads: int, option: str) -> Layout:
    """The layout a ``ParallelConfig`` asks for on a model of ``num_layers`` / ``num_heads``;
    ``option`` (e.g. ``--cfg.target_parallel_config``) names it in errors."""
    tp, pp_layers = config.tp_size, config.pp_layers
    if not isinstance(tp, int) or tp < 1:
        raise ConvertError(f"{option}.tp_size = {tp!r}; valid: an integer >= 1")
    if num_heads % tp:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ConvertError(f"{option}.tp_size = {tp} does not divide the model's {num_heads} attention heads; "
                           f"valid: {divisors}")
    if not pp_layers:
        return Layout(tp, ((num_layers,),))
    try:
        rows = pipeline_rows(pp_layers, least=1)
    except ValueError as e:
        raise ConvertError(f"{option}.pp_layers = {pp_layers}: {e}; or [] for no pipelining") from None
    if len(rows) > 1 and len(rows[0]) < 2:
        raise ConvertError(f"{option}.pp_layers = {pp_layers}: virtual pipeline chunks need at least 2 stages (a row "
                           "per chunk, a column per stage, e.g. [[1, 1], [1, 1]] for PP2 x VPP2)")
    total = sum(map(sum, rows))
    if total != num_layers:
        raise ConvertError(f"{option}.pp_layers = {pp_layers} sums to {total} layers; the model has {num_layers}")
    return Layout(tp, tuple(tuple(r) for r in rows))
