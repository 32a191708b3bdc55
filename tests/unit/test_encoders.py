"""Frozen text and image encoders loaded from local directories, against transformers."""

from __future__ import annotations

import pytest
import torch

from mm.models.image_encoder import ClipImageEncoder
from mm.models.text_encoder import TextEncoder
from tests.encoder_helpers import save_clip, save_text_encoder


@pytest.mark.parametrize("kind", ["umt5", "mt5"])
def test_text_encoder_pads_truncates_and_zeroes(tmp_path, kind):
    import transformers

    path = save_text_encoder(tmp_path / kind, kind)
    enc = TextEncoder(kind, str(path), dtype="fp32", max_length=12)
    ids, mask = enc.tokenize(["a cat runs", "the red ball jumps over the blue dog under the sky slowly quickly"])
    assert ids.shape == (2, 12) and mask[0].tolist() == [1] * 4 + [0] * 8 and mask[1].sum() == 12
    out = enc.encode(ids, mask)
    model_cls = {"umt5": transformers.UMT5EncoderModel, "mt5": transformers.MT5EncoderModel}[kind]
    ref = model_cls.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, :4], ref[0, :4])
    torch.testing.assert_close(out[1], ref[1])
    assert torch.count_nonzero(out[0, 4:]) == 0  # Wan's padded part is exactly zero
    assert not any(p.requires_grad for p in enc.parameters())


def test_text_encoder_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.from_pretrained = .*no config.json"):
        TextEncoder("umt5", str(tmp_path))
    with pytest.raises(ValueError, match="text_encoder.model_id = 'bert'; valid: umt5, mt5, t5"):
        TextEncoder("bert", str(tmp_path))


def test_clip_encoder_gives_penultimate_hidden_states(tmp_path):
    from transformers import CLIPVisionModel

    path = save_clip(tmp_path / "clip")
    enc = ClipImageEncoder(str(path), dtype="fp32")
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    out = enc.encode(images)
    assert out.shape == (2, 5, 16)  # class token + (28 / 14)^2 patches
    # independent preprocessing, Wan's CLIPModel.visual: bicubic resize, x * 0.5 + 0.5 (no clamp), OpenAI CLIP
    # mean/std (the golden test against Wan itself: tests/unit/test_wan_clip_original.py)
    x = torch.nn.functional.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ref = CLIPVisionModel.from_pretrained(path).eval()(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, ref)


def test_tokenizer_beside_the_encoder_in_diffusers_layout(tmp_path):
    """A diffusers pipeline directory keeps text_encoder/ and tokenizer/ side by side; the encoder's
    own directory wins when it has a tokenizer; neither is an error naming both places."""
    import shutil

    from mm.models.text_encoder import TextEncoder
    from mm.models.text_encoder.encoder import TOKENIZER_FILES
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    source = save_tiny_text_encoder(tmp_path / "source", ["a", "red", "cat"])
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    (tmp_path / "pipe" / "tokenizer").mkdir()
    for f in source.iterdir():
        tokenizer_file = f.name in TOKENIZER_FILES or f.name == "special_tokens_map.json"
        shutil.copy(f, tmp_path / "pipe" / ("tokenizer" if tokenizer_file else "text_encoder") / f.name)
    split = TextEncoder("umt5", str(tmp_path / "pipe" / "text_encoder"), "fp32", max_length=8)
    whole = TextEncoder("umt5", str(source), "fp32", max_length=8)
    ids, mask = split.tokenize(["a red cat"])
    assert torch.equal(ids, whole.tokenize(["a red cat"])[0])
    assert torch.equal(split.encode(ids, mask), whole.encode(ids, mask))
    shutil.rmtree(tmp_path / "pipe" / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer there"):
        TextEncoder("umt5", str(tmp_path / "pipe" / "text_encoder"), "fp32")
