"""Megatron-style command-line flags, with the names Megatron-LM and MindSpeed-MM users know.

Unknown flags are an error (not ignored), and abbreviations are not accepted: a misspelt flag in a
launch script must stop the run before it starts, not silently fall back to a default.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from mm.accelerator.attention_kernels import KERNEL_CHOICES
from mm.accelerator.device import ACCELERATOR_CHOICES
from mm.arguments.errors import ConfigError

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # what DiT layers can recompute (mm.models.predictor.common)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we raise instead
        raise ConfigError(f"{message} (run with --help for the list of flags)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_minutes(text: str) -> int | float:
    """Minutes > 0; whole minutes come back as an int, fractions (0.5 = 30 s) as a float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of minutes > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of minutes > 0, got {text}")
    return int(value) if value.is_integer() else value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=_positive_int, default=None,
                   help="model chunks per pipeline stage; 1 or unset means no interleaving")
    g.add_argument("--context-parallel-size", type=_positive_int, default=1)
    g.add_argument("--context-parallel-algo", choices=CP_ALGOS, default="ulysses_cp_algo")
    g.add_argument("--ulysses-degree-in-cp", type=_positive_int, default=None,
                   help="Ulysses part of CP for hybrid_cp_algo; CP / this is the ring part")
    g.add_argument("--cp-window-size", type=_positive_int, default=1,
                   help="> 1: double-ring attention with inner rings of this many ranks")
    g.add_argument("--use-cp-send-recv-overlap", action="store_true")
    g.add_argument("--attention-kernel", choices=KERNEL_CHOICES, default="auto",
                   help="attention kernel of the DiT's attention (without CP: torch's SDPA unless the kernel "
                        "is one SDPA cannot reach, flash3); auto: the fastest on this device")
    g.add_argument("--attention-mask-type", choices=("general", "causal"), default="general")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--variable-seq-lengths", action="store_true",
                   help="pipeline stages exchange tensor shapes each micro-batch (dynamic resolution)")
    g.add_argument("--use-multiparameter-pipeline-model-parallel", action="store_true",
                   help="pipeline stages pass several tensors (hidden states and conditioning)")
    g.add_argument("--optimization-level", type=int, choices=(0, 1, 2), default=2,
                   help="accepted for MindSpeed-MM scripts; mm applies the same code at every level")
    g.add_argument("--distributed-backend", choices=("nccl", "hccl", "gloo"), default=None,
                   help="default: the accelerator's (nccl on GPUs, hccl on NPUs, gloo on CPUs)")
    g.add_argument("--distributed-timeout-minutes", type=_positive_minutes, default=10,
                   help="how long any collective or point-to-point operation of any process group may wait for "
                        "its peers before it fails (fractions allowed: 0.5 is 30 s)")
    g.add_argument("--accelerator", choices=ACCELERATOR_CHOICES, default=None,
                   help="default: MM_ACCELERATOR from the environment, else auto")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="accepted from older launchers; LOCAL_RANK from the environment decides")


def _training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=_positive_int, default=1)
    g.add_argument("--global-batch-size", type=_positive_int, default=None,
                   help="default: micro-batch-size x data-parallel size")
    g.add_argument("--train-iters", type=_positive_int, default=None)
    g.add_argument("--eval-interval", type=_positive_int, default=None)
    g.add_argument("--eval-iters", type=_non_negative_int, default=0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--num-workers", type=_non_negative_int, default=2)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--allow-tf32", action="store_true")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=_positive_int, default=None)
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="with --recompute-granularity selective (or full with --recompute-method block: in the "
                        "layers after the first --recompute-num-layers): what each DiT layer recomputes in the backward "
                        "(core_attn: the attention kernels; mlp: the FFN with its adaLN input norm; layernorm: the "
                        "norms with all else that is not a matmul or attention kernel (adaLN modulation, RoPE, GELU, "
                        "residuals), from the saved matmul and attention outputs); default core_attn")
    g.add_argument("--compile-dit-blocks", action="store_true",
                   help="torch.compile each DiT layer (regional compilation: fused adaLN/norm/RoPE/GELU kernels)")
    g.add_argument("--exit-on-nan-loss", action="store_true",
                   help="stop at the first NaN/Inf loss; default: skip that step (no update) and count it")
    g.add_argument("--max-consecutive-skipped-iterations", type=_non_negative_int, default=10,
                   help="stop with an error (exit code 1) after this many iterations in a row skipped without an "
                        "update (NaN/Inf loss; with --fp16 also overflows the loss scale can no longer absorb); "
                        "0: never stop")
    g.add_argument("--min-timestep-boundary", type=float, default=None,
                   help="train on timesteps >= this fraction of the schedule (Wan2.2 A14B low/high-noise experts)")
    g.add_argument("--max-timestep-boundary", type=float, default=None,
                   help="train on timesteps <= this fraction of the schedule (Wan2.2 A14B low/high-noise experts)")


def _optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="constant")
    g.add_argument("--lr-decay-iters", type=_positive_int, default=None)
    g.add_argument("--lr-warmup-iters", type=_non_negative_int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=None,
                   help="keep an exponential moving average of the DiT weights with this decay (e.g. 0.9999); "
                        "saved in checkpoints")
    g.add_argument("--ema-start-iter", type=_non_negative_int, default=0,
                   help="the average equals the weights up to this iteration, then starts decaying")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale for --fp16")


