"""The checkpoint format (mm/ckpt): the header's round trip through both of its stored forms, the
headers mm has written before, refusals of headers this mm does not read, and mm-convert's output
read by the reader the training loop and inference load with."""

from __future__ import annotations

import json

import pytest
import torch

from mm.ckpt import (
    HEADER_FILE,
    MODEL_FILE,
    RELEASE,
    TRACKER,
    CheckpointError,
    CheckpointHeader,
    Content,
    ParallelLayout,
    checkpoint_dir,
    find_checkpoint,
    rank_dir,
    read_header,
    read_tracker,
    write_header,
    write_tracker,
)

# checkpoint.json as mm wrote it before the header was a dataclass (a training run's torch format
# with the distributed optimizer, and mm-convert's hf_to_mm)
TRAINING_HEADER = {
    "checkpoint_version": 1, "iteration": 4, "consumed_samples": 32,
    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                 "virtual_pipeline_model_parallel_size": 2, "context_parallel_size": 1, "data_parallel_size": 2,
                 "world_size": 8, "distributed_optimizer": True, "optimizer_sharding": "dp_zero"},
    "content": {"optimizer": True, "rng": True, "ema": False},
    "extra": {"entry_point": "pretrain_t2v.py", "predictor": {"num_layers": 4, "num_heads": 2},
              "pipeline_layers": [[1, 1], [1, 1]]}}
CONVERTED_HEADER = {
    "checkpoint_version": 1, "iteration": 0, "consumed_samples": 0,
    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                 "virtual_pipeline_model_parallel_size": None, "context_parallel_size": 1, "data_parallel_size": 1,
                 "world_size": 2, "distributed_optimizer": False, "optimizer_sharding": None},
    "content": {"optimizer": False, "rng": False, "ema": False},
    "extra": {"verb": "hf_to_mm", "converted_from": "hf", "source_format": "diffusers", "version": "wan2.1",
              "predictor": {"num_layers": 2, "num_heads": 2}, "pipeline_layers": [2]}}


def _header(**changes) -> CheckpointHeader:
    values = dict(iteration=10, consumed_samples=80,
                  parallel=ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                          context_parallel_size=2, data_parallel_size=2, world_size=16,
                                          distributed_optimizer=True, optimizer_sharding="fully_reshardable"),
                  content=Content(optimizer=True, rng=True, ema=True), entry_point="pretrain_i2v.py",
                  predictor={"num_layers": 4, "hidden_size": 24, "patch_size": [1, 2, 2], "image_dim": None},
                  pipeline_layers=[1, 3], extra={"run": "resume"}, format="torch")
    return CheckpointHeader(**dict(values, **changes))


def test_header_round_trip_through_checkpoint_json(tmp_path):
    header = _header()
    write_header(tmp_path, header)
    stored = json.loads((tmp_path / HEADER_FILE).read_text())
    assert stored["checkpoint_version"] == 1 and stored["extra"]["run"] == "resume"
    assert stored["extra"]["pipeline_layers"] == [1, 3] and "format" not in stored
    assert read_header(tmp_path) == header


def test_header_round_trip_through_common_entries():
    """torch_dist keeps the header among its common entries, next to others (the scheduler's)."""
    header = _header(format="torch_dist", pipeline_layers=None, entry_point=None, extra={})
    common = dict(header.to_dict(), opt_param_scheduler={"num_steps": 80})
    assert CheckpointHeader.from_dict(common, "torch_dist") == header


@pytest.mark.parametrize("stored", [TRAINING_HEADER, CONVERTED_HEADER], ids=["training", "converted"])
def test_headers_mm_wrote_before_read_and_write_back_the_same(tmp_path, stored):
    (tmp_path / HEADER_FILE).write_text(json.dumps(stored))
    header = read_header(tmp_path)
    assert header.version == 1 and header.format == "torch"
    assert header.predictor == stored["extra"]["predictor"]
    assert header.pipeline_layers == stored["extra"]["pipeline_layers"]
    assert header.parallel.describe() == ("TP2 PP2 VPP2 CP1 DP2" if stored is TRAINING_HEADER else "TP2 PP1 CP1 DP1")
    again = header.to_dict()
    assert again == dict(stored, extra=dict(stored["extra"], entry_point=stored["extra"].get("entry_point")))


