"""The fast path: choices per machine capability, from tools/bench.py's measurements, and the helpers that apply them.

``FastPath()`` is the straightforward path (fp32, eager, default memory format, per-tensor Adam, 250 images per
sampling call); ``FastPath.for_machine(device)`` is the default fast path of the machine the device is on. The
measurements behind each rule are in docs/speed.md; --no-fast turns every choice off.

The choice is made by rules, not by an autotune at start: the sampling chunk size changes which random numbers
each image gets, and a table must come out the same from the same command on any machine of the same kind. The
rules read capabilities, not the device type alone (``Machine``): the CPU's instruction set (AVX2, AVX-512,
native bf16 through AVX-512-BF16 or AMX), the GPU model and the torch version.

- channels_last: NHWC convolutions (oneDNN on the CPU, tensor cores on CUDA).
- bf16 autocast: on CPUs with native bf16 (AVX-512-BF16 or AMX) only. Emulated bf16 on an AVX2 CPU is slower
  than fp32, and on the H200 these launch-bound networks ran slower with it. Weights, optimizer state, EMA and
  the loss stay fp32; only the network's matrix products and convolutions run in bf16.
- fused Adam: one kernel over all parameters instead of several per tensor (CUDA; the CPU runs it too, which the
  tests use). Its kernel reads the weights, gradients and moments as one flat buffer each, so they must share one
  memory layout: ``load_optimizer_state`` lays a loaded state out like the weights.
- cudnn.benchmark: cuDNN times its algorithms for each new input shape and keeps the fastest (CUDA).
- BatchNorm folding: in eval mode BatchNorm is a fixed affine map, which
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` merges into the preceding convolution (sampling only).
- share_encoder: with guidance, the U-Net's class-blind first half runs once for the conditional and the
  unconditional copy of each image (``SharedEncoder``; sampling only, on every device).
- sample_chunk: images per sampling call. A CPU runs the U-Net fastest when the activations of one call fit its
  caches, a GPU when one call holds as many images as possible.
- compile (opt-in, --compile): torch.compile of the training and the sampling network; on CUDA in
  ``mode="reduce-overhead"``, which captures each call in a CUDA graph and replays it with one launch; under
  torchrun in the default mode (DDP's gradient hooks between CUDA-graph replays are not a supported combination).
"""
from __future__ import annotations

import contextlib
import copy
import platform
from copy import deepcopy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PRECISIONS = ("auto", "fp32", "bf16")
PLAIN_SAMPLE_CHUNK = 250     # images per sampling call of the plain path
CPU_SAMPLE_CHUNK = 80        # best of 20/40/80/160 on the AVX2 CPU for MNIST and CIFAR-10 at w > 0 (docs/speed.md)
CUDA_SAMPLE_CHUNK = 500      # launch-bound: one call for all 50 images of each of 10 classes


@dataclass(frozen=True)
class Machine:
    """What the fast path reads of a machine: the device type, the CPU's instruction set and whether it computes
    bf16 natively, the GPU model ('' without one) and the torch version."""
    device_type: str
    cpu_capability: str
    cpu_bf16: bool
    gpu: str
    torch_version: str

    @classmethod
    def of(cls, device: torch.device) -> "Machine":
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        return cls(device.type, torch.backends.cpu.get_cpu_capability(), cpu_has_native_bf16(), gpu,
                   torch.__version__)

    def describe(self) -> str:
        cpu = f"{cpu_model()} ({self.cpu_capability}{', native bf16' if self.cpu_bf16 else ', no native bf16'})"
        return f"{self.gpu + ' + ' if self.gpu else ''}{cpu}, torch {self.torch_version}"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX-512-BF16 or AMX tiles), as torch or /proc/cpuinfo says."""
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if getattr(torch.cpu, query, lambda: False)():
            return True
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo_field("flags").split()))


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpuinfo_field(name: str) -> str:
    """The value of the first ``name`` line of /proc/cpuinfo ('' where there is none, e.g. not on Linux)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@dataclass(frozen=True)
