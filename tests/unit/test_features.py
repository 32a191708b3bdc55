"""The feature files (mm.data.features): mm's safetensors and MindSpeed-MM's torch files read alike, the
index and its errors, the dataset's buckets and bad files; and the configuration checks of feature
extraction and of training on features, each naming the flag or key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.data.features import (FeatureDataset, Manifest, collate_features, read_features, read_index, text_keys,
                              write_features)
from mm.runtime import configure_or_exit


def _sample(frames: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(4, frames, 2, 2, generator=g), "prompt_ids": torch.randn(6, 8, generator=g),
            "prompt_mask": torch.tensor([1, 1, 1, 0, 0, 0]), "prompt_ids_2": torch.randn(5, 3, generator=g),
            "prompt_mask_2": torch.tensor([1, 1, 0, 0, 0])}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_features_round_trip_in_either_format(fmt, tmp_path):
    tensors = _sample(3, 0)
    path = tmp_path / f"a.{fmt}"
    write_features(path, tensors, fmt)
    back = read_features(path)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone


def test_mindspeed_mm_torch_files_are_read(tmp_path):
    """MindSpeed-MM's FeatureExtractor saves a dict with the embedding under prompt_ids (a list for several
    encoders) and its i2v extras beside them; mm reads the embeddings by encoder."""
    s = _sample(2, 1)
    torch.save({"video": s["video"], "prompt_ids": [s["prompt_ids"], s["prompt_ids_2"]],
                "prompt_mask": [s["prompt_mask"], s["prompt_mask_2"]]}, tmp_path / "clip_mp4.pt")
    back = read_features(tmp_path / "clip_mp4.pt")
    assert set(back) == {"video", *text_keys(0), *text_keys(1)}
    assert torch.equal(back["prompt_ids_2"], s["prompt_ids_2"]) and torch.equal(back["prompt_mask"], s["prompt_mask"])
    # its Wan I2V features: the condition (mask channels, then the first frame's latents) and CLIP's tokens
    condition, clip = torch.randn(8, 2, 2, 2), torch.randn(5, 16)
    torch.save({"video": s["video"], "prompt_ids": s["prompt_ids"], "prompt_mask": s["prompt_mask"],
                "i2v_vae_feature": condition, "i2v_clip_feature": clip}, tmp_path / "i2v.pt")
    back = read_features(tmp_path / "i2v.pt")
    assert torch.equal(back["condition"], condition) and torch.equal(back["context_image"], clip)
    # and mm's .pt files carry them under MindSpeed-MM's names, for its FeatureDataset to pass to its DiT
    write_features(tmp_path / "mine.pt", dict(s, condition=condition, context_image=clip), "pt")
    raw = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert torch.equal(raw["i2v_vae_feature"], condition) and torch.equal(raw["i2v_clip_feature"], clip)
    assert isinstance(raw["prompt_ids"], list) and torch.equal(raw["prompt_ids"][1], s["prompt_ids_2"])


def _index(root: Path, entries: list[dict]) -> Path:
    (root / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root / "data.jsonl"


def test_the_index_counts_missing_files_and_names_bad_lines(tmp_path):
    (tmp_path / "features").mkdir()
    write_features(tmp_path / "features/a.safetensors", _sample(3, 0), "safetensors")
    index = _index(tmp_path, [{"file": "features/a.safetensors", "cap": "x"}, {"file": "features/gone.pt"}])
    samples, dropped = read_index(str(index), None)
    assert [Path(s.file).name for s in samples] == ["a.safetensors"] and dropped["feature file missing"] == 1
    (tmp_path / "data.jsonl").write_text('{"file": "features/a.safetensors"}\n{"cap": "no file"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: needs 'file'"):
        read_index(str(tmp_path / "data.jsonl"), None)
    (tmp_path / "data.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: not a JSON object"):
        read_index(str(tmp_path / "data.jsonl"), None)


def test_buckets_come_from_the_latent_shapes_and_an_unreadable_file_is_replaced_and_counted(tmp_path):
    (tmp_path / "features").mkdir()
    frames = [5, 3, 5, 3, 5]
    for i, f in enumerate(frames):
        write_features(tmp_path / f"features/{i}.safetensors", _sample(f, i), "safetensors")
    (tmp_path / "features/4.safetensors").write_bytes(b"\0" * 40)  # damaged after the index was written
    # no bucket numbers in the index (MindSpeed-MM's): the distinct latent shapes, sorted
    entries = [{"file": f"features/{i}.safetensors", "latent_shape": [4, f, 2, 2]} for i, f in enumerate(frames)]
    samples, _ = read_index(str(_index(tmp_path, entries)), None)
    dataset = FeatureDataset(samples, num_text_encoders=2)
    assert dataset.bucket_of == [1, 0, 1, 0, 1]
    item = dataset[4]
    assert item["skipped"][0][0] == str(tmp_path / "features/4.safetensors")
    assert item["skipped"][0][1].startswith("unreadable feature file")
    assert item["latents"].shape == (4, 5, 2, 2) and len(item["context"]) == 2
    batch = collate_features([dataset[0], dataset[2]])
    assert batch["latents"].shape == (2, 4, 5, 2, 2) and batch["context"][1].shape == (2, 5, 3)
    assert batch["condition"] is None
    # one text encoder fewer than the files hold is fine; one more is a bad file
    with pytest.raises(RuntimeError, match="unreadable feature files in a row"):
        FeatureDataset(samples, num_text_encoders=3, max_substitutes=1)[0]


def _assets(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A model JSON (tiny Wan DiT, encoders named), a video data JSON and a feature data JSON."""
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)), tmp_path / "vae")
    save_tiny_text_encoder(tmp_path / "umt5", ["a", "b"], d_model=32)
    model = {"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 64, "ffn_dim": 128,
                           "in_dim": 4, "out_dim": 4, "freq_dim": 32, "text_dim": 32},
             "ae": {"model_id": "wan_vae", "from_pretrained": str(tmp_path / "vae")},
             "text_encoder": {"model_id": "umt5", "from_pretrained": str(tmp_path / "umt5")},
             "diffusion": {"model_id": "flow_matching"}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    from mm.data import make_dataset

    data_txt = make_dataset(tmp_path / "videos", num_videos=2, frames=5, sizes=[(16, 16)], fps=8)
    data = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": str(data_txt)},
                              "preprocess_parameters": {"num_frames": 5, "max_height": 16, "max_width": 16},
                              "tokenizer_config": {"from_pretrained": str(tmp_path / "umt5")}}}
    (tmp_path / "data.json").write_text(json.dumps(data))
    features = tmp_path / "sora_features"
    (features / "features").mkdir(parents=True)
    write_features(features / "features/a.safetensors", {k: v for k, v in _sample(3, 0).items() if "_2" not in k},
                   "safetensors")
    _index(features, [{"file": "features/a.safetensors", "cap": "a", "latent_shape": [4, 3, 2, 2], "bucket": 0}])
    (tmp_path / "feature_data.json").write_text(json.dumps({"dataset_param": {
        "dataset_type": "feature", "basic_parameters": {"data_path": str(features / "data.jsonl")}}}))
    return tmp_path / "model.json", tmp_path / "data.json", tmp_path / "feature_data.json"


