"""mm-convert on a full-size Wan2.1-1.3B DiT of random weights: throughput and peak memory.

    .venv/bin/python benchmarks/convert_wan.py --work outputs/bench/convert_wan --tp 2 --pp-layers '[15,15]'

Makes (once) a diffusers-layout directory of random bf16 weights with Wan2.1-T2V-1.3B's shapes
(several safetensors files and an index, as diffusers saves them), then runs
``python -m checkpoint WanConverter --version wan2.1 hf_to_mm`` on it in a child process and reports
the seconds, MiB/s of weights written, the child's peak resident set size (ru_maxrss) and, for
comparison in the same run, the peak RSS of the same interpreter that only imports the converter
and the MiB/s of copying the source files (the disk's pace)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

WAN21_1_3B = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
              "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
              "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
              "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


def make_source(directory: Path, max_file_bytes: int = 2 * 2**30) -> int:
    """Random bf16 weights under diffusers' names in files of at most ``max_file_bytes``."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    config = {k: v for k, v in WAN21_1_3B.items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanTransformer3DModel(**config).state_dict().items()}
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    files, current, size, total = [], {}, 0, 0
    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if current and size + nbytes > max_file_bytes:
            files.append(current)
            name = f"part{len(files)}.safetensors"
            save_file(current, str(directory / name))
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
        total += nbytes
    files.append(current)
    save_file(current, str(directory / f"part{len(files)}.safetensors"))
    weight_map = {}
    for i, keys in enumerate(files, start=1):
        final = f"diffusion_pytorch_model-{i:05d}-of-{len(files):05d}.safetensors"
        (directory / f"part{i}.safetensors").rename(directory / final)
        weight_map.update({k: final for k in keys})
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(WAN21_1_3B))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="outputs/bench/convert_wan")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp-layers", default="[15,15]")
    args = parser.parse_args()
    work = Path(args.work)
    source = work / "hf"
    if not (source / "config.json").is_file():
        shutil.rmtree(source, ignore_errors=True)
        print(f"making {source}: {make_source(source) / 2**30:.2f} GiB of bf16 weights", flush=True)
    target = work / "mm"
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", "hf_to_mm",
           "--cfg.source_path", str(source), "--cfg.target_path", str(target),
           "--cfg.target_parallel_config.tp_size", str(args.tp),
           "--cfg.target_parallel_config.pp_layers", args.pp_layers]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # the same interpreter with the converter's imports and nothing converted: the floor of the RSS
    subprocess.run([sys.executable, "-c", "import checkpoint.cli, mm.families.wan.convert, torch"], cwd=REPO, env=env,
                   check=True, capture_output=True)
    baseline = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    # the disk's own pace in the same run: copying the source files (read + write + fsync)
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    start_copy = time.perf_counter()
    shutil.copytree(source, copy)
    for f in copy.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    copy_seconds = time.perf_counter() - start_copy
    copied = sum(p.stat().st_size for p in copy.iterdir())
    shutil.rmtree(copy)
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    largest = max(p.stat().st_size for p in target.rglob("*.pt"))
    print(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"command": " ".join(cmd[1:]), "source_gib": round(source_bytes / 2**30, 3),
                      "written_gib": round(written / 2**30, 3), "seconds": round(seconds, 2),
                      "mib_per_s": round(written / 2**20 / seconds, 1),
                      "copy_mib_per_s": round(copied / 2**20 / copy_seconds, 1),
                      "peak_rss_gib": round(peak / 2**30, 3), "imports_only_rss_gib": round(baseline / 2**30, 3),
                      "largest_shard_gib": round(largest / 2**30, 3)}, indent=2))


if __name__ == "__main__":
    main()
