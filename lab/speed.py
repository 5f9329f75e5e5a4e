"""The fast path: choices per machine class, from tools/bench.py's measurements, and the helpers that apply them.

``FastPath()`` is the straightforward path (fp32, eager, default memory format, per-tensor Adam, 250 images per
sampling call); ``FastPath.for_machine(device, ...)`` is the default fast path of the machine the device is on,
for a run of a given length. The measurements behind each rule are in docs/speed.md (its rule table is generated
from the committed benchmark CSVs); --no-fast turns every choice off, --no-compile keeps the run eager.

The choice is made by rules, not by an autotune at start: the sampling chunk size changes which random numbers
each image gets, and a table must come out the same from the same command on any machine of the same class. The
rules read capabilities, not the device type alone (``Machine.machine_class``): a CPU without AVX-512 ('cpu-avx2',
also CPUs that are not x86), with AVX-512 but no native bf16 ('cpu-avx512'), with native bf16 through
AVX-512-BF16 or AMX ('cpu-bf16'), an NVIDIA GPU ('cuda'), an Apple GPU ('mps').

- channels_last: NHWC convolutions (oneDNN on the CPU, tensor cores on CUDA), for training and for sampling;
  in training, GroupNorm normalises in NCHW, where the CPU computes it several times faster.
- bf16 autocast: on CPUs with native bf16 only. Emulated bf16 on an AVX2 CPU is an order of magnitude slower than
  fp32, and on the H200 these launch-bound networks ran slower with it. Weights, optimizer state, EMA and the
  loss stay fp32; only the network's matrix products and convolutions run in bf16.
- fused Adam: one kernel over all parameters instead of several per tensor (CUDA; the CPU runs it too). Its
  kernel reads the weights, gradients and moments as one flat buffer each, so they must share one memory
  layout: ``load_optimizer_state`` lays a loaded state out like the weights.
- cudnn.benchmark: cuDNN times its algorithms for each new input shape and keeps the fastest (CUDA).
- BatchNorm folding: in eval mode BatchNorm is a fixed affine map, which
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` merges into the preceding convolution (sampling only).
- share_encoder: with guidance, the U-Net's class-blind first half runs once for the conditional and the
  unconditional copy of each image (``SharedEncoder``; sampling only).
- sample_chunk: images per sampling call. A CPU runs the U-Net fastest when the activations of one call fit its
  caches, a GPU when one call holds as many images as possible.
- compile: torch.compile of the training network and of the sampling network, each on its own: compiling costs
  tens of seconds per input shape, so on a CPU a rule compiles only a run long enough to repay it
  (``Rule.compile_training_from``, ``Rule.compile_sampling_from``), and only where a C++ compiler works
  (``compile_problem``); otherwise the run stays eager and says so in one line. --compile forces it, on CUDA in
  ``mode="reduce-overhead"``, which captures each call in a CUDA graph and replays it with one launch; under
  torchrun in the default mode (DDP's gradient hooks between CUDA-graph replays are not a supported combination).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PRECISIONS = ("auto", "fp32", "bf16")
PLAIN_SAMPLE_CHUNK = 250     # images per sampling call of the plain path
CPU_SAMPLE_CHUNK = 80        # best of 20/40/80/160 on the AVX2 CPU for MNIST and CIFAR-10 at w > 0 (docs/speed.md)
CUDA_SAMPLE_CHUNK = 500      # launch-bound: one call for all 50 images of each of 10 classes
MACHINE_CLASSES = {
    "cpu-avx2": "CPU without AVX-512 (AVX2 or less; also CPUs that are not x86)",
    "cpu-avx512": "CPU with AVX-512, no native bf16",
    "cpu-bf16": "CPU with native bf16 (AVX-512-BF16 or AMX)",
    "cuda": "NVIDIA GPU",
    "mps": "Apple GPU",
}
# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) that leave out bf16: under them bf16 is emulated
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


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

    @property
    def machine_class(self) -> str:
        """One of MACHINE_CLASSES: the GPU's kind, else what the CPU computes natively."""
        if self.device_type in ("cuda", "mps"):
            return self.device_type
        if self.cpu_bf16:
            return "cpu-bf16"
        return "cpu-avx512" if self.cpu_capability.upper().startswith("AVX512") else "cpu-avx2"

    def describe(self) -> str:
        cpu = f"{cpu_model()} ({self.cpu_capability}{', native bf16' if self.cpu_bf16 else ', no native bf16'})"
        return f"{self.gpu + ' + ' if self.gpu else ''}{cpu}, torch {self.torch_version}"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX-512-BF16 or AMX tiles), as torch or /proc/cpuinfo says, and
    torch and oneDNN may use it: ATEN_CPU_CAPABILITY below AVX-512 or ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16
    (which tools/bench.py's measurements of the other machine classes set) leave bf16 emulated."""
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
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
    foreach_adam: bool = False
    cudnn_benchmark: bool = False
    fold_batchnorm: bool = False
    share_encoder: bool = False
    sample_chunk: int = PLAIN_SAMPLE_CHUNK
    compile_training: str = ""   # torch.compile's mode for the training network: '' (eager), 'default' or
    compile_sampling: str = ""   # 'reduce-overhead' (CUDA graphs); the same for the sampling network
    note: str = field(default="", compare=False)      # why the path does not compile where its rule would

    @classmethod
    def for_machine(cls, device: torch.device, in_channels: int = 3, compile: Optional[bool] = None,
                    machine: Machine | None = None, training_images: Optional[int] = None,
                    sampled_image_steps: Optional[int] = None) -> "FastPath":
        """The default fast path on ``device`` for images of ``in_channels`` channels (the rule of the device's
        machine class, RULES), for a run that trains on ``training_images`` images (epochs x images) and samples
        ``sampled_image_steps`` (images x sampler steps); None: a run that does not train, or does not sample.
        ``compile``: None compiles each network where the rule says the run repays compiling, True compiles
        both, False neither; on a CPU only where compiling works (``compile_problem``)."""
        machine = machine or Machine.of(device)
        rule = RULES[machine.machine_class]
        grey = in_channels != 3 and not rule.train_channels_last_grey
        path = replace(rule.path, train_channels_last=False) if grey else rule.path
        training, sampling, note = rule.compiles(compile, training_images, sampled_image_steps)
        if (training or sampling) and machine.device_type == "cpu" and compile_problem():
            training, sampling, note = False, False, f"eager: {compile_problem()}"
        mode = compile_mode_for(machine.device_type, True)
        return replace(path, compile_training=mode if training else "", compile_sampling=mode if sampling else "",
                       note=note)

    def describe(self) -> str:
        """The choices in a few words, e.g. 'channels_last (training, sampling), bf16 autocast, compile
        (sampling), BatchNorm folding, shared encoder, 80 images per sampling call'."""
        chosen = []
        channels_last = [name for name, on in (("training", self.train_channels_last),
                                               ("sampling", self.sample_channels_last)) if on]
        if channels_last:
            chosen.append(f"channels_last ({', '.join(channels_last)})")
        compiled_networks = [f"{name}{'' if mode == 'default' else ', ' + mode}" for name, mode in
                             (("training", self.compile_training), ("sampling", self.compile_sampling)) if mode]
        if compiled_networks:
            chosen.append(f"compile ({'; '.join(compiled_networks)})")
        chosen += [words for words, on in (("bf16 autocast", self.bf16_autocast), ("fused Adam", self.fused_adam),
                                           ("foreach Adam", self.foreach_adam),
                                           ("cudnn.benchmark", self.cudnn_benchmark),
                                           ("BatchNorm folding", self.fold_batchnorm),
                                           ("shared encoder", self.share_encoder)) if on]
        chosen.append(f"{self.sample_chunk} images per sampling call")
        return ", ".join(chosen) + (f" ({self.note})" if self.note else "")

    def announce(self, fast_flag: bool = True) -> str:
        """The line a run prints first: the path chosen and the flags that turn it off."""
        name = "plain path" if replace(self, compile_training="", compile_sampling="") == FastPath() else "fast path"
        flags = "; ".join(text for text, shown in (
            ("--no-fast: plain fp32 eager", fast_flag and name == "fast path"),
            ("--no-compile: eager", bool(self.compile_training or self.compile_sampling)),
            ("--compile: compile anyway", "too short" in self.note)) if shown)
        return f"{name}: {self.describe()} ({flags})"


@dataclass(frozen=True)
class Rule:
    """A machine class's default fast path: its ingredients (``path``, eager; channels_last training for
    3-channel images only unless ``train_channels_last_grey``) and the run length from which compiling each
    network repays its compile time, the break-even of tools/bench.py's compile rows (docs/speed.md) with a
    margin: ``compile_training_from`` training images (epochs x images), ``compile_sampling_from`` sampled
    image-steps (images x sampler steps); None: only with --compile."""
    path: FastPath
    compile_training_from: Optional[int] = None
    compile_sampling_from: Optional[int] = None
    train_channels_last_grey: bool = False       # channels_last training also for 1-channel images (MNIST)

    def compiles(self, compile: Optional[bool], training_images: Optional[int],
                 sampled_image_steps: Optional[int]) -> tuple[bool, bool, str]:
        """(compile training, compile sampling, a note on what stays eager and why) for a run that trains on
        ``training_images`` and samples ``sampled_image_steps`` (None: a run that does not train, or does not
        sample)."""
        if compile is not None:
            return compile, compile, ""
        phases = [("training", training_images, self.compile_training_from, "images"),
                  ("sampling", sampled_image_steps, self.compile_sampling_from, "image-steps")]
        pays = [limit is not None and work is not None and work >= limit for _, work, limit, _ in phases]
        short = [f"{name} under {limit:,} {unit}" for (name, work, limit, unit), paid in zip(phases, pays)
                 if limit is not None and work is not None and not paid]
        return pays[0], pays[1], f"eager for {' and '.join(short)}: too short to repay compiling" if short else ""


CPU_PATH = FastPath(sample_channels_last=True, train_channels_last=True, fold_batchnorm=True, share_encoder=True,
                    sample_chunk=CPU_SAMPLE_CHUNK)
RULES = {            # the measurements behind each: docs/speed.md, "The fast path's rules per machine class"
    "cpu-avx2": Rule(CPU_PATH, compile_training_from=500_000, compile_sampling_from=80_000),
    "cpu-avx512": Rule(CPU_PATH, compile_sampling_from=150_000, train_channels_last_grey=True),
    "cpu-bf16": Rule(replace(CPU_PATH, bf16_autocast=True), compile_sampling_from=150_000,
                     train_channels_last_grey=True),
    "cuda": Rule(FastPath(train_channels_last=True, sample_channels_last=True, fused_adam=True, cudnn_benchmark=True,
                          fold_batchnorm=True, share_encoder=True, sample_chunk=CUDA_SAMPLE_CHUNK)),
    "mps": Rule(CPU_PATH),
}


@functools.lru_cache(maxsize=None)
def compile_problem() -> str:
    """'' when torch.compile works on the CPU here, else why not, in a few words (checked once per process by
    compiling a one-line function: inductor needs a working C++ compiler, and some Python versions are not
    supported by some torch versions)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.arange(4.0))
    except Exception as error:        # whatever breaks the toolchain, the run goes on eager and says why
        return f"torch.compile does not work here ({type(error).__name__}: {first_line(error)})"
    return ""


def first_line(error: BaseException) -> str:
    """The first line of an error's message that says something (torch.compile's open with "backend=... raised:")."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.rstrip().endswith("raised:")]
    return lines[0][:200] if lines else ""


