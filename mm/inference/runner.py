"""Video sampling: ``inference.py --mm-model inference_model.json [parallel flags]``, for every model
family (``mm.families``): the family's sampler (``FamilySpec.sampler``) conditions and denoises, this
runner does the rest.

Every rank builds the DiT for its TP rank (context parallelism splits the sequence inside the
DiT's attention, so every rank of a TP x CP group runs the same loop on the same latents), the
text encoders and the VAE. Data-parallel replicas take turns over the prompts (prompt i goes to
replica i mod DP); with --cfg-parallel two replicas form a pair that runs one prompt, the first
the conditional branch and the second the unconditional one. For each prompt: encode the prompt
(and the negative prompt when guidance runs) with every text encoder, draw the noise from
``seed + prompt index`` (on the CPU, so every rank and device draws the same), run the family's
denoise loop, and the replica's first rank decodes and writes
``<save_path>/<prompt words>_seed<seed>.mp4`` (``_1``, ``_2``, ... if that exists).

``save_path`` is made and probed before any model loads (a configuration error, exit status 2,
where it cannot be written). A write that still fails after sampling (the directory removed or
replaced, a full disk) loses no sample: its latents, prompt and seed are saved beside the intended
video, else in a fallback directory under the system's temporary directory (``LatentKeeper``), the
error naming the path and where the latents went; the run goes on with its other prompts and ends
with exit status 1, listing every video not written. Where the latents cannot be saved anywhere
either, it stops at once (exit status 1).

The DiT's weights come from ``predictor.from_pretrained`` (the family's release layout, read by its
weight table) or from ``--load`` (an mm checkpoint of either format: a training run's, or
mm-convert's); ``inference.lora`` adds a LoRA adapter over them, unmerged (``mm.inference.adapters``).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from megatron.core import parallel_state as mpu
from tqdm import tqdm

from mm.accelerator import destroy_distributed, naming_collective_failures, wait_for_peers
from mm.arguments import ConfigError
from mm.ckpt import TRACKER, load_model
from mm.data.video_writer import write_mp4
from mm.families import FrameRule, Texts, expand_model_json, family_for, resolve
from mm.inference.adapters import apply_adapter
from mm.inference.config import SamplingConfig, os_reason, parse_sampling, save_path_problem
from mm.models.predictor.name_table import read_weights
from mm.parallel import get_group, get_group_ranks
from mm.models.predictor.transformer_config import params_dtype, transformer_config
from mm.parallel.fsdp import shard_parameters
from mm.runtime import EntryPoint, start

PROG = "inference.py"


def sampling_config(config) -> SamplingConfig:
    """The model JSON's ``inference`` section, checked with the family's rules (ConfigError naming
    every bad key)."""
    pred = config.model.predictor
    family, arch = resolve(pred)
    problems = family.problems(config, arch)
    if config.args.pipeline_model_parallel_size != 1:
        problems.append(f"--pipeline-model-parallel-size {config.args.pipeline_model_parallel_size}: inference runs "
                        "the whole DiT on every rank of a TP x CP group; valid: 1")
    if config.args.cfg_parallel and config.sizes.data_parallel % 2:
        problems.append(f"--cfg-parallel pairs data-parallel ranks; the data-parallel size is "
                        f"{config.sizes.data_parallel} (world / (TP x CP)); valid: an even size")
    if not pred.from_pretrained and config.args.load is None:
        problems.append("the DiT's weights: give predictor.from_pretrained (the release's directory) or --load (an mm "
                        "checkpoint)")
    if not config.model.ae or not config.model.ae.from_pretrained:
        problems.append("ae.from_pretrained: needed to sample (a local directory or a release's VAE file; or "
                        "inference.ckpt_dir with a release's task name)")
    for i, text in enumerate(config.model.text_encoder or [None]):
        if text is None or not text.from_pretrained:
            where = "text_encoder" if len(config.model.text_encoder) < 2 else f"text_encoder[{i}]"
            problems.append(f"{where}.from_pretrained: needed to sample (a local directory)")
    try:  # the family's rules even where other problems were found (a missing file: stand-in factors)
        spatial, rule = _vae_factors(family, config)
    except ConfigError:
        if not problems:
            raise
        spatial, rule = 8, FrameRule(4)
    section = config.model.extra.get("inference", {})
    problems.extend(family.sampler.check(config, arch, section))
    sampling = parse_sampling(section, spatial, rule, tuple(arch.patch_size), problems,
                              getattr(family.sampler, "defaults", None))
    problems.extend(family.sampler.check_sampling(config, arch, sampling, rule.temporal))
    lengths = sampling.model_max_length
    if isinstance(lengths, tuple) and len(lengths) != len(config.model.text_encoder):
        problems.append(f"inference.model_max_length = {list(lengths)}: {len(lengths)} lengths for "
                        f"{len(config.model.text_encoder)} text encoder(s); valid: one integer, or one per text encoder")
    cp, tpcp = config.sizes.context_parallel, config.sizes.tensor_parallel * config.sizes.context_parallel
    if sampling.dit_fsdp and cp == 1:
        problems.append("inference.dit_fsdp shards the DiT over its context-parallel group, which is 1 rank here: "
                        "set --context-parallel-size (or ulysses_size x ring_size) > 1, or dit_fsdp false")
    if sampling.t5_fsdp and tpcp == 1:
        problems.append("inference.t5_fsdp shards the text encoder over the TP x CP group, which is 1 rank here: "
                        "set --tensor-model-parallel-size or --context-parallel-size > 1, or t5_fsdp false")
    vae_cp = config.sizes.vae_cp_size
    fewest, why = rule.vae_cp_frames(vae_cp)
    if vae_cp > 1 and sampling.num_frames < fewest:
        problems.append(f"ae.vae_cp_size = {vae_cp} with inference.num_frames = {sampling.num_frames}: {why}; "
                        f"valid: num_frames >= {fewest}, or a smaller vae_cp_size")
    if config.args.cfg_parallel and not problems and not family.sampler.guided(config, sampling):
        problems.append("--cfg-parallel with guidance off (a guidance scale of 1): there is no second branch")
    # last: made and probed only when nothing else refuses the configuration
    problem = save_path_problem(sampling.save_path, create=not problems)
    if problem:
        problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return sampling


def _vae_factors(family, config) -> tuple[int, FrameRule]:
    """(the VAE's spatial compression, how it maps frames to latent frames)."""
    try:
        return family.vae_factors(config.model.ae)[0], family.frames(config.model.ae)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def sample_stem(prompt: str, seed: int) -> str:
    """``<first words of the prompt>_seed<seed>``: a sample's file name without its suffix."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60] or "prompt"
    return f"{words}_seed{seed}"


def free_path(directory: Path, stem: str, suffix: str) -> Path:
    """``<directory>/<stem><suffix>``, or ``<stem>_1<suffix>``, ``_2``, ...: never an existing file."""
    path, n = directory / f"{stem}{suffix}", 1
    while path.exists():
        path = directory / f"{stem}_{n}{suffix}"
        n += 1
    return path


def output_path(directory: Path, prompt: str, seed: int) -> Path:
    """``<directory>/<first words of the prompt>_seed<seed>.mp4``; never an existing file."""
    return free_path(directory, sample_stem(prompt, seed), ".mp4")


def to_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


KEPT_SUFFIX = ".unwritten.pt"


@dataclass
class Unwritten:
    """A sample whose files could not be written: the intended video, why, and where its latents are."""

    video: Path
    reason: str
    kept: Path


class LatentKeeper:
    """Keeps the latents of a sample whose files could not be written, so that no sampling is lost:
    ``{"latents": [1, C, T, H, W] (the tensor save_latents writes), "prompt", "seed", "video": the
    intended path}`` saved with ``torch.save`` as ``<video name>.unwritten.pt`` beside the intended
    video, or, where that cannot be written either, in a directory of the run's own under the
    system's temporary directory (``mm_unwritten_*``, made on the first need)."""

    def __init__(self):
        self.fallback: Path | None = None

    def keep(self, latents: torch.Tensor, prompt: str, seed: int, video: Path) -> tuple[Path | None, list[str]]:
        """(where the record was saved, or None; why each place that refused it did)."""
        record = {"latents": latents.detach().cpu(), "prompt": prompt, "seed": seed, "video": str(video)}
        refused = []
        for place in ("beside", "fallback"):
            target = None
            try:
                if place == "fallback" and self.fallback is None:
                    self.fallback = Path(tempfile.mkdtemp(prefix="mm_unwritten_"))
                directory = video.parent if place == "beside" else self.fallback
                target = free_path(directory, video.stem, KEPT_SUFFIX)
                save_file(record, target)
                return target, refused
            except OSError as e:
                refused.append(f"{e.filename or target or place}: {os_reason(e)}")
        return None, refused


def save_file(obj, path: Path) -> None:
    """``torch.save`` through an open file, so a failed write raises OSError (with the path) and
    leaves no partial file behind."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except OSError:
        try:
            if path.is_file():
                path.unlink()
        except OSError:
            pass
        raise


class ModelStager:
    """With offload_model: only the models of the current stage (encode, denoise, decode) on the
    device, every other one in host memory; without it, a no-op."""

    def __init__(self, acc, device: torch.device, enabled: bool, movable: list[torch.nn.Module]):
        self.acc, self.device, self.enabled, self.movable = acc, device, enabled, movable

    def __call__(self, *modules) -> None:
        if not self.enabled:
            return
        wanted = {id(m) for m in modules if m is not None}
        # the leaving models first, so the stage's models never share the device with them
        for m in sorted(self.movable, key=lambda m: id(m) in wanted):
            m.to(self.device if id(m) in wanted else torch.device("cpu"))
        if not self.acc.is_cpu:
            self.acc.module.empty_cache()


def _report_sharded(what: str, held: int, ranks: int) -> None:
    if torch.distributed.get_rank() == 0:
        print(f"{PROG}: {what}'s parameters sharded over {ranks} ranks ({held / 2**20:.1f} MiB per rank)", flush=True)


class Runner:
    """One sampling run: the models of this rank, the prompts of its replica, the written files."""

    def __init__(self, runtime, sampling: SamplingConfig):
        self.runtime, self.sampling = runtime, sampling
        cfg, args, acc = runtime.config, runtime.config.args, runtime.accelerator
        self.args, self.acc = args, acc
        self.device, self.dtype = acc.device(), params_dtype(args)
        pred = cfg.model.predictor
        self.family = family_for(pred.model_id)
        self.arch = self.family.arch(pred)
        # offload_model: every model waits in host memory and comes to the device for its stage
        # (encode, denoise, decode); t5_cpu: the text encoders stay on the host
        home = torch.device("cpu") if sampling.offload_model else self.device
        self.home = home
        self.dits = [self._build_dit(args.load or pred.from_pretrained, args.load is not None, sampling.lora)]
        if sampling.low_noise_model is not None:  # an mm checkpoint has a tracker file, a release directory not
            low = sampling.low_noise_model
            self.dits.append(self._build_dit(low, (Path(low) / TRACKER).is_file()))
        if sampling.dit_fsdp:  # over the ranks that run every DiT forward together
            for model in self.dits:
                held = shard_parameters(model, mpu.get_context_parallel_group(), self.device.type)
            _report_sharded("dit_fsdp: the DiT", held, args.context_parallel_size)
        self.sampler = self.family.sampler(cfg, self.arch, sampling, home)
        # patch.ae_float32 (MindSpeed-MM's): the VAE computes in fp32 whatever the run's precision
        self.vae = self.family.build_vae(cfg.model.ae, torch.float32 if cfg.model.ae_float32 else self.dtype).to(home)
        lengths = sampling.model_max_length
        self.text_encoders = [self.family.text_encoders(
            text, lengths[i] if isinstance(lengths, tuple) else lengths or self.family.text_max_length(i),
            self.family.sampler.text_zero_padding) for i, text in enumerate(cfg.model.text_encoder)]
        for encoder in self.text_encoders:
            encoder.to(torch.device("cpu") if sampling.t5_cpu else home)
            if sampling.t5_fsdp:  # every rank of a TP x CP group encodes the same prompts
                held = shard_parameters(encoder.model, mpu.get_tensor_and_context_parallel_group(), self.device.type)
                _report_sharded("t5_fsdp: the text encoder", held, mpu.get_tensor_and_context_parallel_world_size())
        # VAE-CP: the ranks of a VAE-CP group share each encode (I2V/FLF2V condition) and each decode
        self.vae_cp = (get_group("vae_cp"), get_group_ranks("vae_cp")) if cfg.sizes.vae_cp_size > 1 else None
        movable = [*self.dits, self.sampler.image_encoder, self.vae] + ([] if sampling.t5_cpu else self.text_encoders)
        self.stage = ModelStager(acc, self.device, sampling.offload_model, [m for m in movable if m is not None])
        self.guided = self.family.sampler.guided(cfg, sampling)
        self.keeper, self.unwritten = LatentKeeper(), []

    def _build_dit(self, weights: str, from_checkpoint: bool, adapter: tuple[str, float] | None = None):
        """The DiT with ``weights`` (an mm checkpoint, or the release's files); ``adapter``: inference.lora's
        (path, scale), applied over them unmerged."""
        args, pred = self.args, self.runtime.config.model.predictor
        model = self.family.build_predictor(pred.model_id, self.arch,
                                            transformer_config(args, self.arch, self.acc.is_cpu)).to(self.home).eval()
        if from_checkpoint:
            load_model(weights, [model])
        else:
            self.family.load_weights(model, read_weights(weights), args.tensor_model_parallel_size,
                                     mpu.get_tensor_model_parallel_rank())
        if adapter is not None:
            settings = apply_adapter(model, self.family, *adapter, args.tensor_model_parallel_size,
                                     mpu.get_tensor_model_parallel_rank())
            if torch.distributed.get_rank() == 0:
                print(f"{PROG}: inference.lora {adapter[0]}: rank {settings.r}, alpha {settings.alpha:g} x scale "
                      f"{adapter[1]:g} on {', '.join(settings.targets)}", flush=True)
        if args.compile_dit_blocks:  # compiled on the first step (its time is left out of s/step)
            model.compile_blocks()
        return model

    def _write(self, out_dir: Path, prompt: str, seed: int, video: torch.Tensor,
               latents: torch.Tensor, extended: str | None = None) -> Path | None:
        """Write one sample's video (and its latents with save_latents): the video's path, or None
        when a write failed. Then the latents are kept (``LatentKeeper``), the failure is reported at
        once and recorded in ``self.unwritten``, and the run goes on with its other prompts; where the
        latents cannot be kept anywhere either, the run stops (exit status 1)."""
        path = out_dir / f"{sample_stem(prompt, seed)}.mp4"  # the name meant, for the messages
        try:
            path = output_path(out_dir, prompt, seed)
            write_mp4(path, to_frames(video[0]), self.sampling.fps)
            if self.sampling.save_latents:
                save_file(latents.cpu(), path.with_suffix(".latents.pt"))
            if extended is not None:  # the prompt the video was sampled with (use_prompt_extend)
                path.with_suffix(".prompt.txt").write_text(f"{prompt}\n\nextended:\n{extended}\n", encoding="utf-8")
            return path
        except OSError as e:
            failed = e.filename or path
            reason = os_reason(e)
        kept, refused = self.keeper.keep(latents, prompt, seed, path)
        if kept is None:
            tqdm.write(f"{PROG}: error: could not write {failed}: {reason}; its latents could not be saved either "
                       f"({'; '.join(refused)}): stopping", file=sys.stderr)
            raise SystemExit(1)
        self.unwritten.append(Unwritten(Path(failed), reason, kept))
        tqdm.write(f"{PROG}: error: could not write {failed}: {reason}; the sample's latents, prompt and seed are "
                   f"saved in {kept} (torch.load); going on with the other prompts", file=sys.stderr)
        return None

    def encode_prompts(self, prompts: list[str]) -> Texts:
        """Every text encoder's embeddings and masks of ``prompts``, on the device."""
        embeddings, masks = [], []
        for encoder in self.text_encoders:
            ids, mask = encoder.tokenize(prompts)
            embeddings.append(encoder.encode(ids, mask).to(self.device, self.dtype))
            masks.append(mask.to(self.device))
        return Texts(embeddings, masks)

    def run(self) -> list[Path]:
        args, sampling, device = self.args, self.sampling, self.device
        tp_rank = mpu.get_tensor_model_parallel_rank()
        rank0 = torch.distributed.get_rank() == 0
        # data-parallel replicas share the prompts; --cfg-parallel pairs of them share one prompt's branches
        dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
        cfg_group = get_group("cfg") if args.cfg_parallel else None
        replicas, replica = (dp // 2, dp_rank // 2) if args.cfg_parallel else (dp, dp_rank)
        writer = tp_rank == 0 and mpu.get_context_parallel_rank() == 0 and (not args.cfg_parallel or dp_rank % 2 == 0)
        out_dir = Path(sampling.save_path)  # made and probed by sampling_config, on every rank
        spatial = self.family.vae_factors(self.runtime.config.model.ae)[0]
        shape = (self.arch.out_dim, self.family.frames(self.runtime.config.model.ae).latent_frames(sampling.num_frames),
                 sampling.height // spatial, sampling.width // spatial)
        written = []
        mine = [(i, p) for i, p in enumerate(sampling.prompts) if i % replicas == replica]
        for i, prompt in tqdm(mine, desc="prompts", disable=not rank0):
            with naming_collective_failures(f"prompt {i}"):
                path = self._sample(i, prompt, shape, out_dir, writer, cfg_group)
            if path is not None:
                written.append(path)
        return written

    def _sample(self, i: int, prompt: str, shape: tuple, out_dir: Path, writer: bool, cfg_group) -> Path | None:
        """Prompt ``i``: encode, denoise and decode; the writer writes the file and returns its path.

        Every rank decodes (each VAE-CP group its copy): the ranks that share the prompt hold the same
        latents, and a rank that skipped the decode would wait in the next prompt's first collective
        for as long as the writer's decode takes (minutes for long 720p videos), where the
        communication library's timeout may end the run."""
        sampling, acc, device, vae = self.sampling, self.acc, self.device, self.vae
        steps, solver = self.sampler.steps, self.sampler.solver
        rank0 = torch.distributed.get_rank() == 0
        begin = time.perf_counter()
        seed = sampling.seed + i
        self.stage(*self.text_encoders, self.sampler.image_encoder, vae)
        text = prompt if sampling.extended_prompts is None else sampling.extended_prompts[i]
        texts = self.encode_prompts([sampling.prompt_prefix + text + sampling.prompt_suffix] + ([sampling.negative_prompt] if self.guided else []))
        prepared = self.sampler.prepare(i, vae, self.vae_cp, device, self.dtype)
        frames = self.sampler.noise_frames(shape[1], prepared)
        generator = torch.Generator().manual_seed(seed)  # the initial noise, then any sampler noise
        noise = torch.randn((1, shape[0], frames, *shape[2:]), generator=generator,
                            dtype=torch.float32)[:, :, :shape[1]]
        self.stage(*self.dits)
        acc.synchronize()
        begin_denoise = time.perf_counter()
        marks = []  # after each step; s/step is over steps 2..N, as diffusers' callbacks time it

        def mark():
            acc.synchronize()
            marks.append(time.perf_counter())

        latents = self.sampler.denoise(self.dits, texts, noise.to(device), generator, prepared, self.dtype,
                                       show_progress=rank0, cfg_group=cfg_group, on_step=mark)
        denoise_s = time.perf_counter() - begin_denoise
        per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else denoise_s
        self.stage(vae)
        video = vae.decode(vae.denormalize(latents.to(self.dtype)), vae_cp=self.vae_cp)
        if not writer:
            return None
        path = self._write(out_dir, prompt, seed, video, latents,
                           None if sampling.extended_prompts is None else sampling.extended_prompts[i])
        if path is None:  # kept, reported and recorded in self.unwritten
            return None
        print(f"{PROG}: wrote {path} ({sampling.num_frames} frames, {sampling.height}x{sampling.width}, "
              f"{steps} {solver} steps: {per_step:.3f} s/step (steps 2-{steps}; first "
              f"{marks[0] - begin_denoise:.3f} s); "
              f"{time.perf_counter() - begin:.1f} s in all"
              f"{'' if self.vae_cp is None else f'; decoded over {len(self.vae_cp[1])} VAE-CP ranks'}; "
              f"peak memory {acc.max_memory_allocated() / 2**30:.2f} GiB)", flush=True)
        return path


def extend_prompts_on_rank_0(runtime, sampling: SamplingConfig) -> SamplingConfig:
    """``use_prompt_extend``: rank 0 extends every prompt (``mm.inference.prompt_extend``; prompt i with
    seed + i) before any other model loads, while the other ranks wait outside any collective
    (``wait_for_peers``: no timeout while rank 0 lives); the extended prompts are then broadcast.
    A prompt whose extension failed keeps its text, with a warning (Wan's fallback)."""
    from mm.inference.prompt_extend import extend_prompts

    method, model, lang = sampling.prompt_extend
    extended = [None]
    if torch.distributed.get_rank() == 0:
        acc = runtime.accelerator
        results = extend_prompts(sampling.prompts, method, model, lang, sampling.seed, acc.device(),
                                 torch.float32 if acc.is_cpu else torch.bfloat16)
        for i, result in enumerate(results):
            if not result.ok:
                print(f"{PROG}: warning: prompt {i} not extended ({result.message}); sampled as given",
                      file=sys.stderr, flush=True)
        extended = [[r.extended if r.ok else r.prompt for r in results]]
    wait_for_peers("prompt extension (rank 0)")
    with naming_collective_failures("prompt extension (broadcast)"):
        torch.distributed.broadcast_object_list(extended, src=0)
    return replace(sampling, extended_prompts=extended[0])


def entry_point() -> EntryPoint:
    """What ``inference.py`` validates before any process group (``start``; ``mm.preflight`` before
    torchrun): the flags and the model JSON (a release's own generate configuration expanded), and its
    inference section with the files it names (``sampling_config``)."""
    return EntryPoint(prog=PROG, mode="inference", check=sampling_config, expand=expand_model_json)


def inference(argv: Sequence[str] | None = None) -> list[Path]:
    """Sample every prompt of the model JSON; returns the .mp4 paths this rank wrote."""
    checked = {}  # the inference section as start()'s check parsed it (before any process group)
    entry = entry_point()
    runtime = start(argv, mode=entry.mode, prog=entry.prog, expand=entry.expand,
                    check=lambda config: checked.update(sampling=entry.check(config)))
    sampling = checked["sampling"]
    if sampling.prompt_extend is not None:
        sampling = extend_prompts_on_rank_0(runtime, sampling)
    with naming_collective_failures("start-up (models, --load)"):
        runner = Runner(runtime, sampling)
    wait_for_peers("the first prompt (every rank's models loaded)")  # outside any collective
    written = runner.run()
    with naming_collective_failures("the end of the run"):
        destroy_distributed()
    if runner.unwritten:
        lines = "".join(f"\n  {u.video}: {u.reason}; latents in {u.kept}" for u in runner.unwritten)
        print(f"{PROG}: error: {len(runner.unwritten)} of {len(written) + len(runner.unwritten)} samples of this "
              f"rank could not be written (their latents, prompts and seeds are kept):{lines}", file=sys.stderr,
              flush=True)
        raise SystemExit(1)
    return written
