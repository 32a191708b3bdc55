"""What a model family is: one ``FamilySpec`` that the training loop, ``inference.py`` and
``mm-convert`` consume, and the interfaces of the family's parts.

A family folder (``mm/families/wan/``, ``mm/families/opensoraplan/``) exports one spec, built from:

- ``predictors``: ``predictor.model_id`` -> (the DiT class, its architecture config class with
  ``from_json``). The DiT subclasses ``mm.models.predictor.dit.PipelinedDiT``, so stages, token
  sharding, recompute and the carry between pipeline stages are shared.
- ``load_weights(chunk, source, tp_size, tp_rank)``: full release weights (a name -> tensor dict)
  into one model chunk, this TP rank's slices (the family's weight table).
- ``ae_model_ids``: the VAEs (``ae.model_id``) whose latents the DiT reads; ``build_vae`` and
  ``vae_factors`` build one and tell its compression (``mm.models.ae`` by default).
- ``text_encoders``: how each entry of the model JSON's ``text_encoder`` list is built
  (``TextEncoderFactory``); the runner and the data loader tokenize and encode with every one and
  hand the recipe / sampler one embedding and one mask per encoder, in order.
- ``recipe``: a ``Recipe`` class (training: conditioning, objective, loss, FLOPs).
- ``sampler``: a ``Sampler`` class (inference: checks, conditioning, denoise loop).
- ``converter``: a zero-argument callable returning the family's ``mm-convert`` converter class
  (imported only by mm-convert).

The registry (``mm.families``) is the only place that lists families; shared code asks the spec
and never branches on a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch


TRAINING_ENTRY_POINTS = {"t2v": "pretrain_t2v.py", "i2v": "pretrain_i2v.py"}  # training task -> entry point


@dataclass
class StepInputs:
    """One micro-batch's DiT call on stage 0 and what the last stage needs for the loss."""

    args: tuple  # positional DiT inputs
    carry: torch.Tensor  # the target (and the family's loss extras), [b, c, f, h, w]
    flops: int  # model FLOPs of forward + backward of this micro-batch


class TextEncoderLike(Protocol):
    """What the loops call on a text encoder (``mm.models.text_encoder.TextEncoder`` is one)."""

    max_length: int

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


# (one ``text_encoder`` entry of the model JSON, the token length, whether embeddings past each
# prompt are zeroed) -> the encoder module
TextEncoderFactory = Callable[[Any, int, bool], torch.nn.Module]


def default_text_encoder(component, max_length: int, zero_padding: bool,
                         clean: Callable[[str], str] | None = None) -> torch.nn.Module:
    """A T5-family encoder from ``component.from_pretrained`` (``mm.models.text_encoder``), its tokenizer from
    the section's ``tokenizer`` key where given; ``clean``: applied to every prompt before it is tokenized."""
    from mm.models.text_encoder import TextEncoder

    params = getattr(component, "params", None) or {}
    return TextEncoder(component.model_id, component.from_pretrained, component.dtype or "fp32",
                       max_length=max_length, zero_padding=zero_padding, tokenizer=params.get("tokenizer"),
                       clean=clean)


def default_vae(ae, dtype: torch.dtype) -> torch.nn.Module:
    from mm.models.ae import load_vae

    return load_vae(ae, dtype)


def default_vae_channels(ae) -> int:
    from mm.models.ae import vae_latent_channels

    return vae_latent_channels(ae)


def default_vae_factors(ae) -> tuple[int, int]:
    from mm.models.ae import vae_factors

    return vae_factors(ae)


@dataclass(frozen=True)
class FrameRule:
    """How a video VAE turns frames into latent frames: causally (``temporal`` k + 1 frames -> k + 1
    latent frames, the first frame alone: Wan's VAE, WFVAE) or in independent chunks (``chunk`` k
    frames -> ``chunk_latents`` k latent frames: Step-Video's VAE, 17 -> 3)."""

    temporal: int
    chunk: int = 0  # 0: causal
    chunk_latents: int = 0

    def latent_frames(self, frames: int) -> int | None:
        """The latent frames of a ``frames``-frame video; None when the VAE cannot take that count."""
        if self.chunk:
            return frames // self.chunk * self.chunk_latents if frames > 0 and frames % self.chunk == 0 else None
        return (frames - 1) // self.temporal + 1 if frames > 0 and (frames - 1) % self.temporal == 0 else None

    def valid(self) -> str:
        """The frame counts the VAE takes, for error messages."""
        if self.chunk:
            c = self.chunk
            return f"{c}k ({c}, {2 * c}, {3 * c}, ...), the VAE's chunks of {c} frames"
        t = self.temporal
        return f"{t}k + 1 (1, {t + 1}, {2 * t + 1}, ...), the VAE's temporal compression"

    def vae_cp_frames(self, vae_cp: int) -> tuple[int, str]:
        """(the fewest frames VAE-CP over ``vae_cp`` ranks takes, why)."""
        if self.chunk:
            return vae_cp * self.chunk, "VAE-CP gives each rank at least one chunk"
        return 1 + 2 * vae_cp * self.temporal, "VAE-CP gives each rank at least 2 latent frames after the first"


