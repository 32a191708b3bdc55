"""Flags, model JSON, data JSON and every validation rule, each with the message it must give."""

from __future__ import annotations

import json

import pytest

from mm.arguments import ConfigError, load_config, parse_flags

BASE_MODEL = {
    "predictor": {"model_id": "wan", "num_layers": 8, "num_heads": 12, "dtype": "bf16"},
    "ae": {"model_id": "wan_vae", "vae_cp_size": 1},
    "text_encoder": {"model_id": "umt5", "from_pretrained": "./weights/umt5"},
    "diffusion": {"model_id": "flow_matching"},
}
BASE_DATA = {
    "dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": "./data.txt", "data_folder": "."}},
    "dataloader_param": {"sampler_type": "LengthGroupedSampler", "shuffle": True},
}


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def _load(tmp_path, flags=(), model=None, data=None, world=8, mode="train", accelerator=None):
    m = _write(tmp_path, "model.json", BASE_MODEL if model is None else model)
    d = _write(tmp_path, "data.json", BASE_DATA if data is None else data)
    argv = ["--mm-model", m, "--mm-data", d, "--train-iters", "10", "--lr", "1e-4", *flags]
    return load_config(argv, world_size=world, mode=mode, accelerator=accelerator)


def _problems(tmp_path, **kwargs):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **kwargs)
    return "\n".join(info.value.problems)


def _model(**predictor):
    model = json.loads(json.dumps(BASE_MODEL))
    model["predictor"].update(predictor)
    return model


def test_valid_configuration_is_typed(tmp_path):
    cfg = _load(tmp_path, flags=["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                 "--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "2",
                                 "--sequence-parallel", "--bf16", "--global-batch-size", "4"])
    assert cfg.args.tensor_model_parallel_size == 2 and cfg.args.sequence_parallel
    assert cfg.model.predictor.num_heads == 12 and cfg.model.predictor.dtype == "bf16"
    assert cfg.model.text_encoder[0].from_pretrained == "./weights/umt5"
    assert cfg.data.dataset_type == "t2v" and cfg.data.data_path == "./data.txt"
    assert cfg.sizes.data_parallel == 2 and cfg.sizes.ring_degree == 2 and cfg.sizes.cp_window_size == 2


def test_mindspeed_mm_opensoraplan_pretrain_flags_parse(tmp_path):
    # the GPT_ARGS / OUTPUT_ARGS of MindSpeed-MM's OpenSoraPlan 1.3 pretrain_t2v.sh
    flags = ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
             "--virtual-pipeline-model-parallel-size 1 --context-parallel-size 1 "
             "--context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 8 "
             "--lr 1e-5 --min-lr 1e-5 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-15 "
             "--lr-decay-style constant --weight-decay 1e-2 --lr-warmup-init 1e-5 --lr-warmup-iters 0 "
             "--clip-grad 1.0 --train-iters 5000 --no-gradient-accumulation-fusion --load ckpt --bf16 "
             "--recompute-granularity full --recompute-method block --recompute-num-layers 32 "
             "--use-distributed-optimizer --allow-tf32 --num-workers 4 --log-interval 1 "
             "--save-interval 10000 --eval-interval 10000 --eval-iters 10 --save out --ckpt-format torch "
             "--distributed-backend nccl --attention-mask-type general --use-cp-send-recv-overlap "
             "--cp-window-size 1 --optimization-level 2 --use-multiparameter-pipeline-model-parallel "
             "--variable-seq-lengths").split()
    cfg = _load(tmp_path, flags=flags, model=_model(num_layers=32), accelerator="cuda")
    assert cfg.virtual_pipeline_size is None and cfg.args.gradient_accumulation_fusion is False
    assert cfg.args.recompute_num_layers == 32 and cfg.args.adam_eps == 1e-15


def test_unknown_flag_is_an_error(tmp_path):
    assert "unrecognized arguments: --tensor-paralel-size" in _problems(tmp_path, flags=["--tensor-paralel-size", "2"])


def test_abbreviated_flag_is_an_error(tmp_path):
    assert "unrecognized arguments: --tensor-model" in _problems(tmp_path, flags=["--tensor-model", "2"])


def test_bad_choice_names_flag_and_choices(tmp_path):
    msg = _problems(tmp_path, flags=["--context-parallel-algo", "ring"])
    assert "--context-parallel-algo" in msg and "ulysses_cp_algo" in msg and "'ring'" in msg


