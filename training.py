"""The one training loop behind train_mnist.py and train_cifar10.py (sheet 1, tasks 3 and 4; sheet 2, 2.2).

``TrainConfig`` holds every setting; ``main(defaults)`` turns the command line into a config and calls ``train``.
Each epoch the loop trains on the whole in-memory dataset (Algorithm 1), measures the test loss at fixed
timesteps and noise (sheet 2, 2.2 e), and writes, named with the 1-based epoch E:

    image_ep{E}_w{w}.png   4 generated rows (one class per column) above 4 rows of real images
    gif_ep{E}_w{w}.gif     the reverse process of those samples
    model_ep{E}.pth        a resumable checkpoint (see checkpoints.py), written atomically
    loss.csv, loss.png     mean train loss and test loss per epoch; test_loss_by_t.png, test loss against t
"""
import argparse
import dataclasses
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from checkpoints import CheckpointError, config_differences, load_checkpoint, save_checkpoint
from cli import DEVICES, OneLineParser, exit_on_error, resolve_device
from ddpm import DDPM, LOSS_TYPES, SAMPLERS, SCHEDULES
from ema import EMA
from image_data import DataError, ImageSet, load_builtin, load_image_folder, test_folder_for
from speed import FastPath, autocast, fast_sampler, make_optimizer, network_to_channels_last, to_channels_last

CHECKPOINT_NAME = re.compile(r"^model_ep(\d+)(?:_step(\d+))?\.pth$")


@dataclass
class TrainConfig:
    """Every setting of a training run; the scripts' flags map one to one onto these fields."""
    dataset: str = "mnist"                 # 'mnist' or 'cifar10': built-in data and image geometry
    data_root: str = "./data"              # torchvision layout; downloaded only when missing
    image_folder: str | None = None        # class-per-subfolder images instead of the built-in dataset
    cache_dir: str = "~/.cache/cfg_ddpm"   # decoded --image-folder tensors ('' turns caching off)
    out: str = "log_mnist"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    n_features: int = 32
    timesteps: int = 400
    beta1: float = 1e-4
    beta2: float = 0.02
    schedule: str = "linear"
    loss: str = "l2"
    drop_prob: float = 0.1
    ema_decay: float = 0.999
    flip: bool = False
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0])
    n_sample: int = 4                      # generated images per class in each grid
    sampler: str = "ddpm"                  # sampler of the grids and GIFs
    sample_steps: int | None = None        # DDIM steps (default T)
    clip_denoised: bool = False            # clip the predicted y_0 while sampling (off: Algorithm 2 exactly)
    sample_every: int = 5
    gif_every: int = 5
    save_every: int = 5
    eval_every: int = 1                    # test loss every this many epochs (0: never)
    eval_images: int = 500
    eval_timesteps: int = 10
    subset: int | None = None
    device: str = "auto"
    seed: int = 0
    fast: bool = True                      # the measured fast path of speed.py (--no-fast: plain fp32 eager)
    compile: bool = False
    resume: str | None = None
    overwrite: bool = False
    # image geometry, set by the dataset
    in_channels: int = 1
    image_size: int = 28
    n_classes: int = 10


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