def path_for_run(device: torch.device, in_channels: int, fast: bool, compile: Optional[bool], precision: str,
                 distributed: bool = False, training_images: Optional[int] = None,
                 sampled_image_steps: Optional[int] = None) -> FastPath:
    """The path of a training run of ``training_images`` images (epochs x images) that samples
    ``sampled_image_steps``: the machine's fast path (the plain one with --no-fast, compiled only with
    --compile), compiled where --compile says (None: where the rule says it repays it; without CUDA graphs under
    torchrun: ``distributed``), with bf16 autocast on or off as --precision says ('auto': as the path has it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if fast:
        path = FastPath.for_machine(device, in_channels, compile, training_images=training_images,
                                    sampled_image_steps=sampled_image_steps)
    else:
        mode = compile_mode_for(device.type, bool(compile))
        path = FastPath(compile_training=mode, compile_sampling=mode)
    if distributed and path.compile_training:
        path = replace(path, compile_training="default", compile_sampling=path.compile_sampling and "default")
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
    """Adam with a constant learning rate: fused (one kernel for all tensors), foreach (a few kernels over lists
    of tensors) or per tensor, as the path asks, on any device."""
    if path.fused_adam:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr, foreach=path.foreach_adam)


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


def compiled(network: nn.Module, mode: str) -> nn.Module:
    """The network compiled in torch.compile's ``mode`` (``CompiledOrEager``), or itself when ``mode`` is ''."""
    return CompiledOrEager(network, mode) if mode else network


