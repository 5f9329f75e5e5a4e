"""The one training loop behind train_mnist.py, train_cifar10.py and train_butterflies.py (sheet 1, tasks 3 and 4;
sheet 2, 2.2 and 2.5).

``command_line_config(defaults)`` turns the command line into a ``TrainConfig`` (lab/train_config.py) and
``train`` runs it. Each epoch the loop trains on the whole in-memory dataset (Algorithm 1: ``loss = ddpm(y0, c)``),
measures the test loss at fixed timesteps and noise (sheet 2, 2.2 e), samples the grids with Algorithm 2
(``DDPM.sample``) and writes its files (lab/run_files.py: grids, GIFs, loss curves, checkpoints).
Read top to bottom: configuration, building a run, the loop, one step, after each epoch, the test loss.

The paths of the sheets' equations: train_mnist.py -> train -> train_one_epoch -> training_step -> DDPM.forward
(Algorithm 1; -> p_losses -> q_sample), and train -> finish_epoch -> DDPM.sample (Algorithm 2) -> p_sample (eq. 4).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddpm import DDPM
from lab.checkpoints import config_differences, load_checkpoint, network_from_config
from lab.cli import resolve_device, training_parser
from lab.ema import EMA
from lab.generation import SamplingModel, sampling_model
from lab.image_data import ImageSet, load_data, to_model_scale
from lab.run_files import (RunState, grid_conditions, grid_image_steps, grid_random_state, grid_states, grids_due,
                           newest_run_checkpoint, output_folder, real_examples, remove_interrupted_checkpoints, restore,
                           sample_grid_few_step, save_interrupted, save_run, write_grid_files, write_loss_files)
from lab.speed import (FastInference, FastPath, FastTraining, compiled, make_optimizer, mark_step_begin,
                       network_to_channels_last, path_for_run, use_backend_settings)
from lab.train_config import GEOMETRY, TrainConfig, validate

MACHINE_SETTINGS = ("device", "out", "resume", "overwrite")   # never taken from a resumed run's saved config


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

def command_line_config(defaults: TrainConfig, description: str, argv: list[str] | None = None) -> TrainConfig:
    """The run's config from the command line (``argv``, default sys.argv) over the script's ``defaults``."""
    given = vars(training_parser(defaults, description).parse_args(argv))
    return resolve_config(defaults, given)


def resolve_config(defaults: TrainConfig, given: dict) -> TrainConfig:
    """The run's config: the script's defaults, or the resumed checkpoint's config, overridden by given flags.

    --resume auto continues the newest run of --out (``run_files.newest_run_checkpoint``) and starts a new run,
    saying so, when there is none. A resumed run keeps its model settings (a different one is refused) and
    writes next to its checkpoint; --data-root (--hf-dataset) without --image-folder means the built-in (the
    datasets library's) dataset.
    """
    base = dataclasses.replace(defaults, **GEOMETRY.get(defaults.dataset, {}))
    if ("data_root" in given or "hf_dataset" in given) and "image_folder" not in given:
        given = {**given, "image_folder": None}
    resume = given.get("resume")
    if resume == "auto":
        out = given.get("out", base.out)
        resume = newest_run_checkpoint(out)
        if resume is None:
            print(f"--resume auto: no checkpoint of an earlier run in {out}; starting a new run")
    if resume:
        saved = load_checkpoint(resume)["config"]
        differences = config_differences(saved, {**saved, **given})
        if differences:
            raise ValueError(f"cannot resume {resume} with different model settings: {'; '.join(differences)}")
        kept = {key: value for key, value in saved.items()
                if key in TrainConfig.__dataclass_fields__ and key not in MACHINE_SETTINGS}
        base = dataclasses.replace(base, **kept, out=os.path.dirname(resume) or ".")
    config = dataclasses.replace(base, **{**given, "resume": resume})
    validate(config)
    resolve_device(config.device)
    return config


# ----------------------------------------------------------------------------------------------------------------
# A run: what the loop trains and saves
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun). Every torchrun job is distributed,
    one of a single process too: it trains through its process group and DDP, as a larger job does."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """Everything the loop trains and saves: the DDPM (its U-Net holds the trained weights), the DDPM the steps
    call (around the same U-Net on the fast path, maybe compiled, and DDP-wrapped under torchrun), the optimizer,
    the EMA, the fast-path choices, the ranks and the progress."""
    config: TrainConfig
    model: DDPM
    trainer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Optional[EMA]
    path: FastPath
    ranks: Ranks
    state: RunState
    sampling_network: Optional[FastInference] = None      # compiled once when the path compiles

    @property
    def device(self) -> torch.device:
        return self.model.device


def start_ranks(config: TrainConfig) -> tuple[Ranks, torch.device]:
    """Join the torchrun job when there is one (nccl on CUDA, gloo on the CPU) and pick this rank's device."""
    device = resolve_device(config.device)
    if "WORLD_SIZE" not in os.environ:                 # torchrun sets it, and RANK and LOCAL_RANK
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                  distributed=True)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def build_run(config: TrainConfig, ranks: Ranks, device: torch.device, path: FastPath | None = None,
              n_images: int = 0) -> Run:
    """The model (same initial weights on every rank), optimizer and EMA, restored from --resume when given.

    ``path`` overrides the fast-path choices that ``config.fast`` implies (tools/bench.py measures each one);
    without it, the path is the one for a run of ``config.epochs`` epochs over ``n_images`` training images (the
    whole run, also when resumed, so that a resumed run computes as the uninterrupted one did).
    """
    torch.manual_seed(config.seed)
    model = DDPM.from_config(dataclasses.asdict(config), network_from_config(dataclasses.asdict(config)),
                             device).train()
    if path is None:
        path = path_for_run(device, config.in_channels, config.fast, config.compile, config.precision,
                            ranks.distributed, training_images=config.epochs * n_images,
                            sampled_image_steps=grid_image_steps(config))
    network_to_channels_last(model.nn_model, path.train_channels_last)
    optimizer = make_optimizer(model.nn_model.parameters(), config.lr, path)
    ema = EMA(model.nn_model, config.ema_decay) if config.ema_decay > 0 else None
    state = restore(config.resume, model.nn_model, optimizer, ema, device) if config.resume else RunState()
    if ranks.distributed:
        torch.manual_seed(config.seed + 1_000_003 * ranks.rank + 1009 * state.epoch + state.step)
    trainer = DDPM.from_config(dataclasses.asdict(config), compiled(FastTraining(model.nn_model, path), path.compile_training),
                               device).train()
    if ranks.distributed:
        # BatchNorm is not synchronised (SyncBatchNorm would add an all-reduce per layer and runs on GPUs only):
        # each rank normalises its own batch of --batch-size images, which is plenty, and DDP broadcasts
        # rank 0's running statistics before every forward pass, so they never drift apart; rank 0's are saved.
        trainer = torch.nn.parallel.DistributedDataParallel(
            trainer, device_ids=[device.index] if device.type == "cuda" else None)
    use_backend_settings(path)
    return Run(config, model, trainer, optimizer, ema, path, ranks, state)


