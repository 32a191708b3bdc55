"""Prompt extension on a CUDA device: seeded on the device's generator, the CPU's and the device's RNG states
left as they were, the model's memory freed by close."""

from __future__ import annotations

import pytest
import torch

from mm.inference.prompt_extend import LocalLMExtender
from tests.chat_lm_helpers import make_tiny_chat_lm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_extension_is_seeded_and_leaves_the_rng_states(tmp_path, device):
    model_dir = make_tiny_chat_lm(tmp_path)
    held = []
    for _ in range(2):  # the first pass leaves what CUDA's libraries keep for the process (cuBLAS workspaces)
        before_load = torch.cuda.memory_allocated()
        ext = LocalLMExtender(model_dir, device, torch.float32, max_new_tokens=12)
        assert next(ext.model.parameters()).device.type == "cuda"
        cpu, dev = torch.get_rng_state(), torch.cuda.get_rng_state()
        first, again, other = (ext.extend("a cat runs on the beach", "en", seed=s) for s in (3, 3, 4))
        assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), dev)
        assert first.ok and first.extended == again.extended != other.extended
        ext.close()
        held.append(torch.cuda.memory_allocated() - before_load)
    assert held[1] <= 0, held  # the extender itself keeps nothing