def compile_errors() -> tuple:
    """The exceptions by which torch.compile says that compiling failed (not that the network's code is wrong)."""
    from torch._dynamo import exc as dynamo_errors
    from torch._inductor import exc as inductor_errors
    names = (("BackendCompilerFailed", dynamo_errors), ("CppCompileError", inductor_errors),
             ("InductorError", inductor_errors))
    return tuple(getattr(module, name) for name, module in names if hasattr(module, name))


class CompiledOrEager(nn.Module):
    """``network`` compiled by torch.compile (``mode``; one graph per input shape, ``dynamic=False``, so that a
    resumed run computes each shape with the kernels of the uninterrupted one), which goes on eager, announced
    in one line, when compiling fails. ``forward`` takes and returns what ``network`` does."""

    def __init__(self, network: nn.Module, mode: str):
        super().__init__()
        self.network = network
        object.__setattr__(self, "compiled_network", torch.compile(network, mode=mode, dynamic=False))
        self.failed = False

    def forward(self, *inputs):
        if not self.failed:
            try:
                return self.compiled_network(*inputs)
            except compile_errors() as error:
                self.failed = True
                print(f"torch.compile failed ({type(error).__name__}: {first_line(error)}); going on eager",
                      flush=True)
        return self.network(*inputs)


def mark_step_begin(path: FastPath) -> None:
    """Tell CUDA-graph trees that a new training step begins, so the last step's graph outputs may be reused."""
    if path.compile_training == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


