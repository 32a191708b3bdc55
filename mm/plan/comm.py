"""The cluster mm-plan predicts for (each GPU kind's memory, bf16 peak and interconnect) and the
communication time of a training layout, from the message sizes the model and layout give.

Interconnect: a ``Link`` is the usable bandwidth one GPU has per direction and a latency per message
step. Defaults (nominal figures of the vendors' data sheets, not measured here; ``--intra-node-gb-per-s``,
``--inter-node-gb-per-s``, ``--intra-node-latency-us``, ``--inter-node-latency-us`` override them):

- H100 / H200 (SXM): NVLink 4 inside a node, 900 GB/s per GPU both directions together, 450 GB/s per
  direction (NCCL's measured bus bandwidth on 8 GPUs is lower, about 350-380 GB/s); between nodes one
  400 Gb/s NDR InfiniBand adapter per GPU, 50 GB/s. Latency per step 2 us inside, 5 us between nodes.
- Ascend 910B (Atlas 800T A2): HCCS full mesh inside a node, 7 links of 56 GB/s per NPU (392 GB/s in
  all, taken here as both directions: 196 GB/s per direction; an assumption, no measurement); between
  nodes 200 Gb/s RoCE per NPU, 25 GB/s. Latency per step 3 us inside, 10 us between nodes.

Peak dense bf16 (the MFU's denominator, ``--peak-tflops`` overrides): H100 SXM 989 TFLOP/s, H200 989,
910B 313.

Which link a group uses: megatron-core orders ranks tp-cp-dp-pp, TP innermost (rank = tp_rank + TP x
(cp_rank + CP x (dp_rank + DP x pp_rank))); inside CP the Ulysses ranks are contiguous and the ring's
ranks stride by the Ulysses degree. Nodes hold consecutive ranks. A group any of whose instances has
ranks on two nodes runs at the inter-node figures (its slowest hop sets a ring's pace).

Time of one collective on n ranks (ring algorithms): ``steps x latency + bytes / bandwidth``, where a
rank sends ``bytes``:

- all-gather / reduce-scatter of a tensor of M bytes (whole, on every rank / before the scatter):
  (n - 1) steps, (n - 1) / n x M;
- all-to-all of a rank's L bytes (Ulysses): (n - 1) steps, (n - 1) / n x L;
- all-reduce: a reduce-scatter and an all-gather; p2p send of M bytes: 1 step, M.

Per layout, in bf16 activations (2 bytes), ``s`` the tokens of a micro-batch (micro-batch size x video
tokens), ``h`` the hidden size, ``T`` = TP, ``C`` = CP (Ulysses degree ``U``, ring ``R`` = C / U):

- TP with sequence parallelism: a DiT layer has three column-parallel linears that gather the sequence
  (self-attention q/k/v, cross-attention q, FFN-in) and three row-parallel ones that reduce-scatter it
  (the two attention outputs, FFN-out) (``mm.models.predictor.common``): forward 3 all-gathers and 3
  reduce-scatters of M = s / C x h x 2 bytes, the backward the same; recompute runs the forward's again
  (full recompute of a layer, and ``--recompute-modules layernorm``: all 6; ``mlp``: FFN-in and -out).
  Megatron's re-gather of the input for the weight gradient overlaps the data gradient's matmul and is
  not counted. TP stays inside a node.
- CP Ulysses (degree U): per layer all-to-all of q, k, v and the attention output in the forward and of
  their gradients in the backward (8), each L = s / C x h / T x 2 bytes; the forward's 4 again where a
  full recompute reruns the layer. Cross-attention reads the whole text on every rank: no CP traffic.
- CP ring (R ranks): R - 1 steps, each sending k and v (2 L) in the forward and k, v and their
  gradients (4 L) in the backward, (2 L again under full recompute), overlapped with the attention of
  the step. The compute that hides a step is taken as the layer's calibrated time (forward, backward,
  recompute) / R: exposed per layer = (R - 1) x max(0, step's comm - layer time / R). Optimistic: the
  layer's other work counts as cover too. Hybrid: the Ulysses all-to-all over U plus the ring over R
  (with the same L: after the all-to-all a rank holds U times the tokens for 1 / U of the heads).
- PP: per micro-batch, per stage and virtual chunk, the activation [s / C / T (SP), h] in bf16 is sent
  forward and its gradient backward: 2 x VPP p2p messages (each with one more latency step for the
  shape, mm's pipelines exchange shapes). The text context and time embedding that ride along are not
  counted. The bubble is ``estimate``'s.
- DP (the DP x CP group, where megatron reduces gradients): with the distributed optimizer a
  reduce-scatter of the stage's fp32 gradient buffer and an all-gather of its bf16 parameter buffer
  (``mm.plan.memory``'s exact sizes) once per iteration, one collective per bucket; without it an
  all-reduce of the gradients. Exposed: all of it, except with ``--overlap-grad-reduce``: megatron's
  buckets reduce while the backward goes on, so stage 0 exposes its last bucket's reduce-scatter only,
  and a later stage s (one bucket) has s pipeline steps' backward (2/3 of a micro-batch's time each)
  of stage 0 to hide behind. mm's DDP does not overlap the parameter all-gather (its DDP settings pass
  no ``overlap_param_gather``): always exposed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

BF16 = 2
SP_GATHERS_PER_LAYER = 3  # all-gathers (and as many reduce-scatters) of a DiT layer's forward under SP
ULYSSES_TENSORS = 4       # q, k, v, output
BACKWARD_SHARE = 2 / 3    # of a micro-batch's forward + backward time, the backward's (3x forward FLOPs)


@dataclass(frozen=True)
class Link:
    """One GPU's usable bandwidth per direction (GB/s, 1e9 bytes) and latency per message step."""

    gb_per_s: float
    latency_us: float

    def seconds(self, sent_bytes: float, steps: float) -> float:
        return steps * self.latency_us * 1e-6 + sent_bytes / (self.gb_per_s * 1e9)

    def collective(self, tensor_bytes: float, n: int) -> float:
        """An all-gather, reduce-scatter or all-to-all on ``n`` ranks: (n - 1) steps, (n - 1) / n of
        ``tensor_bytes`` sent (the whole tensor; for an all-to-all the rank's local part)."""
        return 0.0 if n <= 1 else self.seconds((n - 1) / n * tensor_bytes, n - 1)


