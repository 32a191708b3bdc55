"""Layer 5: video data — sources (data.txt, annotation JSON, metadata.csv), decoding (decord or
PyAV), frame sampling, buckets, transforms, the DP-aware resumable sampler, bad-sample accounting,
and a synthetic dataset generator."""

from mm.data.dataset import SkipCounter, VideoDataConfig, VideoDataset, collate, frame_indices
from mm.data.decoding import BadSample, probe, read_frames, resolve_reader
from mm.data.sampler import BucketSampler
from mm.data.sources import Sample, read_data_txt
from mm.data.synthetic import make_dataset

__all__ = ["BadSample", "BucketSampler", "Sample", "SkipCounter", "VideoDataConfig", "VideoDataset", "collate",
           "frame_indices", "make_dataset", "probe", "read_data_txt", "read_frames", "resolve_reader"]
