"""What a training run reads and writes in its output folder: where it writes, its checkpoints, and the files
it makes after each epoch. Named with the 1-based epoch E:

    image_ep{E}_w{w}.png   4 generated rows (one class per column) above 4 rows of real images
    gif_ep{E}_w{w}.gif     the reverse process of those samples
    model_ep{E}.pth        a resumable checkpoint (see lab/checkpoints.py), written atomically
    loss.csv, loss.png     mean train loss and test loss per epoch; test_loss_by_t.png, test loss against t

An output folder that holds another run is never written into without --overwrite: a new run then writes to a
fresh folder runs/<out>-<date-time>/, so the committed reference runs in log_mnist/ and log_cifar10/ stay as
they are.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from ddpm import class_grid_labels
from lab.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from lab.generation import SamplingModel, animation_states, generate, sampled_image_steps
from lab.image_data import ImageSet, to_model_scale
from lab.speed import load_optimizer_state
from lab.train_config import TrainConfig

CHECKPOINT_NAME = re.compile(r"^model_ep(\d+)(?:_step(\d+))?\.pth$")
RUNS_FOLDER = "runs"          # beside --out: fresh run folders, when --out holds another run (git-ignored)


# ----------------------------------------------------------------------------------------------------------------
# Where a run writes, and which run --resume auto continues
# ----------------------------------------------------------------------------------------------------------------

def checkpoint_progress(folder: str) -> dict[str, tuple[int, int]]:
    """File name -> (completed epochs, steps into the next epoch) for every checkpoint in ``folder``."""
    if not os.path.isdir(folder):
        return {}
    matches = {name: CHECKPOINT_NAME.match(name) for name in os.listdir(folder)}
    return {name: (int(m.group(1)), int(m.group(2) or 0)) for name, m in matches.items() if m}


def newest_in_folder(folder: str) -> str | None:
    """The checkpoint of ``folder`` with the most progress (epoch, then step), or None."""
    progress = checkpoint_progress(folder)
    return os.path.join(folder, max(progress, key=progress.get)) if progress else None


def runs_folder(out: str) -> str:
    """The folder of fresh run folders beside ``out``: <parent of out>/runs."""
    return os.path.join(os.path.dirname(os.path.normpath(out)), RUNS_FOLDER)


def run_folders(out: str) -> list[str]:
    """``out`` and the fresh folders that new runs made beside it (runs/<out>-*)."""
    name = os.path.basename(os.path.normpath(out))
    return [out] + sorted(glob.glob(os.path.join(runs_folder(out), f"{name}-*")))


def newest_run_checkpoint(out: str) -> str | None:
    """The checkpoint --resume auto continues: of the run folders of ``out``, the one written to last."""
    candidates = [path for path in map(newest_in_folder, run_folders(out)) if path]
    return max(candidates, key=os.path.getmtime) if candidates else None


def fresh_run_folder(out: str) -> str:
    """runs/<out>-<date>-<time> beside ``out``, a folder no run has used yet."""
    name = f"{os.path.basename(os.path.normpath(out))}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem = os.path.join(runs_folder(out), name)
    folder, number = stem, 1
    while os.path.exists(folder):
        number += 1
        folder = f"{stem}-{number}"
    return folder


def output_folder(config: TrainConfig) -> tuple[str, str | None]:
    """Where a new run writes, and the line that tells the user when that is not --out.

    A resumed run writes where its checkpoint is; --overwrite writes into --out whatever it holds; otherwise a
    folder that holds another run's checkpoints is left alone and the run writes to a fresh folder.
    """
    existing = checkpoint_progress(config.out)
    if config.resume or config.overwrite or not existing:
        return config.out, None
    folder = fresh_run_folder(config.out)
    return folder, (f"{config.out} holds an earlier run ({', '.join(sorted(existing)[:2])}...), left as it is; this run "
                    f"writes to {folder} (continue it with --resume auto; --overwrite writes into {config.out})")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of a run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint restores besides the weights: progress, loss history and the random stream."""
    epoch: int = 0          # completed epochs
    step: int = 0           # completed steps of the next epoch (non-zero only after an interruption)
    losses: list = field(default_factory=list)
    partial_loss_sum: float = 0.0


def save_run(run, name: str) -> str:
    """Write a resumable checkpoint of ``run`` (training.Run) as ``config.out/name``, atomically, on rank 0."""
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
        "rng": run_random_state(run.device),
    }, path)
    return path


def save_interrupted(run, epoch: int, steps_done: int, signal_name: str) -> None:
    """The checkpoint of a run stopped by a signal after ``steps_done`` steps of epoch ``epoch + 1``."""
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