def test_non_positive_size_is_an_error(tmp_path):
    assert "--tensor-model-parallel-size: must be an integer >= 1, got 0" in _problems(
        tmp_path, flags=["--tensor-model-parallel-size", "0"])


def test_missing_model_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--mm-model '.*nope.json': no such file"):
        load_config(["--mm-model", str(tmp_path / "nope.json")], world_size=1, mode="inference")


def test_invalid_json_reports_position(tmp_path):
    msg = _problems(tmp_path, model='{"predictor": {"model_id": "wan",}}')
    assert "--mm-model" in msg and "not valid JSON" in msg and "line 1" in msg


def test_unknown_model_key(tmp_path):
    model = dict(BASE_MODEL, predicter={})
    msg = _problems(tmp_path, model=model)
    assert "predicter: unknown key" in msg and "predictor" in msg


def test_wrong_json_type_names_key(tmp_path):
    msg = _problems(tmp_path, model=_model(num_heads="12"))
    assert "predictor.num_heads = '12': expected int" in msg


def test_boolean_is_not_a_number(tmp_path):
    assert "predictor.num_layers = True: expected int" in _problems(tmp_path, model=_model(num_layers=True))


def test_missing_data_path(tmp_path):
    data = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {}}}
    assert "dataset_param.basic_parameters.data_path is required" in _problems(tmp_path, data=data)


def test_bad_dataset_type(tmp_path):
    data = json.loads(json.dumps(BASE_DATA))
    data["dataset_param"]["dataset_type"] = "video"
    assert "dataset_param.dataset_type = 'video'; valid: t2v, i2v" in _problems(tmp_path, data=data)


# ---- the validation rules of the foundation issue, one test each

def test_heads_divisible_by_tp_times_ulysses(tmp_path):
    msg = _problems(tmp_path, flags=["--tensor-model-parallel-size", "2", "--context-parallel-size", "4"],
                    model=_model(num_heads=12))
    assert "predictor.num_heads = 12 is not divisible by --tensor-model-parallel-size (2) x Ulysses degree (4" in msg
    assert "= 8" in msg


def test_heads_rule_uses_ulysses_part_of_hybrid(tmp_path):
    _load(tmp_path, flags=["--context-parallel-size", "8", "--context-parallel-algo", "hybrid_cp_algo",
                           "--ulysses-degree-in-cp", "4"], model=_model(num_heads=12))
    msg = _problems(tmp_path, flags=["--context-parallel-size", "8", "--context-parallel-algo", "hybrid_cp_algo",
                                     "--ulysses-degree-in-cp", "8"], model=_model(num_heads=12))
    assert "--ulysses-degree-in-cp 8" in msg


def test_ring_attention_has_no_head_constraint(tmp_path):
    _load(tmp_path, flags=["--context-parallel-size", "8", "--context-parallel-algo", "megatron_cp_algo"],
          model=_model(num_heads=12))


def test_hybrid_needs_ulysses_degree(tmp_path):
    msg = _problems(tmp_path, flags=["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo"])
    assert "hybrid_cp_algo needs --ulysses-degree-in-cp" in msg


def test_hybrid_ulysses_degree_must_divide_cp_and_exceed_one(tmp_path):
    for u in ("3", "1"):
        msg = _problems(tmp_path, flags=["--context-parallel-size", "4", "--context-parallel-algo",
                                         "hybrid_cp_algo", "--ulysses-degree-in-cp", u])
        assert f"--ulysses-degree-in-cp {u} with --context-parallel-size 4" in msg and "valid: [2]" in msg


def test_cp_window_must_divide_cp(tmp_path):
    msg = _problems(tmp_path, flags=["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo",
                                     "--cp-window-size", "3"])
    assert "--cp-window-size 3 must divide the ring size (4" in msg and "valid: [1, 2, 4]" in msg


def test_cp_window_needs_a_ring(tmp_path):
    msg = _problems(tmp_path, flags=["--context-parallel-size", "4", "--cp-window-size", "2"],
                    model=_model(num_heads=12))
    assert "--cp-window-size 2 (double ring) needs --context-parallel-algo megatron_cp_algo or hybrid_cp_algo" in msg


def test_sequence_parallel_needs_tp(tmp_path):
    assert "--sequence-parallel needs --tensor-model-parallel-size > 1" in _problems(tmp_path, flags=["--sequence-parallel"])


def test_vpp_needs_pp(tmp_path):
    msg = _problems(tmp_path, flags=["--virtual-pipeline-model-parallel-size", "2"])
    assert "--virtual-pipeline-model-parallel-size 2 needs --pipeline-model-parallel-size > 1" in msg