def _checkpoint_and_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--load-fallback", action="store_true",
                   help="when the checkpoint --load's tracker names is damaged (missing or truncated files, an "
                        "unreadable tracker), load the newest earlier checkpoint there that verifies instead of "
                        "stopping")
    g.add_argument("--save-interval", type=_positive_int, default=None)
    g.add_argument("--keep-last-checkpoints", type=_positive_int, default=None, metavar="N",
                   help="after each save, delete the older iter_* checkpoints of --save beyond the newest N (never "
                        "the one this run loaded); default: keep all")
    g.add_argument("--exit-interval", type=_positive_int, default=None,
                   help="stop after an iteration that is a multiple of this (saving a checkpoint first with --save)")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--ckpt-format", choices=("torch", "torch_dist"), default="torch_dist")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=_positive_int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=_positive_int, default=1)
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases too (needs wandb installed)")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--verbose", action="store_true",
                   help="rank 0 also prints the known-harmless notices of megatron-core, torch and diffusers that "
                        "mm silences (mm.accelerator.notices; MM_VERBOSE=1 does the same)")


def _lora(p: argparse.ArgumentParser) -> None:
    """LoRA fine-tuning (``mm.models.predictor.lora``): the names of MindSpeed-MM's finetune_lora.sh."""
    g = p.add_argument_group("LoRA fine-tuning (pretrain_t2v.py, pretrain_i2v.py)")
    g.add_argument("--lora-r", type=_positive_int, default=None,
                   help="train low-rank adapters of this rank on the DiT layers' linears, every other weight frozen; "
                        "checkpoints then hold the adapters alone")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="the adapters' scale is alpha / r; default: r (scale 1)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on each adapter's input (training)")
    g.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help="the layer linears to adapt, by mm's name (linear_qkv, self_attention.linear_proj, mlp.linear_fc1 "
                        "...), the release's (diffusers' to_q, attn1.to_k, ffn.net.0.proj ...; the original Wan's "
                        "self_attn.q, ffn.0 ...) or MindSpeed-MM's (proj_q ... proj_out); a name selects every linear "
                        "whose name ends with it; default: every linear of the layers")
    g.add_argument("--lora-load", default=None,
                   help="an adapter checkpoint (a LoRA run's --save directory) to start from or, the same directory "
                        "as --save, to resume; the base weights come from --load or predictor.from_pretrained")
    g.add_argument("--lora-register-forward-hook", nargs="+", default=None, metavar="MODULE",
                   help="accepted for MindSpeed-MM's scripts: the first recomputed layer's input is made to need "
                        "gradients whatever module is named, so recompute reaches the adapters behind frozen "
                        "embeddings")


def _inference(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="classifier-free guidance in parallel: pairs of data-parallel ranks run the conditional and "
                        "the unconditional branch at once (needs an even data-parallel size)")


VAE_LOSSES = ("l1", "mse")


def _vae_training(p: argparse.ArgumentParser) -> None:
    """pretrain_vae.py's own flags (defaults in mm.arguments.validation.VAE_DEFAULTS; other entry points
    refuse them)."""
    g = p.add_argument_group("VAE training (pretrain_vae.py)")
    g.add_argument("--vae-reconstruction-loss", choices=VAE_LOSSES, default=None,
                   help="the pixel loss between a video and its reconstruction; default l1")
    g.add_argument("--vae-kl-weight", type=float, default=None,
                   help="weight of the KL divergence of the latent posterior from N(0, 1), added to the "
                        "reconstruction loss; default 1e-6")
    g.add_argument("--vae-latent-stats-samples", type=_non_negative_int, default=None,
                   help="after training, encode this many samples of the data and save the per-channel mean and "
                        "std of their latents as the VAE's latents_mean / latents_std (what normalises the latents a "
                        "DiT trains on); 0 keeps the config's; default 64")


FEATURE_FORMATS = ("safetensors", "pt")  # mm.data.features.FORMATS


def _feature_extraction(p: argparse.ArgumentParser) -> None:
    """extract_features.py's own flags."""
    g = p.add_argument_group("feature extraction (extract_features.py)")
    g.add_argument("--save-features", default=None,
                   help="the features directory extract_features.py writes (data.jsonl, features/, features.json); "
                        "MindSpeed-MM's --mm-tool JSON key sorafeature.save_path is read too")
    g.add_argument("--feature-format", choices=FEATURE_FORMATS, default="safetensors",
                   help="safetensors (default), or pt: MindSpeed-MM's torch files, which its FeatureDataset reads")


def _mm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mm configuration files")
    g.add_argument("--mm-model", required=True, help="model JSON (predictor, ae, text_encoder, diffusion)")
    g.add_argument("--mm-data", default=None, help="data JSON (dataset_param, dataloader_param)")
    g.add_argument("--mm-tool", default=None, help="tools JSON (profiling and similar switches)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, allow_abbrev=False,
                     description="mm: Megatron-style training and inference for video DiTs")
    for add in (_parallel, _training, _optimizer, _checkpoint_and_logging, _lora, _inference, _vae_training, _feature_extraction, _mm):
        add(parser)
    return parser


def parse_flags(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: sys.argv[1:]); raises ConfigError on unknown or malformed flags."""
    return build_parser(prog).parse_args(argv)
