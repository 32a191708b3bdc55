"""The layouts mm-plan considers: every TP x CP x PP (x VPP) x DP split of the ranks, with each context-
parallel algorithm, kept only where the training entry points accept it. Acceptance is the entry
points' own validation (``config_from_args``: flags, JSONs, parallel sizes, batch, recompute; then the
training check of the family and task, ``check_task``), run for each candidate's flags; nothing here
restates a rule."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from mm.arguments import ConfigError, RunConfig, config_from_args, parse_flags
from mm.runtime import model_json_reader
from mm.arguments.json_configs import load_json
from mm.training.checks import check_task

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    vpp: int | None = None
    cp_algo: str | None = None      # None without context parallelism
    ulysses: int | None = None      # the Ulysses degree inside CP (hybrid)
    # predictor.pipeline_num_layers to write into the model JSON (PP where the JSON gives none: even)
    pipeline_num_layers: tuple[tuple[int, ...], ...] | None = None

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def flags(self) -> list[str]:
        """The training flags of this layout (sequence parallelism with TP; the distributed optimizer
        wherever gradients are reduced over more than one rank)."""
        out = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
               "--context-parallel-size", str(self.cp)]
        if self.tp > 1:
            out.append("--sequence-parallel")
        if self.vpp is not None:
            out += ["--virtual-pipeline-model-parallel-size", str(self.vpp)]
        if self.cp_algo is not None:
            out += ["--context-parallel-algo", self.cp_algo]
        if self.ulysses is not None:
            out += ["--ulysses-degree-in-cp", str(self.ulysses)]
        if self.dp * self.cp > 1:
            out.append("--use-distributed-optimizer")
        return out

    def model_edit(self) -> str | None:
        """The model JSON edit this layout needs, as a line for the user; None when it needs none."""
        if self.pipeline_num_layers is None:
            return None
        rows = [list(row) for row in self.pipeline_num_layers]
        return f"predictor.pipeline_num_layers = {rows if self.vpp else rows[0]}"

    def argv(self, base_argv: Sequence[str], workdir: Path) -> list[str]:
        """The training command line: ``base_argv`` with this layout's flags, and, where the layout
        needs a model JSON edit, ``--mm-model`` naming an edited copy written under ``workdir``."""
        argv = list(base_argv)
        if self.pipeline_num_layers is not None:
            at = argv.index("--mm-model") + 1
            model = load_json(argv[at], "--mm-model")
            rows = [list(row) for row in self.pipeline_num_layers]
            model["predictor"]["pipeline_num_layers"] = rows if self.vpp else rows[0]
            path = Path(workdir) / f"model_pp{self.pp}_vpp{self.vpp or 1}.json"
            path.write_text(json.dumps(model, indent=2))
            argv[at] = str(path)
        return [*argv, *self.flags()]

    def describe(self) -> str:
        cp = f"CP{self.cp}" + (f" ({self.cp_algo.split('_')[0]}" + (f", ulysses {self.ulysses}" if self.ulysses else "")
                               + ")" if self.cp_algo else "")
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return f"TP{self.tp}{' SP' if self.tp > 1 else ''} {cp} PP{self.pp}{vpp} DP{self.dp}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(world: int, num_layers: int, max_tp: int | None = None,
                      even_pipeline: bool = False) -> Iterator[Layout]:
    """Every split of ``world`` ranks: TP up to ``max_tp`` (one node's GPUs: TP's per-layer collectives
    stay inside a node), PP with the virtual-pipeline sizes that divide the layers, each CP algorithm
    (hybrid with each proper Ulysses degree). ``even_pipeline``: PP layouts carry the even split of the
    layers as their ``pipeline_num_layers`` (for a model JSON that gives none)."""
    for tp in _divisors(world):
        if max_tp is not None and tp > max_tp:
            continue
        for pp in _divisors(world // tp):
            vpps = [None] + ([v for v in range(2, num_layers // pp + 1) if num_layers % (pp * v) == 0] if pp > 1 else [])
            for cp in _divisors(world // (tp * pp)):
                dp = world // (tp * pp * cp)
                algos = [(None, None)] if cp == 1 else (
                    [("ulysses_cp_algo", None), ("megatron_cp_algo", None)]
                    + [("hybrid_cp_algo", u) for u in _divisors(cp) if 1 < u < cp])
                for vpp in vpps:
                    split = None
                    if even_pipeline and pp > 1 and num_layers % (pp * (vpp or 1)) == 0:
                        split = tuple((num_layers // (pp * (vpp or 1)),) * pp for _ in range(vpp or 1))
                    for algo, ulysses in algos:
                        yield Layout(tp=tp, cp=cp, pp=pp, dp=dp, vpp=vpp, cp_algo=algo, ulysses=ulysses,
                                     pipeline_num_layers=split)


def layout_config(base_argv: Sequence[str], layout: Layout, workdir: Path, task: str = "t2v") -> RunConfig:
    """The run configuration of ``base_argv`` (the training flags without a layout) with ``layout``'s
    flags (``Layout.argv``), checked as ``pretrain_t2v.py`` / ``pretrain_i2v.py`` check it before
    starting, except for files: neither the data files nor the weights and tokenizers the JSONs name are
    looked at (a plan needs none of them). Raises ConfigError listing the problems."""
    config = config_from_args(parse_flags(layout.argv(base_argv, workdir)), layout.world, mode="train",
                              expand=model_json_reader())
    check_task(task, config, files=False, weights=False)
    return config


def valid_layouts(base_argv: Sequence[str], world: int, num_layers: int, task: str = "t2v",
                  max_tp: int | None = None, workdir: Path | None = None
                  ) -> tuple[list[tuple[Layout, RunConfig]], dict[Layout, list[str]]]:
    """(the accepted layouts with their configurations, the refused ones with their problems). PP
    layouts of a model JSON without ``pipeline_num_layers`` are tried with the even split, written
    into copies of the JSON under ``workdir`` (a new temporary directory when None)."""
    argv = list(base_argv)
    model = load_json(argv[argv.index("--mm-model") + 1], "--mm-model") if "--mm-model" in argv else {}
    even = "pipeline_num_layers" not in model.get("predictor", {})
    workdir = Path(tempfile.mkdtemp(prefix="mm-plan-")) if workdir is None else Path(workdir)
    accepted, refused = [], {}
    for layout in candidate_layouts(world, num_layers, max_tp, even_pipeline=even):
        try:
            accepted.append((layout, layout_config(argv, layout, workdir, task)))
        except ConfigError as e:
            refused[layout] = e.problems
    return accepted, refused