class FastTraining(nn.Module):
    """The training network run as the fast path says: channels_last inputs and bf16 autocast (then the noise
    comes back as fp32, so the loss is fp32). ``forward(x, t, c)`` returns the noise [N, C, H, W].

    With channels_last, its GroupNorm layers normalise in NCHW (``group_norm_in_nchw``)."""

    def __init__(self, network: nn.Module, path: FastPath):
        super().__init__()
        self.network = network
        self.path = path
        if path.train_channels_last:
            group_norm_in_nchw(network)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.path):
            return self.network(to_channels_last(x, self.path.train_channels_last), t, c).float()


def group_norm_in_nchw(network: nn.Module) -> None:
    """Give each GroupNorm layer of ``network`` its input in NCHW while the network trains (in place).

    On the CPU, GroupNorm keeps a channels_last input in channels_last, and its NHWC kernel is slow: forward and
    backward of GroupNorm(8, 32) on [128, 32, 28, 28] (the U-Net's final block on MNIST) took 20 ms in fp32 and
    54 ms in bf16 on one thread of the Xeon of docs/speed.md (the snippet there), against 10 and 8 ms in NCHW;
    the copies to NCHW and back cost far less. On a GPU, ATen's group_norm copies its input to NCHW itself, so
    there this changes nothing. Only in training mode: a network in eval mode (sampling, including copies made
    of this network) normalises as it always did, so sampled images and the metric tables made from them stay
    the same."""
    for layer in network.modules():
        if isinstance(layer, nn.GroupNorm):
            layer.register_forward_pre_hook(nchw_input_while_training)


def nchw_input_while_training(layer: nn.Module, inputs: tuple) -> tuple | None:
    """A forward pre-hook: the layer's input [N, C, H, W] in NCHW memory format in training mode, else as it is."""
    return (inputs[0].contiguous(),) + inputs[1:] if layer.training else None


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
        self.call = compiled(self.network, path.compile_sampling)
        self.path = path
        share = path.share_encoder and SharedEncoder.matches(self.network)
        self.copies = SharedEncoder(self.network) if share else None
        self.call_copies = compiled(self.copies, path.compile_sampling) if self.copies is not None else None

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
        return noise.float().clone() if self.path.compile_sampling == "reduce-overhead" else noise.float()


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
