"""Measure training and sampling throughput (images/s), the plain path and the fast path side by side.

    python -m tools.bench            # full: MNIST, CIFAR-10 (F=32, 64), every ingredient alone, 3 rounds
    python -m tools.bench --quick --device cpu   # a few minutes on 2 CPU cores: MNIST and CIFAR-10 F=32, plain,
                                     # the default path of a long run and each of its ingredients alone
    python -m tools.bench --compile  # on CUDA also torch.compile with and without CUDA graphs
    python -m tools.bench --devices cuda --configs cifar10 --batch-sizes 128 256 512 --compile     # on a GPU
    python -m tools.bench --complete # time complete sampling runs instead of scaling a few timed steps
    python -m tools.bench --configs butterflies-64 butterflies-128 --batch-sizes 64 --guidance 0 --per-class 20
                                     # sheet 2, 2.5: the unconditional U-Net at 64 and 128 px, a grid of 20 images
    python -m tools.bench --quick --csv docs/speed/NAME.csv   # also write the tables as CSV (docs/speed.md reads them)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m tools.bench ...   # as a CPU of the AVX2 class

"fast" is the machine's default path for a long run (lab/speed.py: the rule of its class, compiled where that
rule compiles a long run); the full benchmark adds every other ingredient alone and the default path with the
opposite compile choice, from which docs/speed.md's rule table reads what compiling saves and costs. The warm-up
columns time building, the first steps and compiling, in a fresh cache of compiled kernels.

Training: full steps of the real training loop (``training.training_step``: forward, loss, backward, Adam, EMA)
on batches drawn from an in-memory uint8 tensor on the device, after warm-up, and the memory of one step: the
activations its forward pass keeps for the backward pass (``step_memory``; on CUDA also the peak the allocator
reached). Sampling: ``DDPM.sample`` for
4 images per class with guidance w = 1 (conditional and unconditional halves; --guidance 0 needs only the
first), with the sheet's 400-step DDPM sampler and DDIM at 50 and 20 steps. Each step is one network call on
the same batch, so by default a run of a few steps is timed and scaled to the whole run; --complete times
every complete run. Variants are measured in alternating rounds (plain, fast, plain, fast, ...) and the median
round is reported, so that a load change on the machine hits both alike. A variant that computes one phase as an
earlier one does (an ingredient of sampling only, such as the shared encoder, trains as the plain path) is not
timed in that phase again (``same_as``; 'as <variant>' in the printed table, empty in the CSV). The last line is
JSON; --csv writes the same figures as a table (``csv_rows``), the form in which docs/speed.md keeps them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace

COMPILE_CACHE_NAMED = "TORCHINDUCTOR_CACHE_DIR" in os.environ   # read before torch's imports set its default one

import torch
import torch.nn.functional as F

from ddpm import class_grid_labels
from lab.checkpoints import network_from_config
from lab.cli import OneLineParser, add_guidance_flag, tool_flags
from lab.generation import SamplingModel, generate, sampling_model
from lab.speed import (PLAIN_SAMPLE_CHUNK, FastInference, FastPath, Machine, compile_mode_for, compile_problem, cpu_model,
                       use_backend_settings)
from lab.train_config import BUTTERFLIES, GEOMETRY, MNIST, SCRIPT_DEFAULTS
from training import Ranks, build_run, training_step
from utils import write_rows_csv

CONFIGS = {"mnist": ("mnist", 32), "cifar10": ("cifar10", 32), "cifar10-f64": ("cifar10", 64),
           "butterflies-64": ("butterflies-64", 32), "butterflies-128": ("butterflies-128", 32)}
# the image geometry of each measured data: the built-in datasets, and the butterflies (no classes) at two sizes
DATA = {**GEOMETRY, **{f"butterflies-{size}": dict(in_channels=3, image_size=size, n_classes=1) for size in (64, 128)}}
DEFAULT_CONFIGS = ("mnist", "cifar10", "cifar10-f64")      # without --configs; the butterflies only when named
SAMPLERS = (("ddpm", 400), ("ddim", 50), ("dpm++2m", 20), ("ddim", 20))
CHUNK_SIZES = (40, 80, 160, 250)        # images per sampling call that the full benchmark compares


LONG_RUN = 10 ** 12      # training images and sampled image-steps of a run long enough for every rule to compile
INGREDIENTS = {         # name -> the FastPath fields that make up one ingredient of the fast path
    "channels_last": ("train_channels_last", "sample_channels_last"), "bf16 autocast": ("bf16_autocast",),
    "fused adam": ("fused_adam",), "foreach adam": ("foreach_adam",), "cudnn benchmark": ("cudnn_benchmark",),
    "fold batchnorm": ("fold_batchnorm",), "shared encoder": ("share_encoder",),
    "compile": ("compile_training", "compile_sampling")}


PHASES = {               # FastPath field -> the images/s it is meant to raise: a training step's, or sampling's
    "train_channels_last": "train_img_s", "sample_channels_last": "ddpm400_img_s", "bf16_autocast": "both",
    "fused_adam": "train_img_s", "foreach_adam": "train_img_s", "cudnn_benchmark": "both",
    "fold_batchnorm": "ddpm400_img_s", "share_encoder": "ddpm400_img_s", "compile_training": "train_img_s",
    "compile_sampling": "ddpm400_img_s"}


def phase_choices(path: FastPath, phase: str) -> tuple:
    """The choices of ``path`` that decide how it computes ``phase`` ('train_img_s' or 'ddpm400_img_s')."""
    return tuple(getattr(path, field) for field, raises in PHASES.items() if raises in (phase, "both"))


def same_as(chosen: dict[str, FastPath], phase: str) -> dict[str, str]:
    """The variants not to time in ``phase``: name -> the variant whose figures they would repeat. A variant that
    computes that phase as the plain path does (a sampling-only ingredient in training, and the reverse) would
    show only round-to-round noise; a variant that compiles that phase as an earlier one does would find the
    other's kernels in the cache and show no compile time. Every other variant is timed, also where it
    repeats an eager one (an ingredient alone that is all the fast path changes in that phase)."""
    compiles = "compile_training" if phase == "train_img_s" else "compile_sampling"
    first, same = {}, {}
    for name, path in chosen.items():
        choices = phase_choices(path, phase)
        earlier = first.setdefault(choices, name)
        if earlier != name and (earlier == "plain" or getattr(path, compiles)):
            same[name] = earlier
    return same


def timed_in(chosen: dict[str, FastPath], phase: str) -> dict[str, FastPath]:
    """The variants to time in ``phase`` (all but ``same_as``)."""
    same = same_as(chosen, phase)
    return {name: path for name, path in chosen.items() if name not in same}


def default_path(device: torch.device, in_channels: int) -> FastPath:
    """The machine's default fast path for a long run: the rule's ingredients, compiled where the rule compiles
    a long run."""
    return FastPath.for_machine(device, in_channels, training_images=LONG_RUN, sampled_image_steps=LONG_RUN)


def ingredients(path: FastPath) -> dict[str, FastPath]:
    """Each ingredient of ``path`` alone on the plain path: '<ingredient> only' -> FastPath (the sampling chunk
    is measured by the evaluate.py-style rows)."""
    plain, alone = FastPath(), {}
    for name, fields in INGREDIENTS.items():
        chosen = {field: getattr(path, field) for field in fields if getattr(path, field) != getattr(plain, field)}
        if chosen:
            alone[f"{name} only"] = replace(plain, **chosen)
    return alone


def every_ingredient(device: torch.device, emulated_bf16: bool, compile_too: bool) -> FastPath:
    """Every ingredient this device can run: bf16 where it is native (or ``emulated_bf16``), cuDNN's autotuner on
    CUDA, torch.compile on a CPU where it works (on CUDA with ``compile_too``)."""
    compiles = compile_too if device.type == "cuda" else device.type == "cpu" and not compile_problem()
    mode = compile_mode_for(device.type, compiles)
    return FastPath(train_channels_last=True, sample_channels_last=True, fold_batchnorm=True, share_encoder=True,
                    bf16_autocast=device.type == "cuda" or Machine.of(device).cpu_bf16 or emulated_bf16,
                    fused_adam=True, foreach_adam=True, cudnn_benchmark=device.type == "cuda",
                    compile_training=mode, compile_sampling=mode)


def variants(device: torch.device, in_channels: int, full: bool, compile_too: bool,
             emulated_bf16: bool = False) -> dict[str, FastPath]:
    """name -> fast-path choices: plain first, the default fast path of a long run second, then each of its
    ingredients alone; ``full`` adds every other ingredient alone and the default path with the opposite compile
    choice (eager where it compiles, compiled where it does not); ``compile_too`` adds CUDA graphs on CUDA."""
    fast = default_path(device, in_channels)
    chosen = {"plain": FastPath(), "fast": fast, **ingredients(fast)}
    if full:
        chosen.update(ingredients(every_ingredient(device, emulated_bf16, compile_too)))
        if fast.compile_training or fast.compile_sampling:
            chosen["fast, eager"] = replace(fast, compile_training="", compile_sampling="")
        if device.type == "cpu" and not compile_problem() and not (fast.compile_training and fast.compile_sampling):
            chosen["fast + compile"] = replace(fast, compile_training="default", compile_sampling="default")
    if compile_too and device.type == "cuda":
        chosen["fast + compile"] = replace(fast, compile_training="default", compile_sampling="default")
        chosen["fast + graphs"] = replace(fast, compile_training="reduce-overhead",
                                          compile_sampling="reduce-overhead")
    return chosen


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def script_defaults(dataset: str):
    """The training script's settings for a measured data (the butterflies at any size: train_butterflies.py's)."""
    return BUTTERFLIES if dataset.startswith("butterflies") else SCRIPT_DEFAULTS[dataset]


def benchmark_run(dataset: str, n_features: int, device: torch.device, path: FastPath, batch_size: int):
    """A training run of the script's settings at this size, and 4 batches of random images (uint8) and labels."""
    base = MNIST if dataset in GEOMETRY else script_defaults(dataset)
    config = replace(base, n_features=n_features, batch_size=batch_size, device=device.type,
                     flip=dataset != "mnist", **DATA[dataset])
    run = build_run(config, Ranks(), device, path)
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size * 4, config.in_channels, config.image_size, config.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, config.n_classes, (len(images),), generator=generator).to(device)
    return run, images, labels


