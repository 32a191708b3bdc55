"""Installs mm (the training/inference package) and checkpoint (the weight converter)."""

from setuptools import find_packages, setup

setup(
    name="mm",
    version="0.1.0",
    description="Megatron-style parallel training and inference for video diffusion transformers",
    python_requires=">=3.12",
    packages=find_packages(include=["mm", "mm.*", "checkpoint", "checkpoint.*"]),
    install_requires=[
        "torch==2.11.0",
        "megatron-core>=0.19,<0.20",
        "transformers>=5.17",
        "safetensors>=0.8",
        "einops>=0.8",
        "numpy>=2.0",
        "jsonargparse>=4.40",
        "tensorboard>=2.20",
        "tqdm>=4.66",
        "av>=14",
        "psutil>=5.9",
        "docstring-parser>=0.16",
        "sentencepiece>=0.2",
        "ftfy>=6.1",
        "regex>=2023.0",
    ],
    entry_points={"console_scripts": ["mm-convert=checkpoint.cli:main", "mm-plan=mm.plan.cli:main"]},
    extras_require={
        "video": ["decord==0.6.0"],
        "npu": ["torch_npu"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "diffusers>=0.35", "peft>=0.17"],
    },
)