def test_pipeline_num_layers_length_must_equal_pp(tmp_path):
    msg = _problems(tmp_path, flags=["--pipeline-model-parallel-size", "2"],
                    model=_model(pipeline_num_layers=[2, 2, 4]))
    assert "predictor.pipeline_num_layers = [2, 2, 4] has 3 stage(s) but --pipeline-model-parallel-size is 2" in msg


def test_pipeline_num_layers_sum_must_equal_num_layers(tmp_path):
    msg = _problems(tmp_path, flags=["--pipeline-model-parallel-size", "2"], model=_model(pipeline_num_layers=[4, 3]))
    assert "sums to 7 layers but predictor.num_layers = 8" in msg


def test_pipeline_num_layers_2d_shape_for_vpp(tmp_path):
    flags = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
             "--global-batch-size", "8"]
    _load(tmp_path, flags=flags, model=_model(pipeline_num_layers=[[2, 2], [2, 2]]))
    msg = _problems(tmp_path, flags=flags, model=_model(pipeline_num_layers=[[2, 2, 2], [1, 1, 0]]))
    assert "a 2-D layout needs 2 row(s) (--virtual-pipeline-model-parallel-size) of 2 stage(s)" in msg
    msg = _problems(tmp_path, flags=flags, model=_model(pipeline_num_layers=[4, 4]))
    assert "is 1-D but --virtual-pipeline-model-parallel-size is 2" in msg


def test_pipeline_num_layers_required_with_pp(tmp_path):
    msg = _problems(tmp_path, flags=["--pipeline-model-parallel-size", "2"])
    assert "--pipeline-model-parallel-size 2 needs predictor.pipeline_num_layers" in msg and "[4, 4]" in msg


def test_pipeline_num_layers_must_be_counts(tmp_path):
    msg = _problems(tmp_path, model=_model(pipeline_num_layers=[4, -1]))
    assert "predictor.pipeline_num_layers = [4, -1]: expected a non-empty list of layer counts" in msg


def test_vae_cp_not_with_pp(tmp_path):
    model = _model(pipeline_num_layers=[4, 4])
    model["ae"]["vae_cp_size"] = 2
    msg = _problems(tmp_path, flags=["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"],
                    model=model)
    assert "ae.vae_cp_size = 2 (VAE-CP) does not work with pipeline parallelism" in msg


def test_vae_cp_must_divide_tp_cp(tmp_path):
    model = _model()
    model["ae"]["vae_cp_size"] = 4
    msg = _problems(tmp_path, flags=["--context-parallel-size", "2"], model=model)
    assert "ae.vae_cp_size = 4 must divide TP x CP = 2" in msg


def test_encoder_dp_not_with_pp(tmp_path):
    model = dict(_model(pipeline_num_layers=[4, 4]), enable_encoder_dp=True)
    msg = _problems(tmp_path, flags=["--pipeline-model-parallel-size", "2"], model=model)
    assert "enable_encoder_dp = true does not work with pipeline parallelism" in msg


def test_encoder_dp_not_with_vae_cp(tmp_path):
    model = dict(_model(), enable_encoder_dp=True)
    model["ae"] = dict(model["ae"], vae_cp_size=2)
    msg = _problems(tmp_path, flags=["--context-parallel-size", "2"], model=model)
    assert "enable_encoder_dp = true does not work with VAE-CP (ae.vae_cp_size = 2)" in msg


def test_world_size_divisible_by_model_parallel(tmp_path):
    msg = _problems(tmp_path, flags=["--tensor-model-parallel-size", "3"], world=8, model=_model(num_heads=12))
    assert "world size 8 is not divisible by --tensor-model-parallel-size (3)" in msg and "= 3" in msg


def test_global_batch_divisible_by_micro_batch_times_dp(tmp_path):
    msg = _problems(tmp_path, flags=["--global-batch-size", "6", "--micro-batch-size", "2"], world=2)
    assert "--global-batch-size 6 is not divisible by --micro-batch-size (2) x data-parallel size (2" in msg
    assert "valid: multiples of 4" in msg


def test_precision_flags_exclusive(tmp_path):
    assert "--bf16 and --fp16 are mutually exclusive" in _problems(tmp_path, flags=["--bf16", "--fp16"])


