"""Training of a video VAE: the loop behind ``pretrain_vae.py``.

The model JSON's ``ae`` section names the VAE (``model_id``; ``from_pretrained`` to start from its
weights, else its config keys and a fresh initialisation from --seed); the data JSON's videos, read by
the same pipeline as the DiT's (``mm.data``: buckets, frame sampling, DP-aware resumable sampler), are
what it learns to reconstruct. Loss: the pixel reconstruction (--vae-reconstruction-loss, L1 or MSE,
averaged over pixels) of a sample of the latent posterior, plus --vae-kl-weight x its KL divergence
from N(0, 1) (averaged over latent elements). Data-parallel over every rank (torch DDP), with
gradient accumulation up to --global-batch-size; the posterior noise of each sample comes from (seed,
iteration, the sample's place in the global batch), so any data-parallel layout of the same global
batch computes the same losses. AdamW, megatron's LR schedule, --clip-grad, the NaN/Inf policy and
megatron-style iteration lines as ``pretrain_t2v.py``'s.

At the end it measures the per-channel mean and std of the latents of the data
(--vae-latent-stats-samples samples; as the DiT's training reads them: the posterior mean) and writes
them as the VAE's ``latents_mean`` / ``latents_std``, so the latents a DiT trains on are about unit
variance; then it saves the VAE to --save, atomically, as the directory ``ae.from_pretrained`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mm.accelerator import destroy_distributed, naming_collective_failures, rank0_print
from mm.data.loader import build_video_dataloader
from mm.models.ae import WanVAE, WanVAEConfig, load_vae, save_wan_vae
from mm.runtime import EntryPoint, start
from mm.training.divergence import TrainingStopped
from mm.training.logger import SKIP, LogConfig, TrainingLogger, check_loss

PROG = "pretrain_vae.py"


def build_trainable_vae(ae, seed: int) -> WanVAE:
    """The ``ae`` section's VAE in fp32 with gradients: its ``from_pretrained`` weights, or without them
    a fresh one from its config keys (initialised from ``seed``, the same on every rank)."""
    if ae.from_pretrained:
        vae = load_vae(ae, torch.float32)
    else:
        torch.manual_seed(seed)
        vae = WanVAE(WanVAEConfig.from_json(ae.params))
    return vae.train().requires_grad_(True)


class VAELoss(torch.nn.Module):
    """``forward(video, noise) -> (reconstruction loss, KL)`` of a batch, each averaged over its
    elements: what DDP wraps (its forward is the one that prepares the gradient all-reduce)."""

    def __init__(self, vae: WanVAE, reconstruction: str):
        super().__init__()
        self.vae, self.reconstruction = vae, reconstruction

    def forward(self, video: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.vae.encode(video)
        z = mean + noise * torch.exp(0.5 * logvar)
        out = self.vae.decode(z, clamp=False)
        rec = F.l1_loss(out, video) if self.reconstruction == "l1" else F.mse_loss(out, video)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        return rec, kl


def lr_scheduler(optimizer, args, global_batch_size: int) -> OptimizerParamScheduler:
    """megatron's LR (and weight-decay) schedule from the --lr* flags, counted in samples."""
    warmup = args.lr_warmup_iters if args.lr_warmup_fraction is None else int(args.lr_warmup_fraction * args.train_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup * global_batch_size,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * global_batch_size,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * global_batch_size, wd_incr_style="constant")


def entry_point() -> EntryPoint:
    """What ``pretrain_vae.py`` validates before any process group (``start``; ``mm.preflight`` before
    torchrun): the flags, the model JSON's ``ae`` section, the data JSON and the --save directory."""
    return EntryPoint(prog=PROG, mode="vae", check=_check_save)


def pretrain_vae(argv: Sequence[str] | None = None) -> list[float]:
    """Train; returns the per-iteration losses (averaged over the data-parallel ranks; for tests)."""
    entry = entry_point()
    runtime = start(argv, mode=entry.mode, prog=entry.prog, check=entry.check, expand=entry.expand)
    try:
        with naming_collective_failures("start-up (the VAE, its optimizer and data)"):
            trainer = VAETrainer(runtime)
        losses = trainer.run()
    except TrainingStopped as e:  # raised on every rank at the same iteration
        if torch.distributed.get_rank() == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        destroy_distributed()
        raise SystemExit(1) from None
    with naming_collective_failures("the end of the run"):
        destroy_distributed()
    return losses