HELP = {
    "data_root": "folder with the dataset in torchvision's layout (downloaded only when missing)",
    "image_folder": "train on a class-per-subfolder image folder instead (resized to the dataset's size); "
                    "a 'test' sibling folder, when present, is the test split",
    "cache_dir": "where decoded --image-folder tensors are cached ('' disables the cache)",
    "out": "folder for every file the run writes",
    "epochs": "total number of epochs (also when resuming)",
    "batch_size": "images per training step",
    "lr": "Adam learning rate (constant)",
    "n_features": "U-Net width F (divisible by 8)",
    "timesteps": "diffusion steps T",
    "beta1": "beta_1 of the linear/sigmoid schedule",
    "beta2": "beta_T of the linear/sigmoid schedule",
    "schedule": "beta schedule (cosine ignores --beta1/--beta2)",
    "loss": "noise-prediction loss",
    "drop_prob": "probability of training a sample unconditionally (c = 0)",
    "ema_decay": "decay of the exponential moving average of the weights used for sampling (0: off)",
    "flip": "random horizontal flips",
    "guidance": "guidance weights w of the sample grids",
    "n_sample": "generated images per class in each grid",
    "sampler": "sampler for grids and GIFs: the sheet's ddpm (T steps) or ddim",
    "sample_steps": "number of DDIM steps (default T)",
    "clip_denoised": "clip the predicted y_0 to [-1, 1] at every sampling step (needed by the cosine schedule)",
    "sample_every": "epochs between sample grids (the last epoch always gets one)",
    "gif_every": "epochs between GIFs of the reverse process (the last epoch always gets one)",
    "save_every": "epochs between checkpoints (the last epoch always gets one)",
    "eval_every": "epochs between test-loss measurements (0: never)",
    "eval_images": "test images in the test loss",
    "eval_timesteps": "timesteps, spread over 1..T, at which the test loss is measured",
    "subset": "train on the first N training images only",
    "device": "auto picks cuda, then mps, then cpu",
    "seed": "random seed of the run",
    "fast": "the measured fast path of speed.py (memory format, Adam kernel, BatchNorm folding)",
    "compile": "torch.compile the U-Net for training and sampling",
    "resume": "checkpoint to continue from, or 'auto' for the newest in --out",
    "overwrite": "allow a new run to write into an --out that holds another run's checkpoints",
}
CHOICES = {"schedule": SCHEDULES, "loss": LOSS_TYPES, "sampler": SAMPLERS, "device": DEVICES}
OPTIONAL_TYPES = {"image_folder": str, "subset": int, "sample_steps": int, "resume": str}
GEOMETRY = {"mnist": dict(in_channels=1, image_size=28, n_classes=10),
            "cifar10": dict(in_channels=3, image_size=32, n_classes=10)}


def build_parser(defaults: TrainConfig, description: str) -> argparse.ArgumentParser:
    """A flag for every setting of ``TrainConfig`` that is not fixed by the dataset; help shows the defaults."""
    parser = OneLineParser(description=description, argument_default=argparse.SUPPRESS)
    for item in dataclasses.fields(TrainConfig):
        if item.name not in HELP:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        text = f"{HELP[item.name]} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif item.name == "guidance":
            parser.add_argument(flag, type=float, nargs="+", metavar="W", help=text)
        else:
            kind = OPTIONAL_TYPES.get(item.name, type(default))
            parser.add_argument(flag, type=kind, choices=CHOICES.get(item.name), help=text)
    return parser


def main(defaults: TrainConfig, description: str, argv: list[str] | None = None) -> None:
    """Parse the command line over ``defaults`` and train; errors are one line on stderr and exit code 2."""
    given = vars(build_parser(defaults, description).parse_args(argv))
    exit_on_error(lambda: train(resolve_config(defaults, given)))


def resolve_config(defaults: TrainConfig, given: dict) -> TrainConfig:
    """The run's config: the script's defaults, or the resumed checkpoint's config, overridden by given flags."""
    base = dataclasses.replace(defaults, **GEOMETRY[defaults.dataset])
    resume = given.get("resume")
    if resume:
        path = find_resume_checkpoint(given.get("out", base.out), resume)
        saved = load_checkpoint(path)["config"]
        saved_fields = {key: value for key, value in saved.items() if key in base.__dataclass_fields__}
        differences = config_differences(saved, {**saved, **given})
        if differences:
            raise ValueError(f"cannot resume {path} with different model settings: {'; '.join(differences)}")
        base = dataclasses.replace(base, **saved_fields)
        given = {**given, "resume": path, "overwrite": False}
    config = dataclasses.replace(base, **given)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "n_sample", "sample_every", "gif_every", "save_every", "eval_images",
                 "eval_timesteps"):
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ValueError(f"--lr must be a positive number, got {config.lr}")
    if config.subset is not None and config.subset <= 0:
        raise ValueError(f"--subset must be positive, got {config.subset}")
    if config.eval_every < 0:
        raise ValueError(f"--eval-every must be 0 or positive, got {config.eval_every}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {config.ema_decay}")
    if not all(math.isfinite(w) for w in config.guidance):
        raise ValueError(f"--guidance weights must be finite numbers, got {config.guidance}")
    resolve_device(config.device)