def test_recompute_method_needs_full(tmp_path):
    msg = _problems(tmp_path, flags=["--recompute-method", "block", "--recompute-num-layers", "2"])
    assert "--recompute-method block needs --recompute-granularity full" in msg


def test_recompute_modules_need_selective(tmp_path):
    msg = _problems(tmp_path, flags=["--recompute-modules", "mlp"])
    assert ("--recompute-modules mlp needs --recompute-granularity selective, or full with --recompute-method "
            "block") in msg and "got --recompute-granularity None --recompute-method None" in msg
    cfg = _load(tmp_path, flags=["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"])
    assert cfg.args.recompute_modules == ["core_attn", "mlp"]
    full = ["--recompute-granularity", "full", "--recompute-num-layers", "2", "--recompute-modules", "layernorm"]
    msg = _problems(tmp_path, flags=full + ["--recompute-method", "uniform"])
    assert "got --recompute-granularity full --recompute-method uniform" in msg
    # block: the first 2 layers recomputed whole, layernorm in the others
    assert _load(tmp_path, flags=full + ["--recompute-method", "block"]).args.recompute_modules == ["layernorm"]
    msg = _problems(tmp_path, flags=full[:-1] + ["core_attn", "--recompute-method", "block"])
    assert "core_attn alone is megatron-core's default, ignored under full" in msg


def test_recompute_modules_choices(tmp_path):
    with pytest.raises(ConfigError, match="--recompute-modules.*invalid choice: 'moe'"):
        _load(tmp_path, flags=["--recompute-granularity", "selective", "--recompute-modules", "moe"])
    layernorm = ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp"]
    assert _load(tmp_path, flags=layernorm).args.recompute_modules == ["layernorm", "mlp"]
    msg = _problems(tmp_path, flags=layernorm + ["--context-parallel-size", "2"])
    assert "--recompute-modules layernorm is for runs without context parallelism (got --context-parallel-size 2)" in msg


def test_compile_dit_blocks_without_tp_or_cp(tmp_path):
    assert _load(tmp_path, flags=["--compile-dit-blocks"]).args.compile_dit_blocks
    msg = _problems(tmp_path, flags=["--compile-dit-blocks", "--tensor-model-parallel-size", "2"])
    assert "--compile-dit-blocks is for runs without tensor or context parallelism" in msg
    msg = _problems(tmp_path, flags=["--compile-dit-blocks", "--context-parallel-size", "2"])
    assert "--context-parallel-size 2" in msg
    m = _write(tmp_path, "model.json", BASE_MODEL)  # inference.py compiles its DiT(s) too, on one rank per video
    assert load_config(["--mm-model", m, "--compile-dit-blocks"], world_size=1, mode="inference").args.compile_dit_blocks
    with pytest.raises(ConfigError, match="--compile-dit-blocks is for runs without tensor or context parallelism"):
        load_config(["--mm-model", m, "--compile-dit-blocks", "--context-parallel-size", "2"], world_size=2,
                    mode="inference")


def test_causal_mask_rejected(tmp_path):
    assert "valid: general" in _problems(tmp_path, flags=["--attention-mask-type", "causal"])


def test_backend_must_match_accelerator(tmp_path):
    msg = _problems(tmp_path, flags=["--distributed-backend", "nccl"], accelerator="cpu")
    assert "--distributed-backend nccl does not match the accelerator 'cpu'; valid: gloo" in msg
    _load(tmp_path, flags=["--distributed-backend", "nccl"], accelerator="npu")  # MindSpeed-MM's NPU scripts


def test_training_needs_iters_lr_and_data(tmp_path):
    m = _write(tmp_path, "model.json", BASE_MODEL)
    with pytest.raises(ConfigError) as info:
        load_config(["--mm-model", m], world_size=1, mode="train")
    msg = "\n".join(info.value.problems)
    assert "--train-iters is required" in msg and "--lr is required" in msg and "--mm-data is required" in msg
    load_config(["--mm-model", m], world_size=1, mode="inference")


def test_checkpoint_flags(tmp_path):
    assert "--save-interval 5 needs --save" in _problems(tmp_path, flags=["--save-interval", "5"])
    assert "--ckpt-format: invalid choice: 'zarr' (choose from 'torch', 'torch_dist')" in _problems(
        tmp_path, flags=["--ckpt-format", "zarr"])
    args = _load(tmp_path, flags=["--save", "ckpt", "--load", "ckpt", "--save-interval", "5", "--exit-interval", "7",
                                  "--no-load-rng", "--finetune"]).args
    assert (args.save_interval, args.exit_interval, args.no_load_rng, args.finetune) == (5, 7, True, True)
    assert (args.load_fallback, args.keep_last_checkpoints) == (False, None)  # off, keep all


