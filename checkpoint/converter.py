"""The verbs every DiT converter shares (hf_to_mm, mm_to_hf, resplit); a model's converter is this
class with its family's ``NameTable`` (``mm/models/predictor/<family>/weights.py``) and versions, in
its family folder (``mm/families/wan/convert.py``, ``mm/families/opensoraplan/convert.py``);
``mm-convert`` finds them through the family registry (``FamilySpec.converter``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from checkpoint.config import ConvertConfig, ConvertError, Layout, ParallelConfig, layout_from
from checkpoint.sources import HFSource, MergedSource, Source, TorchSource, open_adapters, open_mm_source, \
    refuse_adapters
from checkpoint.writers import return_freed_memory_to_the_system, staged_target, write_hf, write_lora, write_mm
from mm.ckpt import TRACKER
from mm.models.predictor.name_table import NameTable


def _check_source_layout(source: Source, given: ParallelConfig | None) -> None:
    """``--cfg.source_parallel_config``, when given, must describe a torch-format source's own split
    (a torch_dist checkpoint has no split to speak of)."""
    if given is None or not isinstance(source, TorchSource):
        return
    recorded = source.header.pipeline_layers or []
    if given.tp_size != source.tp or (given.pp_layers and recorded and given.pp_layers != recorded):
        raise ConvertError(f"--cfg.source_parallel_config = tp_size {given.tp_size}, pp_layers {given.pp_layers}; "
                           f"{source.origin} is tp_size {source.tp}, pp_layers {recorded or 'not recorded'}")


class DiTConverter:
    """A model family's DiT weights between its HuggingFace-side release and mm checkpoints."""

    WEIGHTS: ClassVar[NameTable]
    VERSIONS: ClassVar[tuple[str, ...]]

    def __init__(self, version: str):
        if version not in self.VERSIONS:
            raise ConvertError(f"--version {version!r}; valid: {', '.join(self.VERSIONS)}")
        self.version = version
        return_freed_memory_to_the_system()

    def _summary(self, verb: str, origin: str, target: str, layout: Layout | None, nbytes: int, start: float):
        seconds = time.perf_counter() - start
        split = f" as {layout.describe()}" if layout else ""
        print(f"{verb}: {origin} -> {target}{split}: {nbytes / 2**20:.1f} MiB in {seconds:.1f} s "
              f"({nbytes / 2**20 / max(seconds, 1e-9):.1f} MiB/s)", flush=True)

    def _layout(self, source: Source, cfg: ConvertConfig) -> Layout:
        return layout_from(cfg.target_parallel_config, source.arch["num_layers"], source.arch["num_heads"],
                           "--cfg.target_parallel_config")

    def hf_to_mm(self, cfg: ConvertConfig) -> None:
        """HuggingFace-side weights (the release's directory: config.json and *.safetensors; or one
        weights file, e.g. Phantom's .pth, with --cfg.source_config) -> an mm checkpoint split for TP/PP/VPP by --cfg.target_parallel_config (tp_size, pp_layers).
        pretrain_*.py --load reads the result directly (with --no-load-optim --no-load-rng, or
        --finetune)."""
        start = time.perf_counter()
        source = HFSource(cfg.source_path, self.WEIGHTS, config=cfg.source_config)
        layout = self._layout(source, cfg)
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            nbytes = write_mm(source, layout, tmp, {"verb": "hf_to_mm", "converted_from": str(cfg.source_path),
                                                    "source_format": source.format, "version": self.version})
        self._summary("hf_to_mm", source.origin, cfg.target_path, layout, nbytes, start)

    def mm_to_hf(self, cfg: ConvertConfig) -> None:
        """An mm checkpoint (any format and split) -> the HuggingFace-side layout (config.json and
        safetensors files of at most --cfg.max_shard_size_gb); with --cfg.lora_path, a LoRA run's adapters
        (any split) merged into its weights first."""
        start = time.perf_counter()
        source = open_mm_source(cfg.source_path, self.WEIGHTS)
        refuse_adapters(source)
        _check_source_layout(source, cfg.source_parallel_config)
        if cfg.max_shard_size_gb <= 0:
            raise ConvertError(f"--cfg.max_shard_size_gb = {cfg.max_shard_size_gb}; valid: > 0")
        if cfg.lora_path is not None:
            source = MergedSource(source, open_adapters(cfg.lora_path, self.WEIGHTS), cfg.lora_scale)
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            nbytes = write_hf(source, tmp, int(cfg.max_shard_size_gb * 2**30))
        self._summary("mm_to_hf", source.origin, cfg.target_path, None, nbytes, start)

    def lora_to_hf(self, cfg: ConvertConfig) -> None:
        """A LoRA run's adapter checkpoint (its --save directory, any format and split) -> a directory
        holding pytorch_lora_weights.safetensors, the PEFT / diffusers LoRA format that diffusers'
        load_lora_weights(directory) reads (for Wan: WanPipeline's), the adapter config (rank, alpha x
        --cfg.lora_scale, target modules) in its metadata."""
        start = time.perf_counter()
        source = open_adapters(cfg.source_path, self.WEIGHTS, "--cfg.source_path")
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            nbytes = write_lora(source, tmp, cfg.lora_scale)
        self._summary("lora_to_hf", source.origin, cfg.target_path, None, nbytes, start)

    def resplit(self, cfg: ConvertConfig) -> None:
        """An mm checkpoint (any format and split) -> an mm checkpoint of another split.

        The split is --cfg.target_parallel_config (the defaults, tp_size 1 and pp_layers [], merge
        everything into one file). A release directory (config.json and *.safetensors, no tracker
        file; seed 003's resplit example passes one) is read as hf_to_mm reads it."""
        start = time.perf_counter()
        root = Path(cfg.source_path)
        if (root / "config.json").is_file() and any(root.glob("*.safetensors")) and \
                not (root / TRACKER).exists():
            source = HFSource(cfg.source_path, self.WEIGHTS)
        else:
            source = open_mm_source(cfg.source_path, self.WEIGHTS)
            refuse_adapters(source)
        _check_source_layout(source, cfg.source_parallel_config)
        layout = self._layout(source, cfg)
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            nbytes = write_mm(source, layout, tmp, {"verb": "resplit", "resplit_from": str(cfg.source_path),
                                                    "version": self.version})
        self._summary("resplit", source.origin, cfg.target_path, layout, nbytes, start)
