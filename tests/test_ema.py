"""The EMA of the weights: warm-up, the update formula, BatchNorm statistics, and state round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lab.ema import EMA


def small_network():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_decay_warms_up_to_its_ceiling():
    ema = EMA(small_network(), 0.999)
    decays = []
    for _ in range(3):
        ema.updates += 1
        decays.append(ema.current_decay())
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    ema.updates = 10_000
    assert ema.current_decay() == 0.999


def test_update_is_the_exponential_moving_average():
    network = small_network()
    ema = EMA(network, 0.5)
    start = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
        network[1].running_mean.fill_(3.0)
        network[1].num_batches_tracked.fill_(7)
    ema.update(network)
    decay = min(0.5, 2 / 11)
    for averaged, old, new in zip(ema.module.parameters(), start, network.parameters()):
        torch.testing.assert_close(averaged, decay * old + (1 - decay) * new)
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), (1 - decay) * 3.0))
    assert ema.module[1].num_batches_tracked.item() == 7


def test_early_weights_are_forgotten_quickly():
    """Weights 0 at the start, 1 ever after: after 750 updates the average is close to 1, where a fixed decay
    of 0.999 would still give 1 - 0.999^750 = 0.53."""
    network = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        network.weight.fill_(0.0)
    ema = EMA(network, 0.999)
    with torch.no_grad():
        network.weight.fill_(1.0)
    for _ in range(750):
        ema.update(network)
    assert ema.module.weight.item() > 0.95


def test_state_round_trip():
    network = small_network()
    ema = EMA(network, 0.99)
    for _ in range(3):
        ema.update(network)
    restored = EMA(small_network(), 0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    for a, b in zip(restored.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)
