"""DP-aware, bucketed, resumable batch sampler (megatron's ``consumed_samples`` convention).

Per epoch (seeded by ``seed + epoch``), each bucket's samples are shuffled and cut into global
micro-batches of ``micro_batch_size x data_parallel_size`` (an incomplete tail is dropped), the
global micro-batches of all buckets are shuffled together, and DP rank ``r`` takes slice ``r`` of
each. TP and CP ranks of one DP replica pass the same DP rank, so they read the same samples.
``consumed_samples`` (global, as megatron counts them) resumes the exact sequence.
"""

from __future__ import annotations

import random
from typing import Iterator


class BucketSampler:
    def __init__(self, bucket_of: list[int], micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, consumed_samples: int = 0, seed: int = 1234, shuffle: bool = True):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.bucket_of, self.mbs = bucket_of, micro_batch_size
        self.rank, self.dp = data_parallel_rank, data_parallel_size
        self.consumed, self.seed, self.shuffle = consumed_samples, seed, shuffle
        self.global_mbs = micro_batch_size * data_parallel_size
        if not self.epoch_batches(0):
            raise ValueError(f"no bucket holds micro-batch-size x data-parallel size = {self.global_mbs} samples; "
                             "lower --micro-batch-size or add data")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global micro-batches of ``epoch`` in order (each from one bucket)."""
        rng = random.Random(self.seed + epoch)
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            usable = len(indices) - len(indices) % self.global_mbs
            batches += [indices[i:i + self.global_mbs] for i in range(0, usable, self.global_mbs)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = len(self.epoch_batches(0))
        position = self.consumed // self.global_mbs
        epoch, offset = divmod(position, per_epoch)
        while True:
            batches = self.epoch_batches(epoch)
            for batch in batches[offset:]:
                self.consumed += self.global_mbs
                yield batch[self.rank * self.mbs:(self.rank + 1) * self.mbs]
            epoch, offset = epoch + 1, 0