class FastPath:
    train_channels_last: bool = False
    sample_channels_last: bool = False
    bf16_autocast: bool = False
    fused_adam: bool = False
    cudnn_benchmark: bool = False
    fold_batchnorm: bool = False
    share_encoder: bool = False
    sample_chunk: int = PLAIN_SAMPLE_CHUNK
    compile: str = ""            # '' (eager), 'default' or 'reduce-overhead' (CUDA graphs): torch.compile's mode

    @classmethod
    def for_machine(cls, device: torch.device, in_channels: int = 3, compile: bool = False,
                    machine: Machine | None = None) -> "FastPath":
        """The default fast path on ``device`` for images of ``in_channels`` channels (docs/speed.md has the
        measurements behind each rule); ``compile`` adds torch.compile."""
        machine = machine or Machine.of(device)
        compile_mode = compile_mode_for(machine.device_type, compile)
        if machine.device_type == "cuda":
            return cls(train_channels_last=True, sample_channels_last=True, fused_adam=True, cudnn_benchmark=True,
                       fold_batchnorm=True, share_encoder=True, sample_chunk=CUDA_SAMPLE_CHUNK, compile=compile_mode)
        return cls(train_channels_last=in_channels == 3, sample_channels_last=True, fold_batchnorm=True,
                   share_encoder=True, bf16_autocast=machine.cpu_bf16, sample_chunk=CPU_SAMPLE_CHUNK,
                   compile=compile_mode)

    def describe(self) -> str:
        chosen = [name for name, value in vars(self).items() if value is True]
        if self.compile:
            chosen.append(f"compile ({self.compile})")
        chosen.append(f"{self.sample_chunk} images per sampling call")
        return ", ".join(chosen)


def path_for_run(device: torch.device, in_channels: int, fast: bool, compile: bool, precision: str,
                 distributed: bool = False) -> FastPath:
    """The path of a training run: the machine's fast path (the plain one with --no-fast), with --compile (without
    CUDA graphs under torchrun: ``distributed``), and with bf16 autocast on or off as --precision says ('auto': as
    the path has it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = (FastPath.for_machine(device, in_channels, compile) if fast
            else FastPath(compile=compile_mode_for(device.type, compile)))
    if distributed and path.compile:
        path = replace(path, compile="default")
    return path if precision == "auto" else replace(path, bf16_autocast=precision == "bf16")


def compile_mode_for(device_type: str, compile: bool) -> str:
    """torch.compile's mode for --compile: with CUDA graphs on CUDA, plain kernels elsewhere; '' without."""
    if not compile:
        return ""
    return "reduce-overhead" if device_type == "cuda" else "default"


def use_backend_settings(path: FastPath) -> None:
    """Set the global switches the path chooses (cudnn.benchmark; read only on CUDA): a training run does it once,
    tools/bench.py before every timed round of each path."""
    torch.backends.cudnn.benchmark = path.cudnn_benchmark


def make_optimizer(parameters, lr: float, path: FastPath) -> torch.optim.Adam:
    """Adam with a constant learning rate: fused when the fast path asks (on any device), else per tensor."""
    if path.fused_adam:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr, foreach=False)


ADAM_VARIANT = ("foreach", "fused", "capturable", "differentiable")    # how Adam computes, not what