@dataclass(frozen=True)
class GpuKind:
    memory_mib: int        # one card, as the driver reports it
    peak_tflops: float     # dense bf16
    intra: Link            # inside a node
    inter: Link            # between nodes


GPU_KINDS = {
    "h100": GpuKind(81559, 989.0, Link(450.0, 2.0), Link(50.0, 5.0)),
    "h200": GpuKind(143771, 989.0, Link(450.0, 2.0), Link(50.0, 5.0)),
    "910b": GpuKind(65536, 313.0, Link(196.0, 3.0), Link(25.0, 10.0)),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link
    peak_tflops: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, shape: "Shape", group: str) -> Link:
        return self.inter if shape.spans_nodes(group, self.gpus_per_node) else self.intra


@dataclass(frozen=True)
class Shape:
    """A layout's degrees in megatron's rank order: TP, Ulysses (inside CP), ring (inside CP), DP, PP."""

    tp: int
    ulysses: int
    ring: int
    dp: int
    pp: int

    # the coordinates each group varies (the others fixed)
    GROUPS = {"tp": ("tp",), "ulysses": ("ulysses",), "ring": ("ring",), "dp_cp": ("ulysses", "ring", "dp"),
              "pp": ("pp",)}

    @classmethod
    def of(cls, sizes) -> "Shape":
        """From ``ParallelSizes`` (``ulysses_degree``: the Ulysses part of CP; 1 for the ring algorithm)."""
        cp, u = sizes.context_parallel, sizes.ulysses_degree
        return cls(sizes.tensor_parallel, u, cp // u, sizes.data_parallel, sizes.pipeline_parallel)

    def spans_nodes(self, group: str, gpus_per_node: int) -> bool:
        """Whether some instance of ``group`` has ranks on two nodes of ``gpus_per_node`` ranks."""
        names = ("tp", "ulysses", "ring", "dp", "pp")
        dims = dict(zip(names, (self.tp, self.ulysses, self.ring, self.dp, self.pp)))
        varied = self.GROUPS[group]
        nodes: dict[tuple, set[int]] = {}
        for coords in itertools.product(*(range(dims[n]) for n in names)):
            rank, stride = 0, 1
            for name, c in zip(names, coords):
                rank += c * stride
                stride *= dims[name]
            key = tuple(c for name, c in zip(names, coords) if name not in varied)
            nodes.setdefault(key, set()).add(rank // gpus_per_node)
        return any(len(v) > 1 for v in nodes.values())


@dataclass(frozen=True)
class LayerComm:
    """Exposed communication seconds of one layer's forward + backward (+ recompute), one micro-batch."""

    tp: float
    cp: float


def recomputed_forwards(args, layers: int) -> tuple[float, float]:
    """(the share of a layer's forward TP collectives, of its CP collectives) that recompute runs again:
    full recompute reruns whole layers (uniform: every layer; block: ``--recompute-num-layers`` of the
    stage's ``layers``), ``layernorm`` op-level recompute a layer's 6 TP collectives, ``mlp`` the FFN's 2."""
    granularity, modules = args.recompute_granularity, set(args.recompute_modules or ())
    full = 0.0
    if granularity == "full":
        full = 1.0 if args.recompute_method != "block" else min(args.recompute_num_layers or 0, layers) / max(layers, 1)
    selective = set()
    if granularity == "selective" or (granularity == "full" and args.recompute_method == "block"):
        selective = modules
    per_module = 1.0 if "layernorm" in selective else (2 / (2 * SP_GATHERS_PER_LAYER) if "mlp" in selective else 0.0)
    return full + (1 - full) * per_module, full


def layer_comm(cluster: Cluster, shape: Shape, tokens: float, hidden: int, layer_seconds: float,
               args, layers: int) -> LayerComm:
    """One layer's exposed TP and CP seconds for ``tokens`` tokens of a micro-batch (all of its samples,
    before CP splits them) and ``layer_seconds`` of calibrated compute at the rank's share."""
    tp_rerun, cp_rerun = recomputed_forwards(args, layers)
    cp = shape.ulysses * shape.ring
    tp_s = 0.0
    if shape.tp > 1:
        full = tokens / cp * hidden * BF16  # the gathered activation of a CP rank
        one = cluster.link(shape, "tp").collective(full, shape.tp)
        tp_s = (2 + tp_rerun) * 2 * SP_GATHERS_PER_LAYER * one
    local = tokens / cp * hidden / shape.tp * BF16  # a rank's q (or k, v, output)
    cp_s = 0.0
    if shape.ulysses > 1:
        one = cluster.link(shape, "ulysses").collective(local, shape.ulysses)
        cp_s += (2 + cp_rerun) * ULYSSES_TENSORS * one
    if shape.ring > 1:
        link = cluster.link(shape, "ring")
        step = link.seconds((2 + 4 + 2 * cp_rerun) * local, 2 + cp_rerun)
        cp_s += (shape.ring - 1) * max(0.0, step - layer_seconds / shape.ring)
    return LayerComm(tp_s, cp_s)


def pp_seconds(cluster: Cluster, shape: Shape, tokens: float, hidden: int, vpp: int | None) -> float:
    """Exposed p2p seconds of one micro-batch on one stage: its activation forward and its gradient
    backward per virtual chunk (each message preceded by its shape)."""
    if shape.pp <= 1:
        return 0.0
    message = tokens / (shape.ulysses * shape.ring) / shape.tp * hidden * BF16
    return 2 * (vpp or 1) * cluster.link(shape, "pp").seconds(message, 2)


def dp_seconds(cluster: Cluster, shape: Shape, grads: float, params: float, buckets: int, distributed: bool,
               overlap_grad_reduce: bool, stage: int, step_seconds: float) -> float:
    """Exposed seconds of a stage's gradient reduction (and parameter all-gather) over DP x CP, once per
    iteration: ``grads`` / ``params`` the stage's fp32 gradient / bf16 parameter buffer bytes of a
    rank, in ``buckets`` buckets; ``step_seconds`` a micro-batch's time on a stage (the cover of a later
    stage's reduction under ``overlap_grad_reduce``)."""
    n = shape.ulysses * shape.ring * shape.dp
    if n <= 1:
        return 0.0
    link = cluster.link(shape, "dp_cp")

    def reduce(size: float, count: int) -> float:  # a reduce-scatter (all-reduce: twice) in ``count`` buckets
        return (1 if distributed else 2) * (link.collective(size, n) + (count - 1) * (n - 1) * link.latency_us * 1e-6)

    if not overlap_grad_reduce:
        exposed = reduce(grads, buckets)
    elif stage == 0:
        exposed = reduce(grads / buckets, 1)
    else:
        exposed = max(0.0, reduce(grads, 1) - stage * BACKWARD_SHARE * step_seconds)
    return exposed + (link.collective(params, n) if distributed else 0.0)
