"""Start-up validation and the CP scaling benchmark as a user runs them: torchrun, real flags and JSONs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = {"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 48, "ffn_dim": 64,
                       "in_dim": 4, "out_dim": 4, "freq_dim": 16, "text_dim": 16}}
DATA = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": "data.txt"}}}


def _pretrain_args(tmp_path, *flags):
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    (tmp_path / "data.json").write_text(json.dumps(DATA))
    return ["pretrain_t2v.py", "--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
            "--lr", "1e-3", "--train-iters", "2", *flags]


def _torchrun(nproc: int, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_configuration_stops_before_any_process_group(tmp_path):
    result = _torchrun(4, _pretrain_args(tmp_path, "--tensor-model-parallel-size", "3"), timeout=120)
    assert result.returncode != 0
    assert "pretrain_t2v.py: error: invalid configuration" in result.stderr
    assert "world size 4 is not divisible by --tensor-model-parallel-size (3)" in result.stderr
    assert "rank(s) on" not in result.stdout  # nothing was started


def test_unknown_flag_stops_the_run(tmp_path):
    result = _torchrun(2, _pretrain_args(tmp_path, "--tensor-model-paralel-size", "2"), timeout=120)
    assert result.returncode != 0 and "unrecognized arguments: --tensor-model-paralel-size" in result.stderr


def test_cp_scaling_benchmark_runs_on_cpu(tmp_path):
    model = tmp_path / "model.json"
    model.write_text('{"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 48, '
                     '"ffn_dim": 64, "in_dim": 4, "out_dim": 4, "freq_dim": 16, "text_dim": 16}}')
    result = _torchrun(2, ["benchmarks/cp_scaling.py", "--accelerator", "cpu", "--model", str(model), "--latent",
                           "3", "8", "12", "--text-len", "16", "--repeats", "1", "--context-parallel-algo",
                           "megatron_cp_algo", "--use-cp-send-recv-overlap"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"algo": "megatron_cp_algo", "cp": 2' in result.stdout and '"tokens": 72' in result.stdout


def test_the_dit_step_benchmark_runs_each_variant_in_its_own_process(tmp_path):
    """benchmarks/wan_dit_step.py on the CPU (a smoke run): a variant that fails (a kernel the CPU has
    not) is reported and the next one still runs, each in a process of its own; an out-of-memory inside
    a collective (NCCL's "Failed to CUDA calloc") reads as OOM."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import wan_dit_step
    finally:
        sys.path.pop(0)
    assert wan_dit_step.is_oom(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp: unhandled cuda error, NCCL "
                                            "version 2.27.3: Failed to CUDA calloc 2097152 bytes"))
    assert not wan_dit_step.is_oom(RuntimeError("No module named 'flash_attn_3._C'"))
    model = tmp_path / "model.json"
    model.write_text('{"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 48, '
                     '"ffn_dim": 64, "in_dim": 4, "out_dim": 4, "freq_dim": 16, "text_dim": 16}}')
    cmd = [sys.executable, "benchmarks/wan_dit_step.py", "--accelerator", "cpu", "--model", str(model), "--latent",
           "2", "4", "4", "--text-len", "8", "--repeats", "1", "--warmups", "0", "--peak-tflops", "1",
           "--variants", "mm:none@flash", "mm:full"]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("mm:")}
    assert rows["mm:none@flash"][0] == "error" and rows["mm:full"][0] not in ("error", "OOM"), result.stdout
    assert "each variant in its own process" in result.stdout
    # another family's DiT (Open-Sora-Plan), compiled and with op-level recompute; diffusers is Wan's only
    osp = tmp_path / "osp.json"
    osp.write_text('{"predictor": {"model_id": "videoditsparse", "num_layers": 4, "num_heads": 2, "head_dim": 12, '
                   '"in_channels": 4, "out_channels": 4, "cross_attention_dim": 24, "caption_channels": 16, '
                   '"sparse1d": true, "sparse_n": 2}}')
    cmd[cmd.index("--model") + 1] = str(osp)
    # and its LoRA fine-tuning (+loraR: the DiT frozen, adapters on MindSpeed-MM's module names as that family reads them)
    result = subprocess.run(cmd[:cmd.index("--variants")] + ["--optimizer", "--variants", "mm:layernorm+mlp",
                                                             "mm+lora4:block2", "--lora-target-modules", "proj_q",
                                                             "proj_out"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in ("mm:layernorm+mlp", "mm+lora4:block2"):
        row = next(line.split() for line in result.stdout.splitlines() if line.startswith(variant))
        assert float(row[1]) > 0, result.stdout
    assert "4 layers, hidden 24" in result.stdout and "+loraR: adapters on proj_q proj_out" in result.stdout
    refused = subprocess.run(cmd[:cmd.index("--variants")] + ["--in-process", "--variants", "diffusers:ckpt"],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode != 0 and "diffusers variants are Wan's" in refused.stderr, refused.stderr[-2000:]


def test_saved_tensor_accounting_sees_what_recompute_drops(tmp_path):
    """benchmarks/saved_tensors.py on the CPU: the FFN's saved activations are listed per module, and
    gone with --recompute mlp (megatron's selective recompute of the FFN)."""
    model = tmp_path / "model.json"
    model.write_text('{"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 48, '
                     '"ffn_dim": 64, "in_dim": 4, "out_dim": 4, "freq_dim": 16, "text_dim": 16}}')
    tables = {}
    for recompute in ("none", "mlp", "layernorm"):
        cmd = [sys.executable, "benchmarks/saved_tensors.py", "--accelerator", "cpu", "--model", str(model),
               "--latent", "2", "4", "4", "--text-len", "8", "--recompute", recompute, "--json",
               str(tmp_path / f"{recompute}.json")]
        result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        tables[recompute] = json.loads((tmp_path / f"{recompute}.json").read_text())["rows"]
    ffn = [r for r in tables["none"] if r["module"].startswith("blocks.0.mlp")]
    assert {"module": "blocks.0.mlp.linear_fc1", "dtype": "bfloat16", "shape": [8, 1, 48], "bytes": 8 * 48 * 2} in ffn
    assert [r for r in tables["mlp"] if r["module"].startswith("blocks.0.mlp")] == []
    assert sum(r["bytes"] for r in tables["mlp"]) < sum(r["bytes"] for r in tables["none"])
    # op-level recompute: autograd saves only the layer's inputs (the checkpoint keeps its matmul and
    # attention outputs itself); without it the layer saves fp32 tensors of the hidden size
    layer = {k: [r for r in rows if r["module"].startswith("blocks.0")] for k, rows in tables.items()}
    assert {r["module"] for r in layer["layernorm"]} == {"blocks.0"}
    assert any(r["dtype"] == "float32" and r["shape"] == [8, 1, 48] for r in layer["none"])
    assert not any(r["dtype"] == "float32" and r["shape"] == [8, 1, 48] for r in layer["layernorm"])