def training_rounds(dataset: str, n_features: int, device: torch.device, path: FastPath, batch_size: int, steps: int):
    """A generator: the first next() builds and warms up; each further next() times ``steps`` steps -> images/s."""
    run, images, labels = benchmark_run(dataset, n_features, device, path, batch_size)
    batches = [torch.arange(i * batch_size, (i + 1) * batch_size, device=device) for i in range(4)]
    for step in range(3):                                  # warm-up (and compilation, graph capture)
        training_step(run, images[batches[step]], labels[batches[step]])
    synchronize(device)
    yield None
    while True:
        use_backend_settings(path)                         # this path's switches, whatever ran in between
        started = time.perf_counter()
        for step in range(steps):
            batch = batches[step % 4]
            training_step(run, images[batch], labels[batch])
        synchronize(device)
        yield batch_size * steps / (time.perf_counter() - started)


def step_memory(dataset: str, n_features: int, device: torch.device, path: FastPath, batch_size: int) -> dict:
    """The memory of one training step after a warm-up step, in MiB: ``activations``, the tensors its forward
    pass keeps for the backward pass (distinct storages, the weights and their low-precision copies left out:
    what grows with batch and image size), ``state``, the fp32 weights, gradients, Adam's two moments and the EMA
    copy (5 x 4 bytes per parameter), and on CUDA ``cuda_peak``, the most the allocator held during the step."""
    run, images, labels = benchmark_run(dataset, n_features, device, path, batch_size)
    batch = torch.arange(batch_size, device=device)
    training_step(run, images[batch], labels[batch])
    weights = {parameter.untyped_storage().data_ptr() for parameter in run.model.nn_model.parameters()}
    kept = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and not (tensor.requires_grad and tensor.is_leaf):
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training_step(run, images[batch], labels[batch])
    mib = 2 ** 20
    parameters = sum(parameter.numel() for parameter in run.model.nn_model.parameters())
    memory = {"activations": sum(kept.values()) / mib, "state": 5 * 4 * parameters / mib}
    if device.type == "cuda":
        synchronize(device)
        memory["cuda_peak"] = torch.cuda.max_memory_allocated(device) / mib
    return memory