def count_parameters(network: torch.nn.Module) -> int:
    """Trainable parameters of a network (the U-Net: 717,955 for CIFAR-10, 655,361 for MNIST)."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> DDPM:
    """Train as ``config`` says, writing every artifact under ``config.out`` (or a fresh folder, when --out holds
    another run); returns the trained DDPM. Under torchrun, every rank trains on its own shard of each epoch and
    only rank 0 writes files."""
    ranks, device = start_ranks(config)
    out, notice = output_folder(config)
    config = dataclasses.replace(config, out=out)
    train_set, test_set = load_data(config)
    run = build_run(config, ranks, device, n_images=len(train_set))
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    real = real_examples(train_set, config.n_sample, config.n_classes).to(device)
    with StopRequested() as stop:           # from here on a signal stops the run at a step, with a checkpoint
        if ranks.is_main:
            os.makedirs(config.out, exist_ok=True)
            if notice:
                print(notice)
            if config.resume:
                print(f"resumed {config.resume}: {run.state.epoch} epochs and {run.state.step} steps done")
            print(f"training on {len(train_set)} images ({device} x {ranks.world_size}), "
                  f"{count_parameters(run.model.nn_model)} parameters, {config.epochs} epochs, batch "
                  f"{config.batch_size} per rank, writing to {config.out}\n{run.path.announce()}", flush=True)
        for epoch in range(run.state.epoch, config.epochs):
            started = time.perf_counter()
            mean_loss, steps_done, images_seen = train_one_epoch(run, images, labels, epoch, stop)
            if steps_done < steps_per_epoch(len(labels), config.batch_size, ranks.world_size):
                save_interrupted(run, epoch, steps_done, stop.signal_name or "a signal")
                return run.model
            if ranks.is_main:
                seconds = time.perf_counter() - started
                finish_epoch(run, epoch + 1, mean_loss, images_seen / seconds, test_set, real, seconds)
            else:
                run.state.epoch, run.state.step, run.state.partial_loss_sum = epoch + 1, 0, 0.0
            if ranks.distributed:
                torch.distributed.barrier()
    return run.model


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag that the loop reads between steps, so no step is cut in half: after
    every step on a single CPU process, every 25 steps on CUDA and under torchrun (reading it costs a sync)."""

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
    over all ranks). The loss is summed on the device and read on the host every ``check_every`` steps (after
    every step on one CPU process, every 25 on CUDA and under torchrun), so a GPU rarely waits for the host.
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
    mark_step_begin(run.path)
    y = to_model_scale(images)
    if config.flip:
        y = torch.where(torch.rand(len(y), 1, 1, 1, device=y.device) < 0.5, y.flip(3), y)
    c = class_vectors(labels, config)
    loss = run.trainer(y, c)                                        # DDPM.forward: Algorithm 1
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model.nn_model)
    return loss


