"""The Step-Video-T2V example scripts (examples/stepvideo/t2v/) as a user runs them, with a stand-in
``torchrun`` first on the PATH that records what it was given: the flags after the entry point must pass
mm's real parser, validation and the entry point's own checks (``check_task`` for training,
``sampling_config`` for inference: the ``inference`` section through the family's rules) with the model
and data JSONs they name, against a stand-in of the release's directory layout
(``stepfun-ai/stepvideo-t2v``: empty files under the release's names, since the checks only look at
names); without it, the only problems are the placeholder paths a user edits, each named."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mm.arguments import ConfigError, load_config, parse_flags

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples/stepvideo/t2v"
PRETRAIN = "examples/stepvideo/t2v/pretrain_t2v.sh"
INFERENCE = "examples/stepvideo/t2v/inference_t2v.sh"
WEIGHTS = "./weights/stepvideo-t2v"  # the placeholder the JSONs point at
HEADS_48 = "1, 2, 3, 4, 6, 8, 12, 16, 24, 48"
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD_DIR/argv"
env > "$RECORD_DIR/env"
echo "fake torchrun ran"
"""
# variables of the scripts' first blocks that a developer's shell may hold
CLEARED = ("MM_ACCELERATOR", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "TP", "PP", "VP",
           "CP", "CP_ALGO", "CP_WINDOW", "ULYSSES", "MBS", "GBS", "MM_DATA", "MM_MODEL", "LOAD_PATH", "LOAD_ARGS",
           "SAVE_PATH", "CKPT_FORMAT", "CFG_PARALLEL", "DIST_TIMEOUT_MINUTES", "CUDA_DEVICE_MAX_CONNECTIONS",
           "HCCL_EXEC_TIMEOUT", "HCCL_CONNECT_TIMEOUT", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "LD_LIBRARY_PATH")


def fake_release(root: Path) -> Path:
    """The release's layout (stepfun-ai/stepvideo-t2v, as MindSpeed-MM's guide lists it) with empty files;
    the safetensors indexes name their shards."""
    files = ["transformer/config.json", *[f"transformer/diffusion_pytorch_model-{i:05d}-of-00006.safetensors"
                                          for i in range(1, 7)],
             "vae/vae.safetensors", "vae/vae_v2.safetensors",
             "step_llm/config.json", *[f"step_llm/model-{i:05d}-of-00009.safetensors" for i in range(1, 10)],
             "step_llm/step1_chat_tokenizer.model",
             "hunyuan_clip/clip_text_encoder/config.json", "hunyuan_clip/clip_text_encoder/pytorch_model.bin",
             *[f"hunyuan_clip/tokenizer/{name}" for name in ("special_tokens_map.json", "tokenizer_config.json",
                                                            "vocab.txt", "vocab_org.txt")]]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    for directory, index, count in (("transformer", "diffusion_pytorch_model.safetensors.index.json", 6),
                                    ("step_llm", "model.safetensors.index.json", 9)):
        shards = sorted(p.name for p in (root / directory).glob("*.safetensors"))
        assert len(shards) == count
        (root / directory / index).write_text(json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}}))
    return root