@torch.no_grad()
def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved Adam state into this run's Adam: the file's numbers, this run's Adam variant and layout.

    ``load_state_dict`` alone takes the saving run's variant (fused or per tensor: keys of its param groups) and
    keeps every tensor's saved memory layout and device. A run saved on a GPU (fused Adam, channels_last weights)
    and resumed on a CPU would then run the fused kernel on moments laid out unlike the weights, which mixes up
    their elements (CUDA's fused kernel refuses them); resumed the other way, its GPU would run the per-tensor
    Adam. So this run's variant is kept, each step counter goes where its Adam reads it (the device for the fused
    Adam, the host for the per-tensor one, which reads it once per weight and step) and each moment is copied into
    its weight's layout: the same values, the same strides.
    """
    variants = [{key: group[key] for key in ADAM_VARIANT if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, variant in zip(optimizer.param_groups, variants):
        group.update(variant)
        steps_on_device = group.get("fused") or group.get("capturable")
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for name, value in list(state.items()):
                if name == "step" and torch.is_tensor(value):
                    state[name] = value.to(parameter.device if steps_on_device else "cpu")
                elif torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def to_channels_last(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch [N, C, H, W] in channels_last memory format when asked (same shape and values)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def network_to_channels_last(network: nn.Module, channels_last: bool) -> nn.Module:
    """Put the network's weights in channels_last memory format when asked (in place); returns the network."""
    return network.to(memory_format=torch.channels_last) if channels_last else network


def autocast(device: torch.device, path: FastPath):
    """bf16 autocast on the CPU or CUDA when the fast path asks, else a context that does nothing."""
    if path.bf16_autocast and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(network: nn.Module, path: FastPath) -> nn.Module:
    """The network compiled in the fast path's mode, or itself when the path does not compile."""
    return torch.compile(network, mode=path.compile) if path.compile else network


def mark_step_begin(path: FastPath) -> None:
    """Tell CUDA-graph trees that a new training step begins, so the last step's graph outputs may be reused."""
    if path.compile == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


class FastTraining(nn.Module):
    """The training network run as the fast path says: channels_last inputs and bf16 autocast (then the noise
    comes back as fp32, so the loss is fp32). ``forward(x, t, c)`` returns the noise [N, C, H, W]."""

    def __init__(self, network: nn.Module, path: FastPath):
        super().__init__()
        self.network = network
        self.path = path

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.path):
            return self.network(to_channels_last(x, self.path.train_channels_last), t, c).float()


class FastInference(nn.Module):
    """A network for sampling, run as the fast path says: BatchNorm folded into the convolutions, channels_last
    inputs, bf16 autocast, torch.compile. ``forward(x, t, c)`` returns fp32 noise [N, C, H, W].

    It works on a copy of ``network``; with ``copy=False`` on the network itself (put in eval mode), so that
    later in-place changes of its weights, such as EMA updates, reach a network compiled once.
    """

    def __init__(self, network: nn.Module, path: FastPath, copy: bool = True):
        super().__init__()
        network = (deepcopy(network) if copy else network).eval()
        if path.fold_batchnorm:
            fold_batchnorm(network)
        self.network = network_to_channels_last(network, path.sample_channels_last)
        self.call = compiled(self.network, path)
        self.path = path
        share = path.share_encoder and SharedEncoder.matches(self.network)
        self.copies = SharedEncoder(self.network) if share else None
        self.call_copies = compiled(self.copies, path) if self.copies is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.path):
            noise = self.call(to_channels_last(x, self.path.sample_channels_last), t, c)
        return self.detached(noise)

    def noise_of_copies(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, copies: int) -> torch.Tensor:
        """The noise of ``x.repeat(copies, 1, 1, 1)`` under c [copies * N, n_classes], with the U-Net's class-blind
        encoder run once on x [N, C, H, W] (``SharedEncoder``); [copies * N, C, H, W] fp32."""
        if self.call_copies is None or copies == 1:
            return self(repeat_batch(x, copies), t, c)
        with autocast(x.device, self.path):
            noise = self.call_copies(to_channels_last(x, self.path.sample_channels_last), t, c, copies)
        return self.detached(noise)

    def detached(self, noise: torch.Tensor) -> torch.Tensor:
        """fp32, and a copy of a CUDA graph's output, which its next replay overwrites."""
        return noise.float().clone() if self.path.compile == "reduce-overhead" else noise.float()