def _check_save(config) -> None:
    from mm.arguments import ConfigError

    save = config.args.save
    if save is not None and Path(save).exists() and not Path(save).is_dir():
        raise ConfigError(f"--save {save}: a file is there; pretrain_vae.py saves the VAE as a directory")


class VAETrainer:
    def __init__(self, runtime):
        cfg, args, acc = runtime.config, runtime.config.args, runtime.accelerator
        self.cfg, self.args, self.acc, self.device = cfg, args, acc, acc.device()
        self.rank, self.dp = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.vae = build_trainable_vae(cfg.model.ae, args.seed).to(self.device)
        module = VAELoss(self.vae, args.vae_reconstruction_loss)
        # single frames (images) leave the temporal layers out of the graph: DDP looks for them each step
        self.model = module if self.dp == 1 else torch.nn.parallel.DistributedDataParallel(
            module, device_ids=None if acc.is_cpu else [self.device.index], find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_eps, weight_decay=args.weight_decay)
        self.gbs = args.global_batch_size or args.micro_batch_size * self.dp
        self.num_micro = self.gbs // (args.micro_batch_size * self.dp)
        self.scheduler = lr_scheduler(self.optimizer, args, self.gbs)
        self.batches = iter(self._loader())
        self.noise_gen = torch.Generator()
        self.iteration = 0

    def _loader(self):
        # the videos alone: no tokenizer is loaded
        data = dataclasses.replace(self.cfg.data, use_text_processer=False, tokenizers=[])
        loader, _ = build_video_dataloader(data, self.args.micro_batch_size, self.rank, self.dp,
                                           num_workers=self.args.num_workers, seed=self.args.seed,
                                           pin_memory=not self.acc.is_cpu)
        return loader

    def _noise(self, video: torch.Tensor, micro: int) -> torch.Tensor:
        """The posterior noise of each sample, from (seed, iteration, its place in the global batch)."""
        mbs = self.args.micro_batch_size
        shape, noise = latent_shape(self.vae, video.shape[1:]), []
        for i in range(video.shape[0]):
            place = micro * mbs * self.dp + self.rank * mbs + i
            self.noise_gen.manual_seed((self.args.seed * 1_000_003 + self.iteration) * 1_000_003 + place)
            noise.append(torch.randn(shape, generator=self.noise_gen))
        return torch.stack(noise).to(self.device)

    def train_step(self) -> dict:
        args = self.args
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, reconstruction, KL: this rank's micro-batch average
        for micro in range(self.num_micro):
            video = next(self.batches)["video"].to(self.device, torch.float32, non_blocking=True)
            last = micro == self.num_micro - 1
            context = self.model.no_sync() if self.dp > 1 and not last else contextlib.nullcontext()
            with context:
                rec, kl = self.model(video, self._noise(video, micro))
                loss = rec + args.vae_kl_weight * kl
                (loss / self.num_micro).backward()
            totals += torch.tensor([loss.item(), rec.item(), kl.item()], dtype=torch.float64) / self.num_micro
        if self.dp > 1:
            torch.distributed.all_reduce(totals)
            totals /= self.dp
        loss, rec, kl = totals.tolist()
        skipped = check_loss(loss, args.exit_on_nan_loss, self.iteration) == SKIP  # the same on every rank
        grad_norm = None
        if not skipped:
            if args.clip_grad > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.vae.parameters(), args.clip_grad))
            self.optimizer.step()
            self.scheduler.step(increment=self.gbs)
        return {"loss": loss, "reconstruction": rec, "kl": kl, "skipped": skipped, "grad_norm": grad_norm}

    def run(self) -> list[float]:
        args = self.args
        logger = TrainingLogger(LogConfig.from_args(args), self.rank, self.dp, run_config=vars(args),
                                on_cpu=self.acc.is_cpu)
        losses, streak = [], 0
        try:
            for iteration in range(1, args.train_iters + 1):
                self.iteration = iteration
                start_time = time.perf_counter()
                with naming_collective_failures(f"VAE training iteration {iteration}"):
                    step = self.train_step()
                self.acc.synchronize()
                losses.append(step["loss"])
                logger.log(iteration=iteration, train_iters=args.train_iters, consumed_samples=iteration * self.gbs,
                           global_batch_size=self.gbs, elapsed_s=time.perf_counter() - start_time,
                           learning_rate=self.optimizer.param_groups[0]["lr"], loss=step["loss"],
                           grad_norm=step["grad_norm"], skipped=step["skipped"])
                if iteration % args.log_interval == 0 or iteration == args.train_iters:
                    rank0_print(f"  {PROG}: iteration {iteration}: reconstruction ({args.vae_reconstruction_loss}) "
                                f"{step['reconstruction']:.6e}, KL {step['kl']:.6e}")
                streak = streak + 1 if step["skipped"] else 0
                if args.max_consecutive_skipped_iterations and streak >= args.max_consecutive_skipped_iterations:
                    raise TrainingStopped(f"stopping at iteration {iteration}: {streak} iterations in a row had a "
                                          f"NaN/Inf loss (--max-consecutive-skipped-iterations "
                                          f"{args.max_consecutive_skipped_iterations}); lower --lr or lengthen the "
                                          "warm-up (--lr-warmup-iters); nothing was saved")
        finally:
            logger.close()
        if args.vae_latent_stats_samples:
            with naming_collective_failures("the latent statistics"):
                self.set_latent_statistics(args.vae_latent_stats_samples)
        if args.save is not None:
            with naming_collective_failures(f"saving the VAE to {args.save}"):
                self.save(args.save)
        return losses

    @torch.no_grad()
    def set_latent_statistics(self, samples: int) -> None:
        """Per-channel mean and std of the posterior means of ``samples`` samples of the data (all ranks,
        a fresh pass in the sampler's order), written into the VAE's config and buffers."""
        self.vae.eval()
        per_step = self.args.micro_batch_size * self.dp
        z = self.vae.cfg.z_dim
        sums = torch.zeros(3, z, dtype=torch.float64)  # count, sum, sum of squares per channel
        batches = iter(self._loader())
        for _ in range(math.ceil(samples / per_step)):
            video = next(batches)["video"].to(self.device, torch.float32)
            mean = self.vae.encode(video)[0].double().cpu().transpose(0, 1).reshape(z, -1)
            sums += torch.stack([torch.full((z,), float(mean.shape[1]), dtype=torch.float64), mean.sum(1),
                                 mean.square().sum(1)])
        if self.dp > 1:
            torch.distributed.all_reduce(sums)
        count, total, squares = sums
        mu = total / count
        std = (squares / count - mu.square()).clamp_min(1e-12).sqrt()
        self.vae.cfg.latents_mean, self.vae.cfg.latents_std = mu.tolist(), std.tolist()
        self.vae.latents_mean.copy_(mu.float().view_as(self.vae.latents_mean))
        self.vae.latents_std.copy_(std.float().view_as(self.vae.latents_std))
        rank0_print(f"{PROG}: latent statistics of {int(count[0].item())} latent positions x {z} channels "
                    f"({math.ceil(samples / per_step) * per_step} samples): latents_mean "
                    f"[{', '.join(f'{v:.4f}' for v in mu.tolist())}], latents_std "
                    f"[{', '.join(f'{v:.4f}' for v in std.tolist())}]")

    def save(self, directory: str) -> None:
        """Rank 0 writes a sibling directory and swaps it in (a reader sees the old VAE or the new one,
        never part of one); the other ranks wait for it."""
        if self.rank == 0:
            target = Path(directory)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_wan_vae(self.vae, str(tmp))
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            print(f"{PROG}: saved the VAE (iteration {self.iteration}) to {directory}", flush=True)
        torch.distributed.barrier()


def latent_shape(vae: WanVAE, video_shape: Sequence[int]) -> tuple[int, ...]:
    """``[z, 1 + (t - 1) // 4, h / s, w / s]`` of a ``[3, t, h, w]`` video (the posterior's shape)."""
    cfg = vae.cfg
    _, frames, height, width = video_shape
    return (cfg.z_dim, 1 + (frames - 1) // cfg.scale_factor_temporal, height // cfg.scale_factor_spatial,
            width // cfg.scale_factor_spatial)