def untrained_network(dataset: str, n_features: int, device: torch.device, path: FastPath) -> torch.nn.Module:
    """The U-Net of a config with the same random weights every time (seed 0), in eval mode on ``path``: the bare
    network for the plain path, else ``FastInference`` around it."""
    torch.manual_seed(0)
    network = network_from_config(dict(DATA[dataset], n_features=n_features)).to(device).eval()
    return network if path == FastPath() else FastInference(network, path)


def benchmark_model(dataset: str, n_features: int, device: torch.device, path: FastPath,
                    chunk_size: int) -> SamplingModel:
    """``untrained_network`` in a DDPM with the script's schedule, sampling ``chunk_size`` images per call."""
    config = dict(dataclasses.asdict(script_defaults(dataset)), **DATA[dataset], n_features=n_features)
    return sampling_model(untrained_network(dataset, n_features, device, path), config, device, chunk_size)


def sampling_rounds(dataset: str, n_features: int, device: torch.device, path: FastPath, per_class: int,
                    sampler: str, steps: int, guidance: float):
    """Like ``training_rounds`` for one guided sampling run of ``per_class`` images per class with ``steps`` steps
    of ``sampler`` and guidance weight ``guidance`` (w = 0 needs no unconditional half); each round yields
    images/s."""
    n_classes = DATA[dataset]["n_classes"]
    labels = class_grid_labels(range(n_classes), per_class).to(device)
    model = benchmark_model(dataset, n_features, device, path, len(labels))
    conditions = F.one_hot(labels, n_classes).float()

    def run(name: str, n_steps: int) -> None:
        generate(model, conditions, guidance, sampler=name, steps=None if name == "ddpm" else n_steps)

    use_backend_settings(path)
    run("ddim", 2)                                            # warm-up
    synchronize(device)
    yield None
    while True:
        use_backend_settings(path)
        started = time.perf_counter()
        run(sampler, steps)
        synchronize(device)
        yield len(labels) / (time.perf_counter() - started)


