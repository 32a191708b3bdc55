"""The training data loader from a validated data JSON: samples, buckets, tokenizers, sampler."""

from __future__ import annotations

import logging

import torch

from mm.arguments.json_configs import DataConfig
from mm.data.dataset import VideoDataConfig, VideoDataset, collate
from mm.data.sampler import BucketSampler
from mm.data.sources import read_data_txt

logger = logging.getLogger(__name__)


def build_video_dataset(data: DataConfig, data_parallel_rank: int = 0, tokenizer_factory=None,
                        max_lengths: list[int] | None = None) -> VideoDataset:
    """The data JSON's samples through its preprocessing, with a tokenizer per ``tokenizer_config``
    entry (``use_text_processer``). The samples are ``data.sources`` when the configuration check read
    them already, else data.txt's. ``tokenizer_factory``: a ``tokenizer_config`` entry -> its tokenizer
    (default: transformers' AutoTokenizer of its ``from_pretrained``); ``max_lengths``: each tokenizer's
    length where its entry has no ``model_max_length`` (default 512)."""
    samples, dropped = data.sources if data.sources is not None else read_data_txt(data.data_path)
    if dropped and data_parallel_rank == 0:
        logger.warning("data: %d annotation entries left out at start-up (%s)", sum(dropped.values()), dict(dropped))
    tokenizers = []  # (tokenizer, max_length) of each text encoder
    if data.use_text_processer:
        if tokenizer_factory is None:
            from transformers import AutoTokenizer

            def tokenizer_factory(entry: dict):
                return AutoTokenizer.from_pretrained(entry["from_pretrained"])

        lengths = list(max_lengths or [])
        tokenizers = [(tokenizer_factory(t), int(t.get("model_max_length", lengths[i] if i < len(lengths) else 512)))
                      for i, t in enumerate(data.tokenizers) if t.get("from_pretrained")]
    dataset = VideoDataset(samples, VideoDataConfig.from_json(data.preprocess, data.dataset_type), tokenizers,
                           text_clean=data.text_clean)
    if dataset.dropped and data_parallel_rank == 0:
        logger.warning("data: %s", dict(dataset.dropped))
    return dataset


def build_video_dataloader(data: DataConfig, micro_batch_size: int, data_parallel_rank: int,
                           data_parallel_size: int, consumed_samples: int = 0, num_workers: int = 2,
                           seed: int = 1234, pin_memory: bool = False, tokenizer_factory=None,
                           max_lengths: list[int] | None = None) -> tuple[torch.utils.data.DataLoader, VideoDataset]:
    """Batches of one bucket each, this DP rank's share, resuming after ``consumed_samples``;
    ``pin_memory`` (GPU/NPU runs) makes the host-to-device copy of each batch asynchronous. The dataset
    is ``build_video_dataset``'s."""
    dataset = build_video_dataset(data, data_parallel_rank, tokenizer_factory, max_lengths)
    sampler = BucketSampler(dataset.bucket_of, micro_batch_size, data_parallel_rank, data_parallel_size,
                            consumed_samples=consumed_samples, seed=seed,
                            shuffle=bool(data.dataloader.get("shuffle", True)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None,
                                         persistent_workers=num_workers > 0,
                                         pin_memory=pin_memory and data.dataloader.get("pin_memory") is not False)
    return loader, dataset