def _errors(capsys, argv: list[str], entry) -> str:
    with pytest.raises(SystemExit) as exit_:
        configure_or_exit(argv, entry, world_size=2)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_training_on_features_checks_the_features_against_the_model(tmp_path, capsys, monkeypatch):
    from mm.training.pretrain import entry_point

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    model, data, features = _assets(tmp_path)
    train = ["--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "2"]
    config, _, _ = configure_or_exit(["--mm-model", str(model), "--mm-data", str(features), *train],
                                     entry_point("t2v"), world_size=2)
    assert config.data.features and config.data.dataset_type == "t2v" and len(config.data.sources[0]) == 1
    # what features.json says they were made for is checked: another family, another number of encoders
    Manifest(dataset_type="t2v", model_id="opensoraplan_v1_3", text_dims=[32, 8]).write(tmp_path / "sora_features")
    err = _errors(capsys, ["--mm-model", str(model), "--mm-data", str(features), *train], entry_point("t2v"))
    assert "extracted for predictor.model_id = 'opensoraplan_v1_3'" in err and "2 text embedding(s)" in err
    (tmp_path / "sora_features/features.json").unlink()
    # caption dropout needs the empty caption's embedding; MindSpeed-MM's switches must agree with the data
    data_json = json.loads(features.read_text())
    data_json["dataset_param"]["preprocess_parameters"] = {"cfg": 0.1}
    features.write_text(json.dumps(data_json))
    err = _errors(capsys, ["--mm-model", str(model), "--mm-data", str(features), *train], entry_point("t2v"))
    assert "preprocess_parameters.cfg = 0.1 with dataset_type 'feature'" in err
    model_json = json.loads(model.read_text())
    (tmp_path / "loads.json").write_text(json.dumps(dict(model_json, load_video_features=True)))
    err = _errors(capsys, ["--mm-model", str(tmp_path / "loads.json"), "--mm-data", str(data), *train],
                  entry_point("t2v"))
    assert "load_video_features = true: training on extracted features reads a data JSON of dataset_type " \
           "'feature'" in err
    err = _errors(capsys, ["--mm-model", str(model), "--mm-data", str(data), *train, "--save-features",
                           str(tmp_path / "x")], entry_point("t2v"))
    assert "--save-features is a flag of extract_features.py" in err


def test_extraction_refuses_what_it_cannot_do_before_starting(tmp_path, capsys, monkeypatch):
    from mm.training.extract_features import entry_point, save_path

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    model, data, features = _assets(tmp_path)
    base = ["--mm-model", str(model), "--micro-batch-size", "1"]
    err = _errors(capsys, [*base, "--mm-data", str(data), "--tensor-model-parallel-size", "2"], entry_point())
    assert "--tensor-model-parallel-size 2: extract_features.py shares the samples" in err
    assert "--save-features is required" in _errors(capsys, [*base, "--mm-data", str(data)], entry_point())
    err = _errors(capsys, [*base, "--mm-data", str(features), "--save-features", str(tmp_path / "f")], entry_point())
    assert "dataset_type = 'feature': extract_features.py reads videos" in err
    # MindSpeed-MM's --mm-tool JSON names the directory too
    (tmp_path / "tools.json").write_text(json.dumps({"sorafeature": {"save_path": str(tmp_path / "out")}}))
    try:
        config, _, _ = configure_or_exit([*base, "--mm-data", str(data), "--mm-tool", str(tmp_path / "tools.json")],
                                         entry_point(), world_size=2)
    except SystemExit:
        pytest.fail(capsys.readouterr().err)
    assert save_path(config) == str(tmp_path / "out")