def evaluation_rounds(dataset: str, n_features: int, device: torch.device, path: FastPath, n_images: int,
                      steps: int, guidance: float):
    """Like ``sampling_rounds`` for ``n_images`` images sampled the way tools/evaluate.py does (``generation.generate``,
    ``path.sample_chunk`` images per call) with ``steps`` DDIM steps; each round yields images/s."""
    geometry = DATA[dataset]
    model = benchmark_model(dataset, n_features, device, path, path.sample_chunk)
    conditions = F.one_hot(torch.arange(n_images) % geometry["n_classes"], geometry["n_classes"]).float()
    use_backend_settings(path)
    generate(model, conditions[:path.sample_chunk], guidance, sampler="ddim", steps=1)          # warm-up
    synchronize(device)
    yield None
    while True:
        use_backend_settings(path)
        started = time.perf_counter()
        generate(model, conditions, guidance, sampler="ddim", steps=steps)
        synchronize(device)
        yield n_images / (time.perf_counter() - started)


def alternate(round_makers: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Warm every variant up, then time them in alternating rounds. Returns the median images/s of each, and the
    seconds of each warm-up (building, the first steps and, for a compiled variant, compiling)."""
    generators = {name: make() for name, make in round_makers.items()}
    warmup = {}
    for name, generator in generators.items():
        started = time.perf_counter()
        next(generator)
        warmup[name] = time.perf_counter() - started
    results = {name: [] for name in generators}
    for _ in range(rounds):
        for name, generator in generators.items():
            results[name].append(next(generator))
    return {name: statistics.median(values) for name, values in results.items()}, warmup


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads"


def measure(device: torch.device, config_name: str, args) -> dict:
    dataset, n_features = CONFIGS[config_name]
    chosen = variants(device, DATA[dataset]["in_channels"], not args.quick, args.compile, args.emulated_bf16)
    train, memory, train_warmup = {}, {}, {}
    training, sampling = timed_in(chosen, "train_img_s"), timed_in(chosen, "ddpm400_img_s")
    for batch_size in args.batch_sizes:
        train[batch_size], train_warmup[batch_size] = alternate({name: (lambda p=path, b=batch_size: training_rounds(
            dataset, n_features, device, p, b, args.train_steps)) for name, path in training.items()}, args.rounds)
        # the memory of the eager step: a compiled one would compile once more just for this
        memory[batch_size] = {name: step_memory(dataset, n_features, device, replace(path, compile_training=""),
                                                batch_size) for name, path in training.items()}
    sample = {}
    for sampler, steps in SAMPLERS:
        timed = steps if args.complete else min(steps, args.timed_steps)
        # every step costs one network call on the same batch: a run of `timed` DDIM steps times the step,
        # scaled to the whole run, unless --complete times the whole run of this sampler itself
        rates, sample_warmup = alternate({name: (lambda p=path: sampling_rounds(
            dataset, n_features, device, p, args.per_class, sampler if args.complete else "ddim", timed,
            args.guidance)) for name, path in sampling.items()}, args.rounds)
        sample[f"{sampler}{steps}"] = {name: rate * timed / steps for name, rate in rates.items()}
        if not args.complete:
            for other, other_steps in SAMPLERS[1:]:
                sample[f"{other}{other_steps}"] = {name: rate * timed / other_steps for name, rate in rates.items()}
            break
    # tools/evaluate.py's sampling: --eval-images images at w = 1 on the fast path (eager: the chunk size is what
    # differs), with 250 images per call (the plain path's), the fast path's chunk size and, in the full
    # benchmark, others; a few DDIM steps timed and scaled to the 400 steps of the DDPM sampler
    fast = replace(chosen["fast"], compile_training="", compile_sampling="")
    chunks = sorted({PLAIN_SAMPLE_CHUNK, fast.sample_chunk, *(() if args.quick else CHUNK_SIZES)})
    paths = {f"{chunk} per call": replace(fast, sample_chunk=chunk) for chunk in chunks}
    evaluation, _ = alternate({name: (lambda p=path: evaluation_rounds(
        dataset, n_features, device, p, args.eval_images, args.eval_steps, 1.0)) for name, path in paths.items()},
        args.rounds)
    return {"device": device_name(device), "config": config_name, "n_features": n_features, "guidance": args.guidance,
            "fast_path": {name: path.describe() for name, path in chosen.items()},
            "same_as": {phase: same_as(chosen, phase) for phase in ("train_img_s", "ddpm400_img_s")},
            "train_img_s": train, "train_warmup_s": train_warmup, "step_memory_mib": memory,
            "sample_img_s": sample, "sample_warmup_s": sample_warmup,
            "evaluate_ddpm400_img_s": {name: rate * args.eval_steps / 400 for name, rate in evaluation.items()}}


# ----------------------------------------------------------------------------------------------------------------
# What a full benchmark's CSV says about each rule (docs/speed.md's rule table, tests/test_speed.py)
# ----------------------------------------------------------------------------------------------------------------

def ingredient_ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """FastPath field -> config -> images/s of its ingredient alone over the plain path's, in the phase the field
    speeds up (the lower of the two for a field of both), from one machine's rows of ``csv_rows``."""
    ratios: dict[str, dict[str, float]] = {}
    for config in dict.fromkeys(row["config"] for row in rows):
        named = {row["path"]: row for row in rows if row["config"] == config}
        for ingredient, fields in INGREDIENTS.items():
            row = named.get(f"{ingredient} only")
            for field in fields if row else ():
                keys = ("train_img_s", "ddpm400_img_s") if PHASES[field] == "both" else (PHASES[field],)
                ratios.setdefault(field, {})[config] = min(
                    float(row[key]) / float(named["plain"][key]) for key in keys)
    return ratios


def compiled_phases(row: dict) -> set[str]:
    """Which networks a benchmark row's path compiled ('training', 'sampling'), read from its 'choices' column
    (``FastPath.describe``); a CSV without that column compiled both in its 'fast' row when it has a 'fast, eager'
    row, and in its 'fast + compile' row."""
    if row.get("choices") is not None:
        found = re.search(r"compile \(([^)]*)\)", row["choices"])
        return {phase for phase in ("training", "sampling") if found and phase in found.group(1)}
    return {"training", "sampling"} if row["path"] in ("fast", "fast + compile") else set()


def compile_break_even(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """'training' -> config -> training images, 'sampling' -> config -> sampled image-steps, after which compiling
    that network of the default path has saved its compile time: the warm-up seconds it adds over the same path
    eager, divided by the seconds it saves per image (per image-step for sampling). None where compiling did not
    make that phase faster. From a full benchmark's rows 'fast', 'fast, eager' and 'fast + compile'."""
    found: dict[str, dict[str, float | None]] = {"training": {}, "sampling": {}}
    for config in dict.fromkeys(row["config"] for row in rows):
        named = {row["path"]: row for row in rows if row["config"] == config}
        variants = [named[name] for name in ("fast, eager", "fast", "fast + compile") if name in named]
        for phase, rate, warmup, steps in (("training", "train_img_s", "train_warmup_s", 1),
                                           ("sampling", "ddpm400_img_s", "sample_warmup_s", 400)):
            timed = [row for row in variants if row.get(rate)]          # not timed: as an earlier variant
            eager = next((row for row in timed if phase not in compiled_phases(row)), None)
            compiled_row = next((row for row in timed if phase in compiled_phases(row)), None)
            if eager is None or compiled_row is None:
                continue
            saved = 1 / (float(eager[rate]) * steps) - 1 / (float(compiled_row[rate]) * steps)
            extra = float(compiled_row[warmup]) - float(eager[warmup])
            found[phase][config] = max(extra, 0.0) / saved if saved > 0 else None
    return found


def figure(values: dict, name: str, width: int, digits: int, same: dict[str, str]) -> str:
    """One variant's figure right-aligned in ``width``, or 'as <variant>' where that phase was not timed for it
    (``same_as``)."""
    return f"{values[name]:>{width}.{digits}f}" if name in values else f"{'as ' + same[name]:>{width}}"


def measured(values: dict, name: str, same: dict[str, str]) -> float:
    """A variant's figure, or that of the variant it computes as where it was not timed (``same_as``)."""
    return values[name] if name in values else values[same[name]]


def ratio(values: dict, name: str) -> str:
    return f"{values[name] / values['plain']:.2f}" if name in values else "-"


def print_table(result: dict) -> None:
    names = list(result["fast_path"])
    batch_sizes = list(result["train_img_s"])
    first = batch_sizes[0]
    print(f"\n{result['config']} (F={result['n_features']}) on {result['device']}; sampling with "
          f"w = {result['guidance']:g}; 'as X': computes that phase as variant X does, not timed again")
    same_train, same_sample = result["same_as"]["train_img_s"], result["same_as"]["ddpm400_img_s"]
    print(f"  {'path':<24}" + "".join(f"{'train@' + str(b) + ' img/s':>18}" for b in batch_sizes)
          + "".join(f"{key + ' img/s':>17}" for key in result["sample_img_s"])
          + f"{'x plain: train / sample':>25}{'warm-up s: train / sample':>27}")
    train, sample = result["train_img_s"][first], result["sample_img_s"]["ddpm400"]
    fast_train = measured(train, "fast", same_train)                            # 'fast' may train as 'plain'
    fast_sample, fast_ddim = (measured(rates, "fast", same_sample)
                              for rates in (sample, result["sample_img_s"]["ddim50"]))
    for name in names:
        row = f"  {name:<24}" + "".join(figure(result["train_img_s"][b], name, 18, 1, same_train)
                                        for b in batch_sizes)
        row += "".join(figure(result["sample_img_s"][key], name, 17, 2, same_sample) for key in result["sample_img_s"])
        row += f"{ratio(train, name):>17} / {ratio(sample, name):<5}"
        row += f"{figure(result['train_warmup_s'][first], name, 19, 1, same_train)} / "
        row += figure(result["sample_warmup_s"], name, 5, 1, same_sample).strip()
        print(row)
    for batch_size in batch_sizes:
        rates, memory = result["train_img_s"][batch_size], result["step_memory_mib"][batch_size]
        print(f"  a training step of {batch_size} images: " + ", ".join(
            f"{name} {batch_size / rates[name]:.3g} s, activations {memory[name]['activations']:.0f} MiB"
            + (f", CUDA peak {memory[name]['cuda_peak']:.0f} MiB" if "cuda_peak" in memory[name] else "")
            for name in names if name in rates) + f"; weights, gradients, Adam and EMA {memory['plain']['state']:.0f} MiB")
    print(f"  fast/plain: training x{fast_train / train['plain']:.2f} (batch {first}), sampling "
          f"x{fast_sample / sample['plain']:.2f}; DDIM-50 fast vs DDPM-400 plain "
          f"x{fast_ddim / sample['plain']:.1f}  (fast = {result['fast_path']['fast']})")
    evaluation = result["evaluate_ddpm400_img_s"]
    reference = evaluation[f"{PLAIN_SAMPLE_CHUNK} per call"]
    print("  tools/evaluate.py-style, DDPM-400 img/s: " + ", ".join(
        f"{name} {rate:.2f} (x{rate / reference:.2f})" for name, rate in evaluation.items()))


CSV_COLUMNS = ("machine", "machine_class", "device", "command", "config", "n_features", "guidance", "timing", "path",
               "choices", "batch_size",
               "train_img_s", "step_s", "train_warmup_s", "sample_warmup_s", "activations_mib", "state_mib",
               "cuda_peak_mib",
               *(f"{sampler}{steps}_img_s" for sampler, steps in SAMPLERS))


def csv_rows(result: dict, command: str, complete: bool, timed_steps: int) -> list[dict]:
    """The rows of one ``measure`` result for --csv: one per path and training batch size (images/s of training,
    seconds, warm-ups and memory of a step, images/s of each sampler; empty for a phase in which the path was not
    timed, ``same_as``), then one per tools/evaluate.py-style run (path 'evaluate.py-style, N per call', its
    images/s scaled to the DDPM sampler's 400 steps)."""
    common = {"machine": result["machine"], "machine_class": result["machine_class"], "device": result["device"],
              "command": command, "config": result["config"], "n_features": result["n_features"],
              "guidance": result["guidance"],
              "timing": "complete runs" if complete else f"{timed_steps} steps timed, scaled"}
    rows = []
    for batch_size, train in result["train_img_s"].items():
        for name in result["fast_path"]:
            row = dict(common, path=name, choices=result["fast_path"][name], batch_size=batch_size)
            if name in train:                                   # timed in training (``timed_in``)
                memory = result["step_memory_mib"][batch_size][name]
                row.update(train_img_s=round(train[name], 1), step_s=round(batch_size / train[name], 3),
                           train_warmup_s=round(result["train_warmup_s"][batch_size][name], 1),
                           activations_mib=round(memory["activations"]), state_mib=round(memory["state"], 1),
                           cuda_peak_mib=round(memory.get("cuda_peak", 0)) or "")
            if name in result["sample_warmup_s"]:               # timed in sampling
                row["sample_warmup_s"] = round(result["sample_warmup_s"][name], 1)
                row.update({f"{key}_img_s": round(rates[name], 2) for key, rates in result["sample_img_s"].items()})
            rows.append(row)
    for name, rate in result["evaluate_ddpm400_img_s"].items():
        rows.append(dict(common, path=f"evaluate.py-style, {name}", ddpm400_img_s=round(rate, 2)))
    return rows


def instruction_set_caps() -> str:
    """', measured with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2' where these variables cap what torch and
    oneDNN use of the CPU (how the benchmark measures a machine class below the CPU it runs on), else ''."""
    caps = [f"{name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if name in os.environ]
    return f", measured with {' '.join(caps)}" if caps else ""


def fresh_compile_cache() -> str:
    """Give inductor an empty cache folder for this run (unless TORCHINDUCTOR_CACHE_DIR names one), so that each
    compiled variant's warm-up is the compile time of a first run, not a lookup of an earlier run's kernels."""
    if not COMPILE_CACHE_NAMED:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def allow_recompiles() -> None:
    """Let every variant compile its own graphs: torch.compile keeps at most 8 per function by default (then runs
    it eager), and the variants call the same functions on other networks."""
    import torch._dynamo.config as dynamo_config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 256)


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    flags = tool_flags(parser)
    parser.add_argument("--quick", action="store_true", help="plain, fast and fast's ingredients alone, MNIST and "
                        "CIFAR-10 F=32, three rounds of 3 training steps and of 20 sampling steps")
    parser.add_argument("--compile", action="store_true", help="on CUDA also measure torch.compile with and "
                        "without CUDA graphs (the CPU's compiling rows come with the full benchmark); compiling is "
                        "excluded from the timing")
    parser.add_argument("--emulated-bf16", action="store_true", help="also measure bf16 autocast on a CPU "
                        "without native bf16 (11x-28x slower on the AVX2 CPU of docs/speed.md)")
    parser.add_argument("--devices", "--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help=f"default: {' '.join(DEFAULT_CONFIGS)} (--quick: mnist cifar10)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128],
                        help="training batches to measure (default: 128, the scripts')")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps per round (default: 3 with "
                        "--quick, else 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant (default 3)")
    parser.add_argument("--timed-steps", type=int, default=None, help="sampling steps timed per round and scaled "
                        "to the whole run (default: 20 with --quick, else 40)")
    parser.add_argument("--complete", action="store_true", help="time complete sampling runs of every sampler")
    parser.add_argument("--per-class", type=int, default=4, help="images per class in a sampling run (default 4)")
    parser.add_argument("--eval-images", type=int, default=250, help="images of the tools/evaluate.py-style run at "
                        "w = 1 (default 250)")
    parser.add_argument("--eval-steps", type=int, default=None, help="DDIM steps timed per round of the "
                        "tools/evaluate.py-style run (default: 2 with --quick, else 4)")
    parser.add_argument("--csv", default=None, help="also write the results as a CSV table (docs/speed/*.csv); an "
                        "existing file is replaced")
    add_guidance_flag(flags, many=False, default=1.0)
    args = parser.parse_args()
    args.train_steps = args.train_steps or (3 if args.quick else 5)
    args.timed_steps = args.timed_steps or (20 if args.quick else 40)
    args.eval_steps = args.eval_steps or (2 if args.quick else 4)
    configs = args.configs or (["mnist", "cifar10"] if args.quick else list(DEFAULT_CONFIGS))
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = []
    allow_recompiles()
    print(f"compiled kernels cached in {fresh_compile_cache()}")
    for device in devices:
        found = Machine.of(torch.device(device))
        machine = found.describe() + instruction_set_caps()
        print(f"{device}: {machine}, {torch.get_num_threads()} CPU threads; machine class {found.machine_class}")
        for config_name in configs:
            result = dict(measure(torch.device(device), config_name, args), machine=machine,
                          machine_class=found.machine_class)
            print_table(result)
            results.append(result)
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        command = "python -m tools.bench " + shlex.join(sys.argv[1:])
        write_rows_csv([row for result in results for row in csv_rows(result, command, args.complete,
                                                                        args.timed_steps)], args.csv, CSV_COLUMNS)
        print(f"wrote {args.csv}")
    print(json.dumps({"torch": torch.__version__, "quick": args.quick, "results": results}))


if __name__ == "__main__":
    main()
