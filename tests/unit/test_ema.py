"""ModelEMA: the average follows decay * ema + (1 - decay) * weights after each step, equals the
weights up to --ema-start-iter, and refuses decays outside (0, 1)."""

from __future__ import annotations

import pytest
import torch

from mm.training.ema import ModelEMA


class Wrapped(torch.nn.Module):  # the shape of megatron's DDP wrapper: the model under .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)


def test_average_follows_the_recurrence_in_fp32():
    model = _model()
    ema = ModelEMA([Wrapped(model)], decay=0.9, start_iter=2)
    reference = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for iteration in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(iteration)
        for name, p in model.named_parameters():
            if iteration <= 2:
                reference[name] = p.detach().double().clone()
            else:
                reference[name] = 0.9 * reference[name] + 0.1 * p.detach().double()
    (averages,) = ema.state_dict()
    assert set(averages) == set(reference)
    for name, value in averages.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-6)
        # it is an average, not the weights
        assert not torch.equal(value, dict(model.named_parameters())[name].float())


def test_reset_and_load():
    model = _model()
    ema = ModelEMA([model], decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    ema.update(1)
    saved = [{k: v.clone() for k, v in ema.state_dict()[0].items()}]
    ema.reset()
    assert all(torch.equal(v, dict(model.named_parameters())[k].float()) for k, v in ema.state_dict()[0].items())
    ema.load_state_dict(saved)
    assert all(torch.equal(v, saved[0][k]) for k, v in ema.state_dict()[0].items())
    with pytest.raises(KeyError, match="lacks"):
        ema.load_state_dict([{}])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="--ema-decay"):
        ModelEMA([_model()], decay=decay)