def find_resume_checkpoint(out: str, resume: str) -> str:
    """``resume`` itself, or for 'auto' the checkpoint in ``out`` with the most progress (epoch, then step)."""
    if resume != "auto":
        return resume
    progress = checkpoint_progress(out)
    if not progress:
        raise CheckpointError(f"--resume auto found no checkpoint (model_ep*.pth) in {os.path.abspath(out)}")
    return os.path.join(out, max(progress, key=progress.get))


def checkpoint_progress(folder: str) -> dict[str, tuple[int, int]]:
    """File name -> (completed epochs, steps into the next epoch) for every checkpoint in ``folder``."""
    if not os.path.isdir(folder):
        return {}
    matches = {name: CHECKPOINT_NAME.match(name) for name in os.listdir(folder)}
    return {name: (int(m.group(1)), int(m.group(2) or 0)) for name, m in matches.items() if m}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def load_data(config: TrainConfig) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets as uint8 tensors. The test split is the dataset's own, the 'test' sibling of
    --image-folder, or else a fixed held-out slice of the training images (then left out of training)."""
    if config.image_folder:
        cache = os.path.expanduser(config.cache_dir) if config.cache_dir else None
        train_set = load_image_folder(config.image_folder, config.in_channels, config.image_size, cache)
        test_folder = test_folder_for(config.image_folder)
        if test_folder:
            test_set = load_image_folder(test_folder, config.in_channels, config.image_size, cache)
        else:
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1234))
            held_out = min(config.eval_images, len(train_set) // 10)
            test_set, train_set = train_set.select(order[:held_out]), train_set.select(order[held_out:].sort().values)
    else:
        train_set = load_builtin(config.dataset, config.data_root, train=True)
        test_set = load_builtin(config.dataset, config.data_root, train=False)
    expected = (config.in_channels, config.image_size, config.image_size)
    if tuple(train_set.images.shape[1:]) != expected:
        raise DataError(f"images have shape {list(train_set.images.shape[1:])}, expected {list(expected)}")
    if len(train_set.classes) != config.n_classes:
        raise DataError(f"found {len(train_set.classes)} classes, the model is built for {config.n_classes}")
    return train_set.first(config.subset), test_set.first(config.eval_images)


def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in 0..255 -> float [N, C, H, W] in [-1, 1]."""
    return images.float() / 127.5 - 1


def real_examples(image_set: ImageSet, n_per_class: int, n_classes: int) -> torch.Tensor:
    """The first n_per_class images of each class, ordered class-fastest like the generated grid: [n*K, C, H, W]
    in [-1, 1]. A class with fewer images (a small --subset) repeats them, or is black when it has none."""
    black = torch.zeros_like(image_set.images[:1])
    per_class = []
    for label in range(n_classes):
        images = image_set.images[image_set.labels == label][:n_per_class]
        if len(images) == 0:
            images = black
        per_class.append(images.repeat(math.ceil(n_per_class / len(images)), 1, 1, 1)[:n_per_class])
    return to_model_scale(torch.stack(per_class, dim=1).flatten(0, 1))   # row r holds the r-th of every class


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