class Recipe(Protocol):
    """A family's training recipe (``pretrain_t2v.py`` / ``pretrain_i2v.py``).

    ``encoded`` (what ``step`` gets): ``latents [b, c, f, h, w]``, ``context`` / ``context_mask``
    (lists, one per text encoder), ``condition`` and ``context_image`` from ``encode_condition``."""

    text_zero_padding: ClassVar[bool]  # text encoders zero the embeddings past each prompt
    # the condition ``encode_condition`` returns depends on the sample alone (no per-batch draw such as a
    # random mask), so extract_features.py may store it with the latents (absent: False)
    features_condition: ClassVar[bool]

    @staticmethod
    def check(task: str, config, arch) -> list[str]: ...

    def build_image_encoder(self, config) -> torch.nn.Module | None:
        """The frozen image encoder ``encode_condition`` gets (on the host; the loop moves it), or None."""

    def encode_condition(self, vae, batch: dict, video: torch.Tensor, vae_cp, image_encoder, encode_dp,
                         dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def draw(self, shape: torch.Size, noise_gen: torch.Generator, level_gen: torch.Generator, place: int,
             global_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, encoded: dict, noise: torch.Tensor, levels: torch.Tensor) -> StepInputs: ...

    def flops(self, latent: Sequence[int], text_lens: Sequence[int], batch_size: int) -> int:
        """Model FLOPs of forward + backward of a micro-batch of ``batch_size`` latent videos ``latent``
        (frames, height, width) with each text encoder's token length (``step``'s count; mm-plan's MFU)."""

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Texts:
    """A prompt batch through every text encoder: ``embeddings[k] [n, L_k, d_k]`` and
    ``masks[k] [n, L_k]`` of encoder k; row 0 the prompt, row 1 (if any) the negative prompt."""

    embeddings: list[torch.Tensor]
    masks: list[torch.Tensor]

    def rows(self, start: int, stop: int) -> "Texts":
        return Texts([e[start:stop] for e in self.embeddings], [m[start:stop] for m in self.masks])


class Sampler(Protocol):
    """A family's sampling (``inference.py``): built once per run on every rank.

    The runner owns the CLI, the process groups, building and staging the models, the prompts'
    text encoding, the noise and the output; the sampler owns what the family adds. A sampler
    class may set ``defaults``: the ``inference`` section's defaults for this family (``SamplingConfig``
    field -> value, e.g. its video size and frame rate), over Wan's."""

    text_zero_padding: ClassVar[bool]

    @staticmethod
    def check(config, arch, section: dict) -> list[str]:
        """Problems of the model JSON for this family before the ``inference`` section is parsed."""

    @staticmethod
    def check_sampling(config, arch, sampling, temporal: int) -> list[str]:
        """Problems of the parsed sampling settings with this family's DiT."""

    @staticmethod
    def guided(config, sampling) -> bool:
        """Whether classifier-free guidance runs (a negative prompt is encoded)."""

    steps: int
    solver: str
    image_encoder: torch.nn.Module | None  # built by the sampler (on the host), staged by the runner

    def prepare(self, index: int, vae, vae_cp, device, dtype) -> dict:
        """Prompt ``index``'s conditioning (encoded images, reference latents ...)."""

    def noise_frames(self, latent_frames: int, prepared: dict) -> int:
        """Latent frames of the initial noise (its first ``latent_frames`` are the video's)."""

    def denoise(self, dits: Sequence, texts: Texts, noise: torch.Tensor, generator: torch.Generator, prepared: dict,
                dtype: torch.dtype, show_progress: bool, cfg_group, on_step) -> torch.Tensor:
        """fp32 latents ``[1, c, f, h, w]`` from ``noise``; ``dits``: the DiT, then any further expert."""


@dataclass(frozen=True)
class ReleaseConfig:
    """How a family reads its users' own generate configuration: the model JSON's ``inference``
    section naming one of ``tasks`` (the release's task names, e.g. Wan's ``t2v-1.3B``) is rewritten by
    ``expand(model_json, problems, notes)`` into mm's terms (its sections built from a release
    directory where the section names one) before anything is validated."""

    tasks: tuple[str, ...]
    expand: Callable[[dict, list[str], list[str]], dict]


@dataclass(frozen=True)
class FamilySpec:
    """One model family; see the module docstring."""

    name: str
    predictors: Mapping[str, tuple[type, type]]
    recipe: type
    sampler: type
    load_weights: Callable[[torch.nn.Module, dict, int, int], None]
    ae_model_ids: tuple[str, ...]
    num_text_encoders: int = 1  # entries of the model JSON's text_encoder list the DiT reads
    text_encoders: TextEncoderFactory = default_text_encoder
    build_vae: Callable[[Any, torch.dtype], torch.nn.Module] = default_vae
    # the ``ae`` section -> (spatial, temporal) compression, before the VAE is built
    vae_factors: Callable[[Any], tuple[int, int]] = default_vae_factors
    # the ``ae`` section -> the VAE's latent channels, before it is built (OSError: its files are absent)
    vae_channels: Callable[[Any], int] = default_vae_channels
    # the ``ae`` section -> how the VAE maps frames to latent frames (None: causal, by vae_factors)
    frame_rule: Callable[[Any], FrameRule] | None = None
    # a ``tokenizer_config`` entry of the data JSON -> the data loader's tokenizer, called as
    # transformers' tokenizers are (None: transformers' AutoTokenizer of its from_pretrained)
    tokenizer: Callable[[dict], Any] | None = None
    # each text encoder's token length where the configuration gives none (default 512 each)
    text_max_lengths: tuple[int, ...] = ()
    converter: Callable[[], type] | None = None
    description: str = ""
    # the release's own generate configuration (task names, release directories), read by inference.py
    release: ReleaseConfig | None = None
    # checks beyond the recipe's and sampler's, shared by training and inference: (config, arch) -> problems
    extra_checks: tuple[Callable[[Any, Any], list[str]], ...] = field(default_factory=tuple)
    # checks of the release's files the model and data JSONs name (weights, tokenizers), as extra_checks; left
    # out by ``problems(..., weights=False)``, for a planner that reads no weights (mm-plan)
    weight_checks: tuple[Callable[[Any, Any], list[str]], ...] = field(default_factory=tuple)
    # the model JSON -> the VAE's (spatial, temporal) compression where ``vae_factors`` reads the VAE's files
    # and they are absent (mm-plan without the weights); ValueError naming the key when the JSON does not tell
    known_vae_factors: Callable[[Any], tuple[int, int]] | None = None
    # another tool's layout of this family's model JSON (MindSpeed-MM's) rewritten into mm's, before anything
    # is validated: (model JSON, problems, notes) -> model JSON; returns it unchanged when not in that layout
    translate: Callable[[dict, list[str], list[str]], dict] | None = None
    # a model JSON of the encoders alone (MindSpeed-MM's feature-extraction files: ae and text_encoder, no predictor)
    # -> the predictor section its features are for: (model JSON, problems, notes) -> predictor section
    feature_predictor: Callable[[dict, list[str], list[str]], dict] | None = None
    # the linears of the DiT's layers LoRA may adapt, with their names (``mm.models.predictor.lora.LoraTargets``);
    # None: the family offers no LoRA
    lora: Any = None

    def arch(self, predictor) -> Any:
        """The typed architecture config of the model JSON's ``predictor`` section."""
        config_cls = self.predictors[predictor.model_id][1]
        return config_cls.from_json(dict(predictor.params, num_layers=predictor.num_layers,
                                         num_heads=predictor.num_heads))

    def build_predictor(self, model_id: str, arch: Any, config, **stage) -> torch.nn.Module:
        """The DiT (or one pipeline stage of it: ``pre_process``, ``post_process``, ``layer_offset``,
        ``num_layers``) for this rank, with megatron's ``config``."""
        return self.predictors[model_id][0](arch, config, **stage)

    def frames(self, ae, temporal: int | None = None) -> FrameRule:
        """How the ``ae`` section's VAE maps frames to latent frames (``temporal``: its temporal compression,
        where already known)."""
        if self.frame_rule is not None:
            return self.frame_rule(ae)
        return FrameRule(self.vae_factors(ae)[1] if temporal is None else temporal)

    def planning_vae_factors(self, model) -> tuple[int, int]:
        """``vae_factors`` of the model JSON's ``ae`` section, or where that needs the VAE's files and they are
        absent, ``known_vae_factors`` of the model JSON; ValueError naming what is missing."""
        try:
            return self.vae_factors(model.ae)
        except OSError as e:
            if self.known_vae_factors is None:
                raise ValueError(str(e)) from None
            return self.known_vae_factors(model)

    def text_max_length(self, index: int) -> int:
        """Text encoder ``index``'s token length where the configuration gives none."""
        return self.text_max_lengths[index] if index < len(self.text_max_lengths) else 512

    def compiles(self, model_id: str) -> bool:
        """Whether the DiT compiles its layers (``--compile-dit-blocks``)."""
        return bool(getattr(self.predictors[model_id][0], "COMPILES_BLOCKS", False))

    def lora_settings(self, args, problems: list[str] | None = None):
        """The run's adapters from ``--lora-r``, ``--lora-alpha``, ``--lora-dropout`` and
        ``--lora-target-modules`` (``mm.models.predictor.lora.LoraSettings``), None without ``--lora-r``;
        a target name the family's layers do not have, or a family without LoRA, goes to ``problems``
        (ValueError without a list)."""
        if getattr(args, "lora_r", None) is None:
            return None
        from mm.models.predictor.lora import LoraSettings

        found: list[str] = []
        if self.lora is None:
            found.append(f"--lora-r {args.lora_r}: the {self.name} family's DiT offers no LoRA adapters")
            targets = {}
        else:
            targets = self.lora.resolve(args.lora_target_modules, found, f"the {self.name} DiT")
        if problems is None and found:
            raise ValueError("; ".join(found))
        if problems is not None:
            problems.extend(found)
        alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_r
        return LoraSettings(r=args.lora_r, alpha=alpha, targets=targets, dropout=args.lora_dropout)

    def lora_part_counts(self) -> dict[str, int]:
        """How many parts each adaptable linear fuses (self-attention q/k/v: 3)."""
        counts: dict[str, int] = {}
        for part in self.lora.parts:
            counts[part.linear] = counts.get(part.linear, 0) + 1
        return counts

    def problems(self, config, arch, weights: bool = True) -> list[str]:
        """The checks every entry point makes of this family's model JSON (``weights``: with the release's
        files, ``weight_checks``)."""
        problems = []
        model_id = config.model.predictor.model_id
        ae = config.model.ae
        if ae is not None and ae.model_id not in self.ae_model_ids:
            problems.append(f"ae.model_id = {ae.model_id!r} with predictor {model_id!r}; valid: "
                            f"{', '.join(self.ae_model_ids)}")
        given = len(config.model.text_encoder)
        # training on extracted features (dataset_type feature) needs no text encoder in the model JSON
        features = getattr(getattr(config, "data", None), "features", False)
        if given != self.num_text_encoders and not (features and given == 0):
            problems.append(f"text_encoder: {given} given; predictor {model_id!r} ({self.name}) reads "
                            f"{self.num_text_encoders} text encoder(s) (a list of that many sections)")
        if config.args.compile_dit_blocks and not self.compiles(model_id):
            problems.append(f"--compile-dit-blocks: predictor {model_id!r} ({self.name}) does not compile its layers; "
                            "leave the flag out")
        granularity, modules = config.args.recompute_granularity, config.args.recompute_modules
        # selective without the flag recomputes megatron's default, core_attn; full + block the modules given
        recompute = set(modules or ("core_attn",)) if granularity == "selective" else \
            set(modules or ()) if granularity == "full" else set()
        can = tuple(getattr(self.predictors[model_id][0], "RECOMPUTE_MODULES", ()))
        if recompute - set(can):
            problems.append(f"--recompute-modules {' '.join(sorted(recompute - set(can)))}: predictor {model_id!r} "
                            f"({self.name}) recomputes {', '.join(can) or 'no module selectively'}; valid: those")
        if ae is not None and ae.model_id in self.ae_model_ids:
            problems.extend(self._channel_problems(ae, arch))
        self.lora_settings(config.args, problems)
        for check in (self.weight_checks if weights else ()) + self.extra_checks:
            problems.extend(check(config, arch))
        return problems

    def _channel_problems(self, ae, arch) -> list[str]:
        """The DiT predicts latents of the VAE's channels: a mismatch fails at the first step otherwise."""
        try:
            channels = self.vae_channels(ae)
        except (OSError, ValueError, TypeError):  # absent files, bad keys: the weight and key checks name them
            return []
        predicted = getattr(arch, "out_dim", None)
        if predicted is None or predicted == channels:
            return []
        return [f"the predictor predicts {predicted} latent channels (its out_dim / out_channels) but the VAE "
                f"(ae.model_id {ae.model_id!r}, ae.from_pretrained = {ae.from_pretrained!r}) has {channels}; "
                f"valid: a DiT and a VAE of the same latent channels ({channels})"]
