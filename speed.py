"""The fast path: per-device choices that bench.py measured, and the helpers that apply them.

``FastPath()`` is the straightforward path (fp32, eager, default memory format, per-tensor Adam);
``FastPath.for_device(device)`` is the default fast path. The measurements behind each choice are in README.txt
("Measured speed"); --no-fast turns every choice off.

- channels_last: NHWC convolutions (oneDNN on the CPU, tensor cores on CUDA).
- bf16 autocast: CUDA only and off by default (measured slower on an H200 for these sizes).
- fused Adam: one kernel over all parameters instead of several per tensor (CUDA).
- BatchNorm folding: in eval mode BatchNorm is a fixed affine map, which
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` merges into the preceding convolution (sampling only).
- compile: torch.compile of the sampling network, and with the training flag --compile of the training network
  too (opt-in: tens of seconds of compilation on the CPU).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class FastPath:
    train_channels_last: bool = False
    sample_channels_last: bool = False
    bf16_autocast: bool = False
    fused_adam: bool = False
    fold_batchnorm: bool = False
    compile_sampler: bool = False

    @classmethod
    def for_device(cls, device: torch.device, in_channels: int = 3, compile_sampler: bool = False) -> "FastPath":
        """The default fast path of a device for images of ``in_channels`` channels (README.txt, "Measured
        speed", has the measurements behind it)."""
        if device.type == "cuda":
            return cls(train_channels_last=True, sample_channels_last=True, fused_adam=True, fold_batchnorm=True,
                       compile_sampler=compile_sampler)
        return cls(train_channels_last=in_channels == 3, sample_channels_last=True, fold_batchnorm=True,
                   compile_sampler=compile_sampler)

    def describe(self) -> str:
        chosen = [name for name, on in vars(self).items() if on]
        return ", ".join(chosen) if chosen else "plain"


def make_optimizer(parameters, lr: float, device: torch.device, path: FastPath) -> torch.optim.Adam:
    """Adam with a constant learning rate: fused when the fast path asks (CUDA), else per tensor."""
    if path.fused_adam and device.type == "cuda":
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr, foreach=False)


def to_channels_last(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch [N, C, H, W] in channels_last memory format when asked (same shape and values)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def network_to_channels_last(network: nn.Module, channels_last: bool) -> nn.Module:
    """Put the network's weights in channels_last memory format when asked (in place); returns the network."""
    return network.to(memory_format=torch.channels_last) if channels_last else network


def autocast(device: torch.device, path: FastPath):
    """bf16 autocast on CUDA when the fast path asks, else a context that does nothing."""
    if path.bf16_autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FastInference(nn.Module):
    """A copy of a network for sampling, run as the fast path says: BatchNorm folded into the convolutions,
    channels_last inputs, bf16 autocast, torch.compile. ``forward(x, t, c)`` returns fp32 noise [N, C, H, W]."""

    def __init__(self, network: nn.Module, path: FastPath):
        super().__init__()
        network = copy.deepcopy(network).eval()
        if path.fold_batchnorm:
            fold_batchnorm(network)
        self.network = network_to_channels_last(network, path.sample_channels_last)
        self.call = torch.compile(self.network) if path.compile_sampler else self.network
        self.path = path

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.path):
            return self.call(to_channels_last(x, self.path.sample_channels_last), t, c).float()


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """Merge every eval-mode Conv2d -> BatchNorm2d pair inside an nn.Sequential into one Conv2d (in place)."""
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(conv.eval(), norm.eval())
                module[index + 1] = nn.Identity()
    return network