def test_headers_this_mm_does_not_read_are_refused(tmp_path):
    """Every header mm has written carries checkpoint_version; one without it, or of another
    version, or without the entries of its version, is refused naming the checkpoint."""
    no_version = {k: v for k, v in CONVERTED_HEADER.items() if k != "checkpoint_version"}
    (tmp_path / HEADER_FILE).write_text(json.dumps(no_version))
    with pytest.raises(CheckpointError, match=rf"--load .*{tmp_path.name} has no checkpoint_version"):
        read_header(tmp_path)
    (tmp_path / HEADER_FILE).write_text(json.dumps(dict(CONVERTED_HEADER, checkpoint_version=2)))
    with pytest.raises(CheckpointError, match="has checkpoint_version 2; this version of mm reads 1"):
        read_header(tmp_path)
    (tmp_path / HEADER_FILE).write_text(json.dumps({k: v for k, v in CONVERTED_HEADER.items() if k != "content"}))
    with pytest.raises(CheckpointError, match="does not have the entries this version of mm reads: KeyError"):
        read_header(tmp_path)


def test_tracker_and_directories(tmp_path):
    assert read_tracker(tmp_path) is None and find_checkpoint(tmp_path) is None
    write_tracker(tmp_path, 20)
    assert (tmp_path / TRACKER).read_text() == "20\n" and read_tracker(tmp_path) == 20
    with pytest.raises(CheckpointError, match="names iteration 20, but .*iter_0000020 does not exist"):
        find_checkpoint(tmp_path)
    write_tracker(tmp_path, RELEASE)
    assert (tmp_path / TRACKER).read_text() == "release\n" and checkpoint_dir(tmp_path, RELEASE).name == "release"
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRACKER]  # no temporary file left
    assert rank_dir(tmp_path, 1, 0, 1).name == "mp_rank_01" and rank_dir(tmp_path, 1, 3, 4).name == "mp_rank_01_003"
    (tmp_path / TRACKER).write_text("latest\n")
    with pytest.raises(CheckpointError, match="holds 'latest'; expected an iteration number or 'release'"):
        read_tracker(tmp_path)


class _TinySource:
    """A converter source of a 2-layer Wan-named model: two tensors per layer, embedder and head."""

    def __init__(self):
        from mm.models.predictor.wan.weights import WAN_WEIGHTS

        self.weights = WAN_WEIGHTS
        self.arch = {"num_layers": 2, "num_heads": 2, "hidden_size": 4}
        self._keys = ["patch_embedding.weight", "blocks.0.modulation", "blocks.1.modulation", "head.proj.weight"]

    def keys(self):
        return list(self._keys)

    def local(self, key, tp, rank):
        return torch.full((2,), float(self._keys.index(key)))

    def release(self):
        pass


def test_converter_output_is_read_by_the_loaders_header_reader(tmp_path):
    """What mm-convert writes (header, tracker, rank files) is what the training loop's and
    inference's loader read: a drift between the writer and the reader fails here."""
    from checkpoint.config import Layout
    from checkpoint.sources import open_mm_source
    from checkpoint.writers import write_mm

    source = _TinySource()
    write_mm(source, Layout(1, ((1, 1),)), tmp_path, {"verb": "hf_to_mm", "version": "wan2.1"})
    path = find_checkpoint(tmp_path)
    assert path == checkpoint_dir(tmp_path, RELEASE)
    header = read_header(path)  # what mm.ckpt.load_model and the training loop's load_checkpoint read
    assert header == CheckpointHeader(
        iteration=0, consumed_samples=0,
        parallel=ParallelLayout(pipeline_model_parallel_size=2, world_size=2), content=Content(),
        entry_point="mm-convert", predictor=source.arch, pipeline_layers=[1, 1],
        extra={"verb": "hf_to_mm", "version": "wan2.1"}, format="torch")
    first = torch.load(rank_dir(path, 0, 0, 2) / MODEL_FILE, weights_only=False)
    last = torch.load(rank_dir(path, 0, 1, 2) / MODEL_FILE, weights_only=False)
    assert sorted(first["model"]) == ["blocks.0.modulation", "patch_embedding.weight"]
    assert sorted(last["model"]) == ["blocks.0.modulation", "head.proj.weight"]
    # and mm-convert reads its own output back through the same header
    again = open_mm_source(tmp_path, source.weights)
    assert again.header == header and sorted(again.keys()) == sorted(source.keys())


