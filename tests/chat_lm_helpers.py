"""A tiny random chat language model made offline: a 2-layer Qwen2 causal LM, a byte-level BPE tokenizer
trained here on a few sentences (a Qwen-style chat template, eos and pad tokens), and a generation config
that samples (do_sample true: the seed matters). Used by the prompt-extension tests."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a cat runs on the beach at sunset", "the camera slowly pans over red waves",
          "a dog walks in golden light", "a fox trots across the snow"]


def make_tiny_chat_lm(path: Path, seed: int = 0) -> str:
    """Save the model, its tokenizer and generation_config.json in ``path``; its path as a string. The
    global RNG is left as it was."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    eos, pad = bpe.token_to_id("<|im_end|>"), bpe.token_to_id("<|endoftext|>")
    # the system prompts are ~1400 byte-level tokens here
    config = Qwen2Config(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=eos, pad_token_id=pad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).save_pretrained(path)
    generation = GenerationConfig(do_sample=True, top_k=20, temperature=0.7, eos_token_id=eos, pad_token_id=pad)
    generation.save_pretrained(path)
    return str(path)