class StopRequested:
    """Turns SIGINT/SIGTERM into a flag that the loop reads after each step, so no step is cut in half."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        self.signal_name = signal.Signals(number).name

    def __bool__(self):
        return self.signal_name is not None


@dataclass
class RunState:
    """What a checkpoint restores besides the weights: progress, loss history and the random stream."""
    epoch: int = 0          # completed epochs
    step: int = 0           # completed steps of the next epoch (non-zero only after an interruption)
    losses: list = field(default_factory=list)
    partial_loss_sum: float = 0.0


@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Run:
    """Everything the loop trains and saves: the DDPM, the network the steps call (compiled or DDP-wrapped),
    the optimizer, the EMA, the fast-path choices, the ranks and the progress."""
    config: TrainConfig
    model: DDPM
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    path: FastPath
    ranks: Ranks
    state: RunState

    @property
    def device(self) -> torch.device:
        return self.model.device


def start_ranks(config: TrainConfig) -> tuple[Ranks, torch.device]:
    """Join the torchrun job when there is one (nccl on CUDA, gloo on the CPU) and pick this rank's device."""
    device = resolve_device(config.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def build_run(config: TrainConfig, ranks: Ranks, device: torch.device, path: FastPath | None = None) -> Run:
    """The model (same initial weights on every rank), optimizer and EMA, restored from --resume when given.

    ``path`` overrides the fast-path choices that ``config.fast`` implies (bench.py measures each one).
    """
    torch.manual_seed(config.seed)
    model = DDPM.from_config(dataclasses.asdict(config), device=device).train()
    if path is None:
        path = FastPath.for_device(device, config.in_channels, config.compile) if config.fast else FastPath.plain()
    network_to_channels_last(model.nn_model, path.train_channels_last)
    optimizer = make_optimizer(model.nn_model.parameters(), config.lr, device, path)
    ema = make_ema(model, config.ema_decay)
    state = restore(config.resume, model, optimizer, ema, device) if config.resume else RunState()
    if ranks.distributed:
        torch.manual_seed(config.seed + 1_000_003 * ranks.rank + 1009 * state.epoch + state.step)
    network = model.nn_model
    if ranks.distributed:
        # BatchNorm is not synchronised (SyncBatchNorm would add an all-reduce per layer and runs on GPUs only):
        # each rank normalises its own batch of --batch-size images, which is plenty, and DDP broadcasts
        # rank 0's running statistics before every forward pass, so they never drift apart; rank 0's are saved.
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        network = torch.compile(network)
    if device.type == "cuda" and config.fast:
        torch.backends.cudnn.benchmark = True
    return Run(config, model, network, optimizer, ema, path, ranks, state)


def train(config: TrainConfig) -> DDPM:
    """Train as ``config`` says, writing every artifact under ``config.out``; returns the trained DDPM.

    Under torchrun, every rank trains on its own shard of each epoch and only rank 0 writes files.
    """
    ranks, device = start_ranks(config)
    check_output_folder(config)
    train_set, test_set = load_data(config)
    run = build_run(config, ranks, device)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    real = real_examples(train_set, config.n_sample, config.n_classes).to(device)
    if ranks.is_main:
        utils.ensure_folder(config.out)
        if config.resume:
            print(f"resumed {config.resume}: {run.state.epoch} epochs and {run.state.step} steps done")
        print(f"training on {len(train_set)} images ({device} x {ranks.world_size}, fast path: {run.path.describe()}), "
              f"{count_parameters(run.model)} parameters, {config.epochs} epochs, batch {config.batch_size} per rank, "
              f"writing to {config.out}")
    with StopRequested() as stop:
        for epoch in range(run.state.epoch, config.epochs):
            started = time.perf_counter()
            mean_loss, steps_done, images_seen = train_one_epoch(run, images, labels, epoch, stop)
            if steps_done < steps_per_epoch(len(labels), config.batch_size, ranks.world_size):
                save_interrupted(run, epoch, steps_done, stop.signal_name or "a signal")
                return run.model
            if ranks.is_main:
                finish_epoch(run, epoch + 1, mean_loss, images_seen / (time.perf_counter() - started), test_set,
                             real, time.perf_counter() - started)
            else:
                run.state.epoch, run.state.step, run.state.partial_loss_sum = epoch + 1, 0, 0.0
            if ranks.distributed:
                torch.distributed.barrier()
    return run.model


def finish_epoch(run: Run, epoch: int, mean_loss: float, images_per_s: float, test_set: ImageSet,
                 real: torch.Tensor, seconds: float) -> None:
    """Rank 0 after each epoch: test loss, summary line, loss.csv/png, grids and GIFs, checkpoint."""
    config, state = run.config, run.state
    sampling_model = model_for_sampling(run)
    record = {"epoch": epoch, "train_loss": mean_loss}
    if config.eval_every and (epoch % config.eval_every == 0 or epoch == config.epochs):
        record.update(test_loss(sampling_model, test_set, config))
    record.update(seconds=round(seconds, 2), images_per_s=round(images_per_s, 1))
    tqdm.write(summary_line(record, config.epochs))
    state.losses.append(record)
    state.epoch, state.step, state.partial_loss_sum = epoch, 0, 0.0
    write_epoch_artifacts(config, sampling_model, real, state.losses, epoch)
    if epoch % config.save_every == 0 or epoch == config.epochs:
        save_run(run, f"model_ep{epoch}.pth")
        remove_interrupted_checkpoints(config.out)


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    return math.ceil((n_images // world_size) / batch_size)


def epoch_shard(n_images: int, config: TrainConfig, epoch: int, ranks: Ranks) -> torch.Tensor:
    """This rank's image indices for an epoch: a permutation fixed by (seed, epoch), split evenly over the
    ranks (the last n_images % world_size images of the permutation sit the epoch out)."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    per_rank = n_images // ranks.world_size
    return order[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]


def train_one_epoch(run: Run, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                    stop: StopRequested) -> tuple[float, int, int]:
    """One pass over this rank's shard, starting at ``run.state.step`` (non-zero after a mid-epoch stop).

    Returns (mean training loss over the epoch's images so far, steps completed, images trained on by this call
    over all ranks). The loss is accumulated on the device and read only when the progress bar refreshes, so
    the GPU never waits for the host on the other steps.
    """
    config, state, ranks = run.config, run.state, run.ranks
    order = epoch_shard(len(labels), config, epoch, ranks).to(images.device)
    total_steps = steps_per_epoch(len(labels), config.batch_size, ranks.world_size)
    loss_sum = torch.tensor(state.partial_loss_sum, device=images.device)
    resumed_at = seen = min(state.step * config.batch_size, len(order))
    check_every = 1 if images.device.type == "cpu" and not ranks.distributed else 25
    bar = tqdm(range(state.step, total_steps), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               leave=False, dynamic_ncols=True, mininterval=1.0, disable=not ranks.is_main)
    started = time.perf_counter()
    for step in bar:
        batch = order[step * config.batch_size:(step + 1) * config.batch_size]
        loss = training_step(run, images[batch], labels[batch])
        loss_sum += loss.detach() * len(batch)
        seen += len(batch)
        if step % check_every == 0 or step == total_steps - 1:
            running = loss_sum.item() / seen
            if not math.isfinite(running):
                raise FloatingPointError(f"the training loss became {running} in epoch {epoch + 1}, step {step + 1}; "
                                         f"the last checkpoint in {config.out} is untouched")
            rate = (seen - resumed_at) * ranks.world_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{running:.4f}", img_s=f"{rate:.0f}", refresh=False)
            if stop_agreed(stop, ranks, images.device):
                state.partial_loss_sum = loss_sum.item()
                return loss_sum.item() / seen, step + 1, (seen - resumed_at) * ranks.world_size
    bar.close()
    loss_sum, seen_all = all_ranks_sum(loss_sum, seen, ranks)
    return loss_sum / seen_all, total_steps, (seen - resumed_at) * ranks.world_size


def training_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step of Algorithm 1 on a uint8 batch [B, C, H, W]: loss, backward, Adam step, EMA update."""
    config = run.config
    y = to_channels_last(to_model_scale(images), run.path.train_channels_last)
    if config.flip:
        y = torch.where(torch.rand(len(y), 1, 1, 1, device=y.device) < 0.5, y.flip(3), y)
    c = F.one_hot(labels, config.n_classes).float()
    with autocast(run.device, run.path):
        loss = training_loss(run.model, run.network, y, c)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model.nn_model)
    return loss


def stop_agreed(stop: StopRequested, ranks: Ranks, device: torch.device) -> bool:
    """Whether to stop now: this process got a signal, or (under torchrun) any rank did."""
    if not ranks.distributed:
        return bool(stop)
    flag = torch.tensor(1.0 if stop else 0.0, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def all_ranks_sum(loss_sum: torch.Tensor, seen: int, ranks: Ranks) -> tuple[float, int]:
    if not ranks.distributed:
        return loss_sum.item(), seen
    totals = torch.stack((loss_sum, torch.tensor(float(seen), device=loss_sum.device)))
    torch.distributed.all_reduce(totals)
    return totals[0].item(), int(totals[1].item())


def training_loss(model: DDPM, network: torch.nn.Module, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's loss, computed through ``network`` (the compiled or DDP-wrapped U-Net when there is one)."""
    if network is model.nn_model:
        return model(y, c)
    original, model.nn_model = model.nn_model, network
    try:
        return model(y, c)
    finally:
        model.nn_model = original


def make_ema(model: DDPM, decay: float) -> EMA | None:
    """An exponential moving average of the U-Net's weights and BatchNorm statistics (None when decay is 0)."""
    return EMA(model.nn_model, decay) if decay > 0 else None


def model_for_sampling(run: Run) -> DDPM:
    """The DDPM to sample and test with: the EMA weights when kept, else the trained ones, on the fast path."""
    source = run.model.nn_model if run.ema is None else run.ema.module
    return fast_sampler(run.model, run.path, source)


@torch.inference_mode()
def test_loss(model: DDPM, test_set: ImageSet, config: TrainConfig) -> dict[str, float]:
    """Conditional test loss at ``eval_timesteps`` timesteps spread over 1..T, with noise fixed by a seed.

    Returns {'test_loss': mean over timesteps, 'test_loss_t{t}': mean at t, ...}; comparable across epochs and
    runs with the same T and test images.
    """
    if len(test_set) == 0:
        return {}
    timesteps = torch.linspace(1, config.timesteps, config.eval_timesteps).round().long().unique().tolist()
    generator = torch.Generator().manual_seed(4321)
    device = model.device
    results = {}
    for t in timesteps:
        total = 0.0
        for start in range(0, len(test_set), 500):
            y0 = to_model_scale(test_set.images[start:start + 500]).to(device)
            noise = torch.randn(y0.shape, generator=generator).to(device)
            c = F.one_hot(test_set.labels[start:start + 500], config.n_classes).float().to(device)
            step = torch.full((len(y0),), t, device=device)
            total += model.p_losses(y0, step, c, noise, loss_type=config.loss).item() * len(y0)
        results[f"test_loss_t{t}"] = total / len(test_set)
    return {"test_loss": sum(results.values()) / len(results), **results}


def write_epoch_artifacts(config: TrainConfig, model: DDPM, real: torch.Tensor, losses: list, epoch: int) -> None:
    """loss.csv/png every epoch; sample grids and GIFs on their schedules (and always after the last epoch)."""
    utils.write_loss_csv(losses, os.path.join(config.out, "loss.csv"))
    utils.plot_losses(losses, os.path.join(config.out, "loss.png"))
    utils.plot_test_loss_by_timestep(losses, os.path.join(config.out, "test_loss_by_t.png"))
    last = epoch == config.epochs
    want_grid = epoch % config.sample_every == 0 or last
    want_gif = epoch % config.gif_every == 0 or last
    if not (want_grid or want_gif):
        return
    for w in config.guidance:
        generated, frames = sample_grid(model, config, w)
        if want_grid:
            utils.save_sample_grid(generated, real, os.path.join(config.out, f"image_ep{epoch}_w{w}.png"))
        if want_gif:
            utils.save_gif(frames, os.path.join(config.out, f"gif_ep{epoch}_w{w}.gif"))


def sample_grid(model: DDPM, config: TrainConfig, w: float):
    """n_sample images per class with guidance w, from noise fixed by the seed (the same every epoch) and
    without touching the training's random stream."""
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return model.sample(config.n_sample, (config.in_channels, config.image_size, config.image_size),
                            config.n_classes, w, sampler=config.sampler, steps=config.sample_steps,
                            clip_denoised=config.clip_denoised)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def check_output_folder(config: TrainConfig) -> None:
    """Refuse to mix a new run into a folder that holds another run's checkpoints."""
    existing = checkpoint_progress(config.out)
    if existing and not config.resume and not config.overwrite:
        raise FileExistsError(f"{config.out} already holds checkpoints ({', '.join(sorted(existing)[:3])}...); "
                              f"pass --resume auto to continue that run or --overwrite to start a new one there")


def save_run(run: Run, name: str) -> str:
    """Write a resumable checkpoint of ``run`` as ``config.out/name`` (rank 0 only), atomically."""
    path = os.path.join(run.config.out, name)
    if not run.ranks.is_main:
        return path
    save_checkpoint({
        "model": run.model.nn_model.state_dict(),
        "ema": None if run.ema is None else run.ema.module.state_dict(),
        "ema_updates": None if run.ema is None else run.ema.updates,
        "optimizer": run.optimizer.state_dict(),
        "epoch": run.state.epoch,
        "step": run.state.step,
        "partial_loss_sum": run.state.partial_loss_sum,
        "config": dataclasses.asdict(run.config),
        "losses": run.state.losses,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, path)
    return path


def save_interrupted(run: Run, epoch: int, steps_done: int, signal_name: str) -> None:
    run.state.epoch, run.state.step = epoch, steps_done
    name = f"model_ep{epoch}_step{steps_done}.pth"
    path = save_run(run, name)
    if run.ranks.is_main:
        remove_interrupted_checkpoints(run.config.out, keep=name)     # older positions, once this one is safe
        tqdm.write(f"stopped by {signal_name} after {epoch} epochs and {steps_done} steps; saved {path}. "
                   f"Continue with the same command and --resume auto (or --resume {path}).")


def remove_interrupted_checkpoints(folder: str, keep: str | None = None) -> None:
    """Delete the mid-epoch checkpoints (model_ep{E}_step{S}.pth) in ``folder``, except ``keep``."""
    for name, (_, step) in checkpoint_progress(folder).items():
        if step and name != keep:
            os.remove(os.path.join(folder, name))


def restore(path: str, model: DDPM, optimizer, ema, device: torch.device) -> RunState:
    """Load weights, optimizer, EMA and random state from a checkpoint; returns the progress it records."""
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        model.nn_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this model: {str(error).splitlines()[0][:300]}") from None
    if ema is not None:
        ema.load_state_dict({"weights": checkpoint.get("ema") or checkpoint["model"],
                             "updates": checkpoint.get("ema_updates") or 0})
    rng = checkpoint.get("rng") or {}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"].cpu())
    if rng.get("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
    return RunState(epoch=checkpoint["epoch"], step=checkpoint.get("step", 0), losses=list(checkpoint["losses"]),
                    partial_loss_sum=checkpoint.get("partial_loss_sum", 0.0))


def count_parameters(model: DDPM) -> int:
    return sum(p.numel() for p in model.nn_model.parameters() if p.requires_grad)


def summary_line(record: dict, epochs: int) -> str:
    test = f"  test loss {record['test_loss']:.4f}" if "test_loss" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{test}  "
            f"{record['seconds']:.1f} s  {record['images_per_s']:.0f} images/s")