# ---------------------------------------------------------------------------------------------- damage


def _converted(root, iteration=None):
    """mm-convert's release checkpoint of ``_TinySource`` (PP2: two rank files) under ``root``;
    with ``iteration``, moved to ``root/iter_{iteration:07d}`` as a training checkpoint would lie."""
    from checkpoint.config import Layout
    from checkpoint.writers import write_mm

    if iteration is None:
        write_mm(_TinySource(), Layout(1, ((1, 1),)), root, {"verb": "hf_to_mm"})
        return checkpoint_dir(root, RELEASE)
    staging = root / f"staging_{iteration}"
    staging.mkdir()
    write_mm(_TinySource(), Layout(1, ((1, 1),)), staging, {"verb": "hf_to_mm"})
    path = checkpoint_dir(root, iteration)
    checkpoint_dir(staging, RELEASE).rename(path)
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return path


def test_manifest_finds_a_truncated_missing_or_changed_file_before_anything_is_read(tmp_path):
    from mm.ckpt import MANIFEST, DamagedCheckpointError, verify_checkpoint

    path = _converted(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    rank_file = f"{rank_dir(path, 0, 1, 2).name}/{MODEL_FILE}"
    assert sorted(manifest["files"]) == [HEADER_FILE, f"mp_rank_00_000/{MODEL_FILE}", rank_file]
    assert "sha256" in manifest["files"][HEADER_FILE] and "sha256" not in manifest["files"][rank_file]
    assert verify_checkpoint(path).iteration == 0
    data = (path / rank_file).read_bytes()
    (path / rank_file).write_bytes(data[:1000])
    with pytest.raises(DamagedCheckpointError) as info:
        verify_checkpoint(path)
    assert str(info.value) == (f"--load {tmp_path}: {path} is damaged: {path / rank_file} has 1000 bytes, the "
                               f"manifest records {len(data)} (truncated)")
    (path / rank_file).unlink()
    with pytest.raises(DamagedCheckpointError, match=f"{path / rank_file} is missing"):
        verify_checkpoint(path)
    (path / rank_file).write_bytes(data)
    header = (path / HEADER_FILE).read_text()
    (path / HEADER_FILE).write_text(header.replace('"iteration": 0', '"iteration": 9'))  # same size
    with pytest.raises(DamagedCheckpointError, match=f"{path / HEADER_FILE} does not match its SHA-256"):
        verify_checkpoint(path)
    # a checkpoint written before manifests: the rank files its header implies are still checked
    (path / HEADER_FILE).write_text(header)
    (path / MANIFEST).unlink()
    assert verify_checkpoint(path).iteration == 0
    (path / rank_file).unlink()
    with pytest.raises(DamagedCheckpointError, match=f"{path / rank_file} is missing"):
        verify_checkpoint(path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_damaged_torch_dist_files_are_named_from_its_own_index(tmp_path):
    """A torch_dist checkpoint without a manifest (written before it): .metadata unreadable, a
    data file cut short or missing are found from .metadata, naming the file (the header reader
    and megatron said ``AssertionError: metadata is None``)."""
    import torch.distributed.checkpoint as dcp

    from mm.ckpt import DIST_INDEX, DamagedCheckpointError, read_header, verify_checkpoint

    path = tmp_path / "iter_0000003"
    dcp.save({"weight": torch.arange(4096.0)}, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    data = next(path.glob("*.distcp"))
    full = data.read_bytes()
    data.write_bytes(full[:100])
    with pytest.raises(DamagedCheckpointError, match=f"{data} has 100 bytes, but {DIST_INDEX} places weight up to "
                                                     r"byte \d+ \(truncated\)"):
        verify_checkpoint(path)
    data.unlink()
    with pytest.raises(DamagedCheckpointError, match=f"{data} is missing"):
        verify_checkpoint(path)
    data.write_bytes(full)
    index = (path / DIST_INDEX).read_bytes()
    (path / DIST_INDEX).write_bytes(index[:len(index) // 2])
    with pytest.raises(DamagedCheckpointError, match=f"{path / DIST_INDEX} cannot be read"):
        verify_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match=f"--load {tmp_path}: cannot read the header .* of {path}"):
        read_header(path)


def test_select_checkpoint_falls_back_only_when_asked(tmp_path):
    from mm.ckpt import DamagedCheckpointError
    from mm.ckpt.load import select_checkpoint

    assert select_checkpoint(tmp_path) == (None, None)  # a first launch
    one, two = _converted(tmp_path, 1), _converted(tmp_path, 2)
    (tmp_path / ".iter_0000003.tmp").mkdir()  # a save that died; never a candidate
    write_tracker(tmp_path, 2)
    assert select_checkpoint(tmp_path) == (two, None)
    damaged = rank_dir(two, 0, 1, 2) / MODEL_FILE
    damaged.write_bytes(damaged.read_bytes()[:10])
    with pytest.raises(DamagedCheckpointError, match=f"{damaged} has 10 bytes"):
        select_checkpoint(tmp_path)
    path, note = select_checkpoint(tmp_path, fallback=True)
    assert path == one and f"{damaged} has 10 bytes" in note and "--load-fallback: loading" in note
    # the tracker itself unreadable, or gone while checkpoints remain
    (tmp_path / TRACKER).write_text("garbage\n")
    with pytest.raises(DamagedCheckpointError, match="holds 'garbage'"):
        select_checkpoint(tmp_path)
    assert select_checkpoint(tmp_path, fallback=True)[0] == one
    (tmp_path / TRACKER).unlink()
    with pytest.raises(DamagedCheckpointError, match="no latest_checkpointed_iteration.txt, but 2 checkpoint "
                                                     "directories are there .* the tracker was lost"):
        select_checkpoint(tmp_path)
    assert select_checkpoint(tmp_path, fallback=True)[0] == one
    # nothing earlier verifies
    write_tracker(tmp_path, 2)
    (rank_dir(one, 0, 0, 2) / MODEL_FILE).unlink()
    with pytest.raises(DamagedCheckpointError, match="--load-fallback: no earlier checkpoint in .* verifies; also "
                                                     "damaged: .*mp_rank_00_000/model_optim_rng.pt is missing"):
        select_checkpoint(tmp_path, fallback=True)
    # the tracker names a directory that is gone
    write_tracker(tmp_path, 5)
    with pytest.raises(DamagedCheckpointError, match="names iteration 5, but .*iter_0000005 does not exist"):
        select_checkpoint(tmp_path)


def test_prune_keeps_the_newest_the_loaded_and_newer_ones(tmp_path):
    from mm.ckpt import list_checkpoints
    from mm.training.checkpointing import _prepare, prune_checkpoints

    for i in (1, 2, 3, 4, 5, 9):
        checkpoint_dir(tmp_path, i).mkdir()
        write_header(checkpoint_dir(tmp_path, i), _header(iteration=i))
    checkpoint_dir(tmp_path, RELEASE).mkdir()
    write_header(checkpoint_dir(tmp_path, RELEASE), _header(iteration=0))
    (tmp_path / "iter_0000006").mkdir()  # not a checkpoint (no header): not touched
    deleted = prune_checkpoints(tmp_path, 2, checkpoint_dir(tmp_path, 5), protect=checkpoint_dir(tmp_path, 1))
    assert [p.name for p in deleted] == ["iter_0000003", "iter_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000004", "iter_0000005",
                                                          "iter_0000006", "iter_0000009", "release"]
    # a deletion cut short by a crash leaves a hidden name: no loader lists it, the next save removes it
    checkpoint_dir(tmp_path, 4).rename(tmp_path / ".iter_0000004.deleting")
    assert [i for i, _ in list_checkpoints(tmp_path)] == [9, 5, 1]
    _prepare(tmp_path, tmp_path / ".iter_0000010.tmp")
    assert not (tmp_path / ".iter_0000004.deleting").exists()