def restore(path: str, network: torch.nn.Module, optimizer, ema, device: torch.device) -> RunState:
    """Load weights, optimizer, EMA and random state from a checkpoint; returns the progress it records.

    The file is read onto the CPU and each tensor copied to where this run keeps it: the weights' device, the
    weights' memory layout, this run's Adam (``speed.load_optimizer_state``), whatever the saving run had.
    """
    checkpoint = load_checkpoint(path)
    try:
        network.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this model: {str(error).splitlines()[0][:300]}") from None
    if ema is not None:
        ema.load_state_dict({"weights": checkpoint.get("ema") or checkpoint["model"],
                             "updates": checkpoint.get("ema_updates") or 0})
    try:
        set_run_random_state(checkpoint.get("rng") or {}, device)
    except (RuntimeError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path}: its random generator state does not fit {device} "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    return RunState(epoch=checkpoint["epoch"], step=checkpoint.get("step", 0), losses=list(checkpoint["losses"]),
                    partial_loss_sum=checkpoint.get("partial_loss_sum", 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Random generators: a checkpoint's, and those around a grid
# ----------------------------------------------------------------------------------------------------------------

def run_random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The states of the generators a run on ``device`` draws from: the CPU's, and on CUDA or MPS the run's own
    device's (only that one: a resumed run may see fewer GPUs). {'cpu': state, 'cuda' or 'mps': state}."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_run_random_state(state: dict, device: torch.device) -> None:
    """Restore what ``run_random_state`` saved, for a run on ``device``: the CPU's generator, and the device's when
    the state holds one of that device type. Older checkpoints hold a list of CUDA states, one per visible GPU;
    the run's device was the first of them."""
    if "cpu" in state:
        torch.set_rng_state(state["cpu"].cpu())
    saved = state.get(device.type)
    if isinstance(saved, (list, tuple)):
        saved = saved[0] if saved else None
    if saved is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved.cpu(), device)
    elif device.type == "mps":
        torch.mps.set_rng_state(saved.cpu())


def seeded_generator_states() -> dict:
    """The states of every generator that ``torch.manual_seed`` seeds and that holds a state in this process: the
    CPU's, each CUDA device's (once CUDA is in use) and the MPS device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_seeded_generator_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states:
        torch.mps.set_rng_state(states["mps"])


# ----------------------------------------------------------------------------------------------------------------
# Files made after each epoch
# ----------------------------------------------------------------------------------------------------------------

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


def write_loss_files(config: TrainConfig, losses: list) -> None:
    """loss.csv, loss.png (the mean training loss of each epoch) and test_loss_by_t.png, after every epoch."""
    utils.write_rows_csv(losses, os.path.join(config.out, "loss.csv"))
    utils.plot_losses(losses, os.path.join(config.out, "loss.png"))
    utils.plot_test_loss_by_timestep(losses, os.path.join(config.out, "test_loss_by_t.png"))


def grids_due(config: TrainConfig, epoch: int) -> tuple[bool, bool]:
    """(a sample grid, a GIF) after this 1-based epoch: on the sheet's cadence, and always after the last one."""
    last = epoch == config.epochs
    return epoch % config.sample_every == 0 or last, epoch % config.gif_every == 0 or last


def grid_image_steps(config: TrainConfig) -> int:
    """Images x sampler steps of all the grids and GIFs a run samples (``grids_due``): what decides whether
    compiling its sampling network repays the compile time (lab/speed.py's rules)."""
    due = sum(any(grids_due(config, epoch)) for epoch in range(1, config.epochs + 1))
    images = due * len(config.guidance) * config.n_sample * config.n_classes
    return sampled_image_steps(config.sampler, config.sample_steps, config.timesteps, images)


@contextlib.contextmanager
def grid_random_state(config: TrainConfig):
    """Sample a grid from noise fixed by the seed (the same every epoch) without touching the training's random
    stream: every generator the seed touches (``seeded_generator_states``) is restored afterwards."""
    states = seeded_generator_states()
    try:
        torch.manual_seed(config.seed)
        yield
    finally:
        set_seeded_generator_states(states)


def grid_states(model: SamplingModel, config: TrainConfig) -> list[int]:
    """The states y_s a training GIF shows (``generation.animation_states`` of the run's grid sampler)."""
    return animation_states(model.ddpm, config.sampler, config.sample_steps, config.spacing)


def grid_conditions(config: TrainConfig) -> torch.Tensor | None:
    """The class vectors of a grid: None for ``DDPM.sample``'s own (n_sample images per class, class-fastest), or
    for an unconditional run (``config.unconditional``) n_sample times the null class c = 0, [n_sample, n_classes]."""
    return torch.zeros(config.n_sample, config.n_classes) if config.unconditional else None


def sample_grid_few_step(model: SamplingModel, config: TrainConfig, w: float) -> tuple[torch.Tensor, np.ndarray]:
    """The grid with a few-step sampler (--sampler ddim or dpm++2m): n_sample images per class, class-fastest,
    as ``DDPM.sample`` orders them (or ``grid_conditions``' null classes). Returns (images [N, C, H, W] on the
    CPU, frames)."""
    conditions = grid_conditions(config)
    if conditions is None:
        labels = class_grid_labels(range(config.n_classes), config.n_sample)
        conditions = F.one_hot(labels, config.n_classes).float()
    return generate(model, conditions, w, sampler=config.sampler,
                    steps=config.sample_steps, eta=config.eta, clip_denoised=config.clip_denoised,
                    spacing=config.spacing, seed=config.seed, keep=grid_states(model, config))


def write_grid_files(config: TrainConfig, epoch: int, w: float, generated: torch.Tensor, frames: np.ndarray,
                     real: torch.Tensor, grid: bool, gif: bool) -> None:
    """image_ep{E}_w{w}.png (generated rows above real rows) and gif_ep{E}_w{w}.gif, as asked."""
    if grid:
        utils.save_sample_grid(generated, real, os.path.join(config.out, f"image_ep{epoch}_w{w}.png"))
    if gif:
        utils.save_gif(frames, os.path.join(config.out, f"gif_ep{epoch}_w{w}.gif"))
