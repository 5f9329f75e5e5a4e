"""The fast path: per-device choices that bench.py measured to pay, and the helpers that apply them.

``FastPath.plain()`` is the straightforward path (fp32, eager, default memory format, default Adam).
``FastPath.for_device(device, in_channels)`` is the default fast path; each choice is justified by the table
in README.txt, produced by ``python bench.py``:

- channels_last: NHWC convolutions. On the CPU it pays for the 3-channel CIFAR-10 shape but made the
  1-channel MNIST shape slower, so it is chosen by channel count there; on CUDA it feeds the tensor cores.
- bf16 autocast: CUDA only; this AVX2 CPU has no bf16 units and runs it far slower.
- fused (CUDA) / foreach (CPU) Adam: one kernel, or one loop, over all parameters instead of one per tensor.
- BatchNorm folded into the preceding convolution for sampling: the network is in eval mode there, so
  BatchNorm is a fixed affine map that ``torch.nn.utils.fusion.fuse_conv_bn_eval`` merges into the conv.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class FastPath:
    channels_last: bool = False
    bf16_autocast: bool = False
    fast_adam: bool = False
    fold_batchnorm: bool = False

    @classmethod
    def plain(cls) -> "FastPath":
        return cls()

    @classmethod
    def for_device(cls, device: torch.device, in_channels: int) -> "FastPath":
        if device.type == "cuda":
            return cls(channels_last=True, bf16_autocast=True, fast_adam=True, fold_batchnorm=True)
        return cls(channels_last=in_channels == 3, bf16_autocast=False, fast_adam=True, fold_batchnorm=True)

    def describe(self) -> str:
        chosen = [name for name, on in vars(self).items() if on]
        return ", ".join(chosen) if chosen else "plain"


def make_optimizer(parameters, lr: float, device: torch.device, path: FastPath) -> torch.optim.Adam:
    """Adam with a constant learning rate; fused on CUDA or foreach on the CPU when the fast path asks."""
    if not path.fast_adam:
        return torch.optim.Adam(parameters, lr=lr, foreach=False)
    if device.type == "cuda":
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr, foreach=True)


def prepare_images(images: torch.Tensor, path: FastPath) -> torch.Tensor:
    """A batch [N, C, H, W] in the memory format the fast path trains in."""
    return images.contiguous(memory_format=torch.channels_last) if path.channels_last else images


def prepare_network(network: nn.Module, path: FastPath) -> nn.Module:
    """Put the network's weights in the fast path's memory format (in place); returns the network."""
    return network.to(memory_format=torch.channels_last) if path.channels_last else network


def autocast(device: torch.device, path: FastPath):
    """bf16 autocast on CUDA when the fast path asks, else a context that does nothing."""
    if path.bf16_autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FastInference(nn.Module):
    """Wraps a copy of the network for sampling: BatchNorm folded into the convolutions, channels_last inputs,
    bf16 autocast; returns fp32 noise [N, C, H, W]. Keeps the attributes DDPM reads (n_classes, ...)."""

    def __init__(self, network: nn.Module, path: FastPath):
        super().__init__()
        network = copy.deepcopy(network).eval()
        if path.fold_batchnorm:
            fold_batchnorm(network)
        self.network = prepare_network(network, path)
        self.path = path
        for name in ("n_classes", "in_channels", "height", "n_features"):
            setattr(self, name, getattr(network, name))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.path):
            return self.network(prepare_images(x, self.path), t, c).float()


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