def test_load_fallback_and_keep_last_checkpoints(tmp_path):
    assert "--load-fallback needs --load" in _problems(tmp_path, flags=["--load-fallback"])
    assert "--keep-last-checkpoints 3 needs --save" in _problems(tmp_path, flags=["--keep-last-checkpoints", "3"])
    assert "--keep-last-checkpoints: must be an integer >= 1, got 0" in _problems(
        tmp_path, flags=["--save", "ckpt", "--keep-last-checkpoints", "0"])
    args = _load(tmp_path, flags=["--save", "ckpt", "--load", "ckpt", "--load-fallback", "--keep-last-checkpoints",
                                  "2"]).args
    assert (args.load_fallback, args.keep_last_checkpoints) == (True, 2)


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, flags=["--sequence-parallel", "--bf16", "--fp16"])
    assert len(info.value.problems) == 2
    assert str(info.value).startswith("invalid configuration:")


def test_parse_flags_defaults():
    args = parse_flags(["--mm-model", "m.json"])
    assert args.tensor_model_parallel_size == 1 and args.context_parallel_algo == "ulysses_cp_algo"
    assert args.cp_window_size == 1 and args.distributed_timeout_minutes == 10


def test_attention_kernel_must_exist_on_the_device(tmp_path):
    msg = _problems(tmp_path, flags=["--attention-kernel", "cudnn"], accelerator="cpu")
    assert "--attention-kernel cudnn is not available on 'cpu'; valid: auto, math" in msg
    _load(tmp_path, flags=["--attention-kernel", "flash"], accelerator="cuda")


def test_timestep_boundaries_checked(tmp_path):
    msg = _problems(tmp_path, flags=["--min-timestep-boundary", "1.5"])
    assert "--min-timestep-boundary 1.5: a fraction of the timestep schedule; valid: 0 to 1" in msg
    msg = _problems(tmp_path, flags=["--min-timestep-boundary", "0.9", "--max-timestep-boundary", "0.5"])
    assert "--min-timestep-boundary 0.9 must be below --max-timestep-boundary 0.5" in msg
    cfg = _load(tmp_path, flags=["--min-timestep-boundary", "0.9", "--max-timestep-boundary", "1"])
    from mm.families.wan.recipe import flow_matching_config

    flow = flow_matching_config(cfg.args, None)
    assert (flow.min_timestep, flow.max_timestep) == (900.0, 1000.0)


def test_wan_ulysses_and_ring_sizes_become_context_parallel_flags(tmp_path):
    def inference(section, flags=(), world=8):
        model = json.loads(json.dumps(BASE_MODEL))
        model["predictor"].update(num_heads=12)
        model["inference"] = dict(section, prompt="x")
        path = _write(tmp_path, "inference_model.json", model)
        return load_config(["--mm-model", path, *flags], world_size=world, mode="inference")

    config = inference({"ulysses_size": 4, "ring_size": 2})
    assert config.sizes.context_parallel == 8 and config.sizes.ulysses_degree == 4
    assert config.args.context_parallel_algo == "hybrid_cp_algo"
    config = inference({"ring_size": 4}, world=4)
    assert (config.sizes.context_parallel, config.args.context_parallel_algo) == (4, "megatron_cp_algo")
    config = inference({"ulysses_size": 2}, world=4)
    assert (config.sizes.context_parallel, config.args.context_parallel_algo) == (2, "ulysses_cp_algo")
    with pytest.raises(ConfigError) as info:
        inference({"ulysses_size": 2, "ring_size": 2}, flags=["--context-parallel-size", "2"])
    assert "ulysses_size x ring_size = 2 x 2 = 4, but --context-parallel-size 2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        inference({"ulysses_size": 0})
    assert "inference.ulysses_size = 0; valid: an integer >= 1" in str(info.value)


def test_vpp_needs_at_least_pp_micro_batches(tmp_path):
    flags = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
             "--micro-batch-size", "1"]
    model = _model(pipeline_num_layers=[[2, 2], [2, 2]])
    msg = _problems(tmp_path, flags=[*flags, "--global-batch-size", "1"], model=model, world=2)
    assert ("interleaving needs at least --pipeline-model-parallel-size (2) micro-batches; "
            "valid: --global-batch-size >= 2") in msg
    _load(tmp_path, flags=[*flags, "--global-batch-size", "2"], model=model, world=2)


