"""Exponential moving average of a network's weights, with the usual warm-up, for sampling.

A fixed decay (torch.optim.swa_utils.AveragedModel) forgets the first step's weights only as decay^n, too slowly
for short runs; so the decay warms up as in TensorFlow's ExponentialMovingAverage: decay_n = min(decay,
(1 + n) / (10 + n)) for the n-th update. answers.txt (sheet 2, EMA) has the measurements of EMA against raw weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay_n * ema + (1 - decay_n) * weights, over parameters and BatchNorm running statistics.

    ``module`` is the averaged copy (eval mode, no gradients); ``updates`` counts the updates on the host, so
    an update never waits for the device.
    """

    def __init__(self, network: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(network).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        averaged, current = _float_tensors(self.module), _float_tensors(network)
        torch._foreach_lerp_(averaged, current, 1 - self.current_decay())
        for mine, theirs in zip(self.module.buffers(), network.buffers()):
            if not mine.is_floating_point():
                mine.copy_(theirs)          # BatchNorm's num_batches_tracked

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = state["updates"]


def _float_tensors(network: nn.Module) -> list[torch.Tensor]:
    return [tensor for tensor in (*network.parameters(), *network.buffers()) if tensor.is_floating_point()]
