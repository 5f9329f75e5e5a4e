"""The fast path: per-device choices that bench.py measured, and the helpers that apply them.

``FastPath.plain()`` is the straightforward path (fp32, eager, default memory format, per-tensor Adam).
``FastPath.for_device(device)`` is the default fast path. Measured on the 2-core CPU (README.txt, "Measured
speed", python bench.py): for sampling, BatchNorm folded into the convolutions plus channels_last gave 1.2x
(MNIST) and 1.2x-1.5x (CIFAR-10); for training, foreach Adam and torch.compile changed nothing beyond the noise
(0.92x-1.03x), and channels_last gave the 3-channel CIFAR-10 shape 1.05x-1.16x, so it alone is kept there.
Measured on an H200 (torch 2.11, bench.py, CIFAR-10 shape, batch 128): these small networks are bound by kernel
launches, not arithmetic; fused Adam gave training 1.46x (F=32) and 1.36x (F=64), channels_last 1.12x and
1.07x, while bf16 autocast alone slowed training to 0.75x and 0.85x and the 400-step sampler to 0.67x and 0.81x
(its casts are extra kernels), so the CUDA default is channels_last + fused Adam + BatchNorm folding, without
autocast. --no-fast turns every choice off.

- channels_last: NHWC convolutions (oneDNN on the CPU, tensor cores on CUDA).
- bf16 autocast: CUDA only and off by default (slower on the H200 for these sizes, see above); this AVX2
  CPU has no bf16 units and runs it far slower.
- fused Adam: one kernel over all parameters instead of several per tensor (CUDA).
- BatchNorm folding: in eval mode BatchNorm is a fixed affine map, which
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` merges into the preceding convolution (sampling only).
- compile: torch.compile of the sampling network (opt-in: 25-30 s of compilation on the CPU, then 1.6-1.8x).
"""
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
    def plain(cls) -> "FastPath":
        return cls()

    @classmethod
    def for_device(cls, device: torch.device, in_channels: int = 3, compile_sampler: bool = False) -> "FastPath":
        """The default fast path of a device for images of ``in_channels`` channels (see the module docstring
        for the measurements behind it)."""
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
    """Wraps a copy of the network for sampling: BatchNorm folded into the convolutions, channels_last inputs,
    bf16 autocast, torch.compile, as the fast path says; returns fp32 noise [N, C, H, W]. Keeps the attributes
    DDPM and the tools read (n_classes, in_channels, height, n_features)."""

    def __init__(self, network: nn.Module, path: FastPath):
        super().__init__()
        network = copy.deepcopy(network).eval()
        if path.fold_batchnorm:
            fold_batchnorm(network)
        self.network = network_to_channels_last(network, path.sample_channels_last)
        self.call = torch.compile(self.network) if path.compile_sampler else self.network
        self.path = path
        for name in ("n_classes", "in_channels", "height", "n_features"):
            setattr(self, name, getattr(network, name))

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


def fast_sampler(model, path: FastPath, network: nn.Module | None = None):
    """A DDPM with ``model``'s schedule whose network is a ``FastInference`` copy of ``network`` (default:
    ``model.nn_model``), e.g. the EMA weights."""
    from ddpm import DDPM
    network = model.nn_model if network is None else network
    return DDPM(FastInference(network, path), model.beta1, model.beta2, model.n_timesteps,
                device=model.device, drop_prob=model.drop_prob, schedule=model.schedule, loss_type=model.loss_type)


def load_fast_sampler(path: str, device: torch.device, compile_sampler: bool = False, weights: str = "ema"):
    """``DDPM.from_checkpoint`` (``weights``: 'ema' when kept, or 'raw') on the default fast path of ``device``,
    ready to sample."""
    from ddpm import DDPM
    model = DDPM.from_checkpoint(path, device=device, weights=weights)
    return fast_sampler(model, FastPath.for_device(device, model.nn_model.in_channels, compile_sampler))