def repeat_batch(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """``tensor.repeat(copies, 1, 1, 1)`` in the tensor's own memory layout (``repeat`` returns the default one,
    which would make a channels_last network convert every layer's input)."""
    return torch.cat([tensor] * copies)


class _Replay(nn.Module):
    """A layer that returns, whatever its input, the output stored for it (SharedEncoder's second half)."""

    def __init__(self, outputs: dict, name: str):
        super().__init__()
        self.outputs, self.name = outputs, name

    def forward(self, *_inputs) -> torch.Tensor:
        return self.outputs[self.name]


class SharedEncoder(nn.Module):
    """The U-Net of networks/Conditional_UNet.py on ``copies`` copies of each image, one per class vector.

    Its first half (init_conv, encoder1, encoder2, to_hidden, decoder0, each feeding the next) sees neither t nor
    c, so with guidance, where the conditional and unconditional copies share y_t, it runs once on the N images
    and only the rest runs on all copies * N: 1.2x-1.3x less work per guided step. ``forward(x [N, C, H, W],
    t [copies * N, 1, 1, 1], c [copies * N, n_classes], copies)`` returns the noise [copies * N, C, H, W], the
    same numbers as ``unet(x.repeat(copies, 1, 1, 1), t, c)``; ``matches`` checks that on the network before it
    is used.

    The second half is the network's own ``forward``, run on a shallow copy of the network (made once) whose
    class-blind layers replay the first half's outputs, repeated for the copies. No hooks, no exceptions and no
    modules made per call: torch.compile captures the whole of it as one graph.
    """

    LAYERS = ("init_conv", "encoder1", "encoder2", "to_hidden", "decoder0", "decoder1", "decoder2", "final",
              "time_embedding1", "time_embedding2", "class_embedding1", "class_embedding2")
    SHARED = ("init_conv", "encoder1", "encoder2", "to_hidden", "decoder0")
    TOLERANCE = 1e-2      # relative error allowed by ``matches`` (see there)

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.shared_outputs: dict = {}
        second_half = copy.copy(unet)
        object.__setattr__(second_half, "_modules", dict(unet._modules))
        for name in self.SHARED:
            second_half._modules[name] = _Replay(self.shared_outputs, name)
        object.__setattr__(self, "second_half", second_half)       # not a submodule: its weights are unet's

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, copies: int) -> torch.Tensor:
        hidden = x
        for name in self.SHARED:
            hidden = getattr(self.unet, name)(hidden)
            self.shared_outputs[name] = repeat_batch(hidden, copies)
        noise = self.second_half(repeat_batch(x, copies), t, c)
        self.shared_outputs.clear()
        return noise

    @classmethod
    @torch.no_grad()
    def matches(cls, network: nn.Module) -> bool:
        """Whether ``network`` (in eval mode) has the U-Net's layers and computes the same noise through them.

        "The same" within TOLERANCE, relative to the noise's norm: the two halves run on batches of another size
        than the whole network, and on CUDA cuDNN may pick another algorithm per batch size, in TF32 by default
        (10 bits of mantissa: a relative error of 5e-4 to 7e-4 on these networks, with TF32 emulated on the CPU as
        tests/test_speed.py does); a first half that sees the class changes the noise by tens of percent.
        """
        if not all(hasattr(network, name) for name in cls.LAYERS + ("n_features", "in_channels", "height",
                                                                    "n_classes")):
            return False
        device = next(network.parameters()).device
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, network.in_channels, network.height, network.height, generator=generator).to(device)
        t = torch.rand(4, 1, 1, 1, generator=generator).to(device)
        c = torch.rand(4, network.n_classes, generator=generator).to(device)
        try:
            shared = cls(network)(x, t, c, 2)
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError):
            return False
        expected = network(x.repeat(2, 1, 1, 1), t, c)
        if shared.shape != expected.shape:
            return False
        return bool((shared - expected).float().norm() <= cls.TOLERANCE * expected.float().norm())


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
