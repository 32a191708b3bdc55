"""mm.parallel.fsdp.outer_blocks: the units parameter sharding gathers one at a time."""

from torch import nn

from mm.parallel.fsdp import outer_blocks


def test_outermost_module_lists_only():
    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # like T5Block.layer, inside a block
    block = nn.Module()
    block.layer = inner
    model = nn.Module()
    model.embed = nn.Linear(2, 2)
    model.encoder = nn.Module()
    model.encoder.block = nn.ModuleList([block, nn.Linear(2, 2)])
    model.head = nn.ModuleList([nn.Linear(2, 2)])
    assert outer_blocks(model) == [block, model.encoder.block[1], model.head[0]]
    assert outer_blocks(nn.Linear(2, 2)) == []