@pytest.fixture
def workdir(tmp_path):
    """A directory laid out as the repository root a user runs from: examples/ (the repository's) and
    ./weights/stepvideo-t2v (the stand-in release)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    fake_release(work / WEIGHTS)
    return work


@pytest.fixture
def launcher(tmp_path):
    """Runs a script with the fake torchrun; returns (torchrun's own options, entry point, its flags, its environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)

    def run(script: str, **overrides: str):
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        # MM_PREFLIGHT=0: the scripts' JSONs point at placeholder weights and data, which the pre-flight check
        # rightly refuses (test_example_scripts.py runs it on real assets)
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_DIR=str(tmp_path),
                   LOG_DIR=str(tmp_path / "logs"), **{"MM_PREFLIGHT": "0", **overrides})
        (tmp_path / "argv").unlink(missing_ok=True)
        result = subprocess.run(["bash", str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        argv = (tmp_path / "argv").read_text().splitlines()
        entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        own = dict(zip(argv[:entry:2], argv[1:entry:2]))
        recorded = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
        return own, argv[entry], argv[entry + 1:], recorded

    return run


def _train(flags: list[str], world: int):
    from mm.training.checks import check_task

    config = load_config(flags, world_size=world, mode="train")
    # files=False: data.txt and the output directories are placeholders users edit
    check_task("t2v", config, files=False)
    return config


def _model_copy(tmp_path: Path, name: str, **predictor) -> str:
    model = json.loads((EXAMPLES / name).read_text())
    model["predictor"].update(predictor)
    path = tmp_path / name
    path.write_text(json.dumps(model))
    return str(path)


def test_scripts_are_valid_bash_and_the_jsons_use_the_releases_layout():
    scripts = sorted(str(p.relative_to(REPO)) for p in EXAMPLES.glob("*.sh"))
    assert scripts == [INFERENCE, PRETRAIN]
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
    for name in ("pretrain_t2v_model.json", "inference_t2v_model.json"):
        model = json.loads((EXAMPLES / name).read_text())
        assert model["ae"]["from_pretrained"] == f"{WEIGHTS}/vae"
        assert [(t["model_id"], t["from_pretrained"]) for t in model["text_encoder"]] == [
            ("StepLLmModel", f"{WEIGHTS}/step_llm"), ("BertModel", f"{WEIGHTS}/hunyuan_clip/clip_text_encoder")]
        assert model["predictor"]["from_pretrained"] is None  # the converted DiT comes with --load
    tokenizers = json.loads((EXAMPLES / "data.json").read_text())["dataset_param"]["tokenizer_config"]
    assert [(t["autotokenizer_name"], t["from_pretrained"], t["model_max_length"]) for t in tokenizers] == [
        ("stepchat", f"{WEIGHTS}/step_llm/step1_chat_tokenizer.model", 320),
        ("BertTokenizer", f"{WEIGHTS}/hunyuan_clip/tokenizer", 77)]


def test_pretrain_defaults_pass_the_parser_validation_and_the_task_check(launcher, workdir, monkeypatch, tmp_path):
    from mm.data.dataset import VideoDataConfig
    from mm.families import resolve
    from mm.families.stepvideo.recipe import objective_config

    own, entry, flags, env = launcher(PRETRAIN)
    assert (entry, own["--nproc_per_node"], own["--nnodes"], own["--node_rank"]) == ("pretrain_t2v.py", "8", "1", "0")
    assert (own["--master_addr"], own["--master_port"]) == ("localhost", "29501")
    parse_flags(flags, prog=entry)
    monkeypatch.chdir(workdir)
    config = _train(flags, 8)
    args, model, data = config.args, config.model, config.data
    # MindSpeed-MM's layout and optimizer: TP8 with sequence parallelism, full recompute of all 48 layers,
    # the distributed optimizer
    assert (config.sizes.tensor_parallel, config.sizes.context_parallel, config.sizes.pipeline_parallel,
            config.sizes.data_parallel) == (8, 1, 1, 1)
    assert args.sequence_parallel and args.global_batch_size == 1 and args.micro_batch_size == 1
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 48)
    assert args.use_distributed_optimizer and args.bf16
    assert (args.lr, args.min_lr, args.adam_beta1, args.adam_beta2, args.adam_eps) == (1e-5, 1e-5, 0.9, 0.999, 1e-15)
    assert (args.weight_decay, args.clip_grad, args.train_iters, args.num_workers) == (1e-2, 1.0, 5000, 8)
    # the converted DiT for this TP, weights only
    assert (args.load, args.save, args.ckpt_format) == ("mm_ckpt/stepvideo-t2v/dit-tp8-pp1", None, "torch")
    assert args.no_load_optim and args.no_load_rng
    # the collective timeout and NCCL's heartbeat monitor follow it
    assert args.distributed_timeout_minutes == 30 and env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "1800"
    # the model: the release's 30B DiT, VAE and two encoders; the release's flow matching
    family, arch = resolve(model.predictor)
    assert family.name == "stepvideo" and (arch.num_layers, arch.num_heads, arch.hidden_size) == (48, 48, 6144)
    assert (arch.llm_channels, arch.clip_channels, arch.patch_size) == (6144, 1024, (1, 1, 1))
    assert (model.ae.model_id, model.ae.params["version"], model.ae.params["z_channels"]) == ("stepvideovae", 2, 64)
    objective = objective_config(model.diffusion)
    assert (objective.shift, objective.reverse, objective.num_train_timesteps) == (13.0, False, 1000)
    # the data: MindSpeed-MM's 136 frames at 544 x 992, 8 fps; 136 = 8 chunks of 17 -> 24 latent frames
    video = VideoDataConfig.from_json(data.preprocess, data.dataset_type)
    assert video.buckets == [(136, 544, 992)] and video.train_fps == 8.0 and data.dataset_type == "t2v"
    assert family.frames(model.ae).latent_frames(136) == 24
    assert len(list((tmp_path / "logs").glob("train_*.log"))) == 1


def test_pretrain_without_the_release_names_each_placeholder(launcher, monkeypatch):
    _, _, flags, _ = launcher(PRETRAIN)
    monkeypatch.chdir(REPO)  # no ./weights here
    with pytest.raises(ConfigError) as error:
        _train(flags, 8)
    problems = error.value.problems
    assert [p.split(" = ")[0] for p in problems] == [
        "ae.from_pretrained", "text_encoder[0].from_pretrained", "text_encoder[1].from_pretrained",
        "dataset_param.tokenizer_config[0].from_pretrained", "dataset_param.tokenizer_config[1].from_pretrained"]
    assert all(f"'{WEIGHTS}/" in p and "no such" in p for p in problems), problems


def test_pretrain_layouts(launcher, workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)

    def config_of(**env):
        _, _, flags, _ = launcher(PRETRAIN, **env)
        world = int(env.get("GPUS_PER_NODE", 8)) * int(env.get("NNODES", 1))
        return _train(flags, world)

    config = config_of(TP="4", CP="2")
    assert (config.sizes.tensor_parallel, config.sizes.ulysses_degree) == (4, 2)
    assert config.args.load == "mm_ckpt/stepvideo-t2v/dit-tp4-pp1"  # LOAD_PATH follows TP and PP
    config = config_of(TP="2", CP="4", CP_ALGO="hybrid_cp_algo", ULYSSES="2")
    assert (config.sizes.ulysses_degree, config.args.use_cp_send_recv_overlap) == (2, True)
    config = config_of(TP="1", CP="8", CP_ALGO="megatron_cp_algo")
    assert config.sizes.context_parallel == 8 and config.sizes.ulysses_degree == 1
    # two nodes of 8 on 80 GB cards: TP8 x PP2 with stage 0 (which holds the encoders) lighter
    model = _model_copy(tmp_path, "pretrain_t2v_model.json", pipeline_num_layers=[16, 32])
    config = config_of(NNODES="2", PP="2", MM_MODEL=model)
    assert (config.sizes.tensor_parallel, config.sizes.pipeline_parallel, config.sizes.data_parallel) == (8, 2, 1)
    assert config.args.load == "mm_ckpt/stepvideo-t2v/dit-tp8-pp2"
    # 48 heads do not split over TP 5 or TP 2 x Ulysses 5: refused with the valid products
    for env, product in (({"GPUS_PER_NODE": "5", "TP": "5"}, "(5) x Ulysses degree (1"),
                         ({"GPUS_PER_NODE": "10", "TP": "2", "CP": "5"}, "(2) x Ulysses degree (5")):
        with pytest.raises(ConfigError) as error:
            config_of(**env)
        assert f"predictor.num_heads = 48 is not divisible by --tensor-model-parallel-size {product}" in str(error.value)
        assert f"among the divisors of 48 ({HEADS_48})" in str(error.value)
    # resuming: LOAD_PATH = SAVE_PATH with everything loaded
    config = config_of(SAVE_PATH="ckpt", LOAD_PATH="ckpt", LOAD_ARGS="")
    assert (config.args.save, config.args.load, config.args.no_load_optim) == ("ckpt", "ckpt", False)


def test_inference_defaults_and_the_sampling_section(launcher, workdir, monkeypatch):
    from mm.families.stepvideo.recipe import objective_config
    from mm.families.stepvideo.sampler import NEGATIVE_PROMPT, POSITIVE_SUFFIX
    from mm.inference.runner import sampling_config

    own, entry, flags, env = launcher(INFERENCE)
    assert entry == "inference.py" and own["--nproc_per_node"] == "8" and own["--master_port"] == "29505"
    parse_flags(flags, prog=entry)
    monkeypatch.chdir(workdir)
    config = load_config(flags, world_size=8, mode="inference")
    # TP2 x Ulysses 4 on 8 GPUs: 48 % 8 == 0; the DiT's 58.7 GB in halves
    assert (config.sizes.tensor_parallel, config.sizes.context_parallel, config.sizes.ulysses_degree,
            config.sizes.data_parallel) == (2, 4, 4, 1)
    assert config.args.context_parallel_algo == "ulysses_cp_algo" and not config.args.cfg_parallel
    assert config.args.bf16 and config.args.distributed_timeout_minutes == 30
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "1800"
    assert config.args.load == "mm_ckpt/stepvideo-t2v/dit-tp2-pp1"
    sampling = sampling_config(config)
    # the release's video, guidance and prompt additions
    assert (sampling.task, sampling.num_frames, sampling.height, sampling.width, sampling.fps) == \
        ("t2v", 204, 544, 992, 25)
    assert sampling.guidance_scale == 9.0 and sampling.seed == 42
    assert (sampling.prompt_suffix, sampling.negative_prompt) == (POSITIVE_SUFFIX, NEGATIVE_PROMPT)
    assert sampling.model_max_length == (320, 77) and sampling.t5_fsdp and not sampling.dit_fsdp
    assert len(sampling.prompts) == 3 and sampling.prompts[0].startswith("一名宇航员在月球上")
    assert Path(sampling.save_path).is_dir()  # made and probed (here under the work directory)
    # the sampler: 50 Euler steps with time shift 13
    objective = objective_config(config.model.diffusion)
    assert (objective.num_inference_timesteps, objective.shift, objective.solver) == (50, 13.0, "euler")
    assert len(objective.sampler().timesteps) == 50
    # 204 frames: 12 chunks of 17 -> 36 latent frames; 544 x 992 -> 34 x 62: 75888 tokens
    from mm.families import resolve

    family, _ = resolve(config.model.predictor)
    assert family.frames(config.model.ae).latent_frames(204) * (544 // 16) * (992 // 16) == 75888


@pytest.mark.parametrize("env,sizes", [
    ({"CFG_PARALLEL": "1", "CP": "2"}, (2, 2, 2)),                      # TP2 x CP2, a CFG pair
    ({"TP": "4", "CP": "2"}, (4, 2, 1)),
    ({"TP": "8", "CP": "1"}, (8, 1, 1)),
    ({"GPUS_PER_NODE": "4", "TP": "2", "CP": "2"}, (2, 2, 1)),
    ({"GPUS_PER_NODE": "4", "TP": "4", "CP": "1"}, (4, 1, 1)),          # MindSpeed-MM's
    ({"GPUS_PER_NODE": "3", "TP": "3", "CP": "1"}, (3, 1, 1)),          # 48 heads split in 3
    ({"GPUS_PER_NODE": "2", "TP": "2", "CP": "1"}, (2, 1, 1)),
    ({"GPUS_PER_NODE": "16", "TP": "2", "CP": "8"}, (2, 8, 1)),
    ({"GPUS_PER_NODE": "5", "TP": "1", "CP": "5", "CP_ALGO": "megatron_cp_algo"}, (1, 5, 1)),  # ring: any CP
], ids=["tp2-cp2-cfg", "tp4-cp2", "tp8", "4gpu-tp2-cp2", "4gpu-tp4", "3gpu-tp3", "2gpu-tp2", "16gpu-tp2-cp8",
        "5gpu-ring5"])
def test_inference_layouts_of_the_header(launcher, workdir, monkeypatch, env, sizes):
    from mm.inference.runner import sampling_config

    _, _, flags, _ = launcher(INFERENCE, **env)
    monkeypatch.chdir(workdir)
    config = load_config(flags, world_size=int(env.get("GPUS_PER_NODE", 8)), mode="inference")
    assert (config.sizes.tensor_parallel, config.sizes.context_parallel, config.sizes.data_parallel) == sizes
    assert config.args.load == f"mm_ckpt/stepvideo-t2v/dit-tp{sizes[0]}-pp1"
    sampling_config(config)


def test_inference_refusals_name_the_layout_and_the_files(launcher, workdir, monkeypatch):
    from mm.inference.runner import sampling_config

    monkeypatch.chdir(workdir)
    for env, product in (({"GPUS_PER_NODE": "5", "TP": "1", "CP": "5"}, "(1) x Ulysses degree (5"),
                         ({"GPUS_PER_NODE": "5", "TP": "5", "CP": "1"}, "(5) x Ulysses degree (1"),
                         ({"GPUS_PER_NODE": "10", "TP": "2", "CP": "5"}, "(2) x Ulysses degree (5")):
        _, _, flags, _ = launcher(INFERENCE, **env)
        with pytest.raises(ConfigError) as error:
            load_config(flags, world_size=int(env["GPUS_PER_NODE"]), mode="inference")
        assert f"predictor.num_heads = 48 is not divisible by --tensor-model-parallel-size {product}" in str(error.value)
        assert f"among the divisors of 48 ({HEADS_48})" in str(error.value)
    # CFG pairs need an even data-parallel size: TP2 x CP4 on 8 leaves 1
    _, _, flags, _ = launcher(INFERENCE, CFG_PARALLEL="1")
    with pytest.raises(ConfigError, match="--cfg-parallel pairs data-parallel ranks; the data-parallel size is 1"):
        sampling_config(load_config(flags, world_size=8, mode="inference"))
    # no converted DiT and no predictor.from_pretrained: nothing to take the DiT's weights from
    _, _, flags, _ = launcher(INFERENCE, LOAD_PATH="")
    with pytest.raises(ConfigError, match="predictor.from_pretrained"):
        sampling_config(load_config(flags, world_size=8, mode="inference"))
    # without the release: the placeholders, each named
    _, _, flags, _ = launcher(INFERENCE)
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as error:
        sampling_config(load_config(flags, world_size=8, mode="inference"))
    problems = error.value.problems
    assert [p.split(" = ")[0] for p in problems[:3]] == [
        "ae.from_pretrained", "text_encoder[0].from_pretrained", "text_encoder[1].from_pretrained"]
    assert all(f"'{WEIGHTS}/" in p and "no such" in p for p in problems[:3]), problems


def test_a_missing_release_does_not_misreport_the_frame_count(launcher, monkeypatch):
    from mm.inference.runner import sampling_config

    _, _, flags, _ = launcher(INFERENCE)
    monkeypatch.chdir(REPO)  # no ./weights here
    with pytest.raises(ConfigError) as error:
        sampling_config(load_config(flags, world_size=8, mode="inference"))
    assert not [p for p in error.value.problems if p.startswith("inference.num_frames")], error.value.problems