def class_vectors(labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The condition c of each image, [N, n_classes]: its one-hot class vector, or the null class c = 0 for an
    unconditional run (``config.unconditional``: p_uncond = 1, a dataset without classes such as the butterflies
    of sheet 2, 2.5), whose network never sees another c."""
    c = F.one_hot(labels, config.n_classes).float()
    return torch.zeros_like(c) if config.unconditional else c


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


# ----------------------------------------------------------------------------------------------------------------
# After each epoch
# ----------------------------------------------------------------------------------------------------------------

def finish_epoch(run: Run, epoch: int, mean_loss: float, images_per_s: float, test_set: ImageSet,
                 real: torch.Tensor, seconds: float) -> None:
    """Rank 0 after each epoch: test loss, summary line, loss.csv/png, the grids and GIFs (Algorithm 2, with the
    EMA weights), the checkpoint."""
    config, state = run.config, run.state
    model = model_for_sampling(run)
    record = {"epoch": epoch, "train_loss": mean_loss}
    if config.eval_every and (epoch % config.eval_every == 0 or epoch == config.epochs):
        record.update(test_loss(model, test_set, config))
    record.update(seconds=round(seconds, 2), images_per_s=round(images_per_s, 1))
    tqdm.write(summary_line(record, config.epochs))
    state.losses.append(record)
    state.epoch, state.step, state.partial_loss_sum = epoch, 0, 0.0
    write_loss_files(config, state.losses)
    grid, gif = grids_due(config, epoch)
    for w in config.guidance if grid or gif else ():
        with grid_random_state(config):
            if config.sampler == "ddpm":      # the sheet's call: ddpm.sample(4, (C, H, W), 10, w)
                ddpm = model.ddpm.with_options(clip_denoised=config.clip_denoised)
                generated, frames = ddpm.sample(config.n_sample, model.image_shape, config.n_classes, w,
                                                conditions=grid_conditions(config), keep=grid_states(model, config))
            else:
                generated, frames = sample_grid_few_step(model, config, w)
        write_grid_files(config, epoch, w, generated.float().cpu(), frames, real, grid, gif)
    if epoch % config.save_every == 0 or epoch == config.epochs:
        save_run(run, f"model_ep{epoch}.pth")
        remove_interrupted_checkpoints(config.out)


def model_for_sampling(run: Run) -> SamplingModel:
    """The network to sample and test with: the EMA weights when kept, else the trained ones, on the fast path.

    A compiled run compiles its sampling network once: around the EMA module itself (which only ever samples),
    with BatchNorm left unfolded so that each epoch's EMA weights are read in place.
    """
    if run.path.compile_sampling and run.ema is not None:
        if run.sampling_network is None:
            run.sampling_network = FastInference(run.ema.module, dataclasses.replace(run.path, fold_batchnorm=False),
                                                 copy=False)
        network = run.sampling_network
    else:
        network = FastInference(run.model.nn_model if run.ema is None else run.ema.module, run.path)
    return sampling_model(network, dataclasses.asdict(run.config), run.device, run.path.sample_chunk)


@torch.inference_mode()
def test_loss(model: SamplingModel, test_set: ImageSet, config: TrainConfig) -> dict[str, float]:
    """Sheet 2, 2.2 e: "the loss for a defined test set at specific time-steps". The noise loss (S2 eq. 9, with
    ``config.loss``, or always l2) of every test image with its one-hot class (the null class c = 0 for an
    unconditional run), at each of a fixed set of at least two timesteps in 1..T, with noise fixed by a seed: every
    call gives the same value. This solution takes ``config.eval_timesteps`` timesteps spread evenly over 1..T.

    Returns {'test_loss': the mean over all images and timesteps, 'test_loss_t{t}': the mean at t, ...};
    comparable across epochs and runs with the same T and test images.
    """
    if len(test_set) == 0:
        return {}
    # BEGIN SOLUTION sheet2-test-loop test_loss
    timesteps = torch.linspace(1, config.timesteps, config.eval_timesteps).round().long().unique().tolist()
    generator = torch.Generator().manual_seed(4321)
    device = model.device
    results = {}
    for t in timesteps:
        total = 0.0
        for start in range(0, len(test_set), 500):
            y0 = to_model_scale(test_set.images[start:start + 500]).to(device)
            noise = torch.randn(y0.shape, generator=generator).to(device)
            c = class_vectors(test_set.labels[start:start + 500], config).to(device)
            step = torch.full((len(y0),), t, device=device)
            loss = model.ddpm.p_losses(y0, step, c, noise, loss_type=config.loss)
            total += loss.item() * len(y0)
        results[f"test_loss_t{t}"] = total / len(test_set)
    return {"test_loss": sum(results.values()) / len(results), **results}
    # END SOLUTION


def summary_line(record: dict, epochs: int) -> str:
    test = f"  test loss {record['test_loss']:.4f}" if "test_loss" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}{test}  "
            f"{record['seconds']:.1f} s  {record['images_per_s']:.0f} images/s")