def test_distributed_timeout_takes_fractions_of_a_minute():
    assert parse_flags(["--mm-model", "m.json", "--distributed-timeout-minutes", "0.5"]).distributed_timeout_minutes \
        == 0.5
    minutes = parse_flags(["--mm-model", "m.json", "--distributed-timeout-minutes", "30"]).distributed_timeout_minutes
    assert minutes == 30 and isinstance(minutes, int)
    for bad in ("0", "-1", "nan", "inf", "ten"):
        with pytest.raises(ConfigError, match="--distributed-timeout-minutes.*minutes > 0"):
            parse_flags(["--mm-model", "m.json", "--distributed-timeout-minutes", bad])


def test_text_encoder_fsdp_is_typed_and_off_by_default(tmp_path):
    assert not _load(tmp_path).model.text_encoder_fsdp
    cfg = _load(tmp_path, flags=["--tensor-model-parallel-size", "2"], model=dict(_model(), text_encoder_fsdp=True))
    assert cfg.model.text_encoder_fsdp
    msg = _problems(tmp_path, model=dict(_model(), text_encoder_fsdp="yes"))
    assert "text_encoder_fsdp" in msg


def test_text_encoder_fsdp_needs_two_stage0_ranks(tmp_path):
    msg = _problems(tmp_path, world=1, model=dict(_model(), text_encoder_fsdp=True))
    assert ("text_encoder_fsdp = true shards the text encoders over the ranks of pipeline stage 0 (world size 1 / "
            "--pipeline-model-parallel-size 1 = 1 rank here)") in msg
    # PP2 over 4 ranks: stage 0 has 2 ranks
    _load(tmp_path, world=4, flags=["--pipeline-model-parallel-size", "2"],
          model=dict(_model(pipeline_num_layers=[4, 4]), text_encoder_fsdp=True))


def test_text_encoder_fsdp_not_with_encoder_offload(tmp_path):
    msg = _problems(tmp_path, model=dict(_model(), text_encoder_fsdp=True, encoder_offload_interval=2))
    assert "text_encoder_fsdp = true does not work with encoder_offload_interval = 2" in msg
    assert "encoder_offload_interval 1, or text_encoder_fsdp false" in msg


def test_text_encoder_fsdp_with_encoder_dp_needs_a_sample_per_tp_cp_rank(tmp_path):
    model = dict(_model(), text_encoder_fsdp=True, enable_encoder_dp=True)
    msg = _problems(tmp_path, model=model, flags=["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                                  "--micro-batch-size", "2"])
    assert ("text_encoder_fsdp = true with enable_encoder_dp = true needs --micro-batch-size (2) >= TP x CP (4)"
            in msg) and "valid: --micro-batch-size >= 4" in msg
    _load(tmp_path, model=model, flags=["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"])


def test_text_encoder_fsdp_needs_a_text_encoder(tmp_path):
    model = dict(_model(), text_encoder_fsdp=True)
    del model["text_encoder"]
    msg = _problems(tmp_path, model=model)
    assert "text_encoder_fsdp = true shards the text encoders, but the model JSON has no text_encoder section" in msg


def test_text_encoder_fsdp_is_a_training_key(tmp_path):
    # sampling shards the text encoder with inference.t5_fsdp: the key does not stop a shared model JSON
    cfg = _load(tmp_path, world=1, mode="inference", model=dict(_model(), text_encoder_fsdp=True))
    assert cfg.model.text_encoder_fsdp


def test_lr_warmup_must_end_before_the_schedule(tmp_path):
    """megatron's OptimizerParamScheduler asserts warm-up < decay iterations on every rank; validation says so
    first (train_iters is 10 here)."""
    assert "--lr-warmup-iters 10 warm-up iterations, not fewer than the 10 of the LR schedule (--train-iters 10)" \
        in _problems(tmp_path, flags=["--lr-warmup-iters", "10"])
    assert "(--lr-decay-iters 4)" in _problems(tmp_path, flags=["--lr-warmup-iters", "5", "--lr-decay-iters", "4"])
    assert "--lr-warmup-fraction 1.0 x --train-iters 10 = 10" in _problems(tmp_path, flags=["--lr-warmup-fraction", "1"])
    assert _load(tmp_path, flags=["--lr-warmup-iters", "9"]).args.lr_warmup_iters == 9
    assert _load(tmp_path, flags=["--lr-warmup-iters", "20"], mode="inference") is not None
