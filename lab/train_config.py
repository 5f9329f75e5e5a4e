"""Every setting of a training run, with its default and its help text beside it (``TrainConfig``).

The training scripts' flags are generated from these fields (cli.training_parser), the tools' shared flags take
their defaults and help from here, and a checkpoint saves the config as a dict.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from ddpm import BETA1, BETA2, LOSS_TYPES, N_TIMESTEPS, SCHEDULES
from lab.few_step import SAMPLERS, SPACINGS
from lab.speed import PRECISIONS

DEVICES = ("auto", "cpu", "cuda", "mps")
GEOMETRY = {"mnist": dict(in_channels=1, image_size=28, n_classes=10),        # the built-in datasets
            "cifar10": dict(in_channels=3, image_size=32, n_classes=10)}
BUILT_IN = tuple(GEOMETRY)
HF_BUTTERFLIES = "huggan/smithsonian_butterflies_subset"     # sheet 2, exercise 2.5's dataset
SQUARE_MODES = ("crop", "pad")                                # making a photograph square (lab/image_data.py)


def setting(default, help: str, choices=None, flag=True):
    """A TrainConfig field: its default, its help text and, for a flag with a fixed set of values, the choices.
    ``flag=False`` marks a field that is no command-line flag (set by the dataset or the program); a tuple of
    dataset names makes it a flag of those datasets' scripts only (e.g. ``BUILT_IN``, or ``("butterflies",)``)."""
    metadata = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run; the scripts' flags map one to one onto the fields marked as flags."""
    dataset: str = setting("mnist", "the data and image geometry: 'mnist', 'cifar10' (built in) or 'butterflies' "
                                    "(sheet 2, 2.5)", flag=False)
    data_root: str = setting("./data", "folder with the dataset in torchvision's layout (downloaded only when "
                                       "missing)", flag=BUILT_IN)
    hf_dataset: str = setting(HF_BUTTERFLIES, "the datasets library's dataset: a name on the Hugging Face hub "
                                              "(load_dataset(NAME, cache_dir=--cache-dir, split='train')) or a "
                                              "folder written by Dataset.save_to_disk", flag=("butterflies",))
    image_folder: Optional[str] = setting(None, "train on a class-per-subfolder image folder instead (resized to "
                                                "the dataset's size; for butterflies: every image under the "
                                                "folder, no classes); a 'test' sibling folder, when present, is "
                                                "the test split")
    cache_dir: str = setting("~/.cache/cfg_ddpm", "where decoded images are cached as tensors, and where the "
                                                  "datasets library keeps what it downloads ('' disables the "
                                                  "tensor cache)")
    square: str = setting("crop", "how a photograph becomes square before it is resized: the centred square of "
                                  "its shorter side (crop) or the whole photograph centred on a black square "
                                  "(pad)", SQUARE_MODES, flag=("butterflies",))
    image_size: int = setting(28, "image height and width in pixels, a multiple of 4 (set by the built-in "
                                  "datasets; the photographs are resized to it)", flag=("butterflies",))
    out: str = setting("log_mnist", "folder for every file the run writes (a folder that holds another run is "
                                    "left alone: the new run then writes to a fresh folder under runs/)")
    epochs: int = setting(20, "total number of epochs (also when resuming)")
    batch_size: int = setting(128, "images per training step")
    lr: float = setting(1e-3, "Adam learning rate (constant)")
    n_features: int = setting(32, "U-Net width F (divisible by 8)")
    timesteps: int = setting(N_TIMESTEPS, "diffusion steps T")
    beta1: float = setting(BETA1, "beta_1 of the linear/sigmoid schedule")
    beta2: float = setting(BETA2, "beta_T of the linear/sigmoid schedule")
    schedule: str = setting("linear", "beta schedule (cosine ignores --beta1/--beta2)", SCHEDULES)
    loss: str = setting("l2", "noise-prediction loss", LOSS_TYPES)
    drop_prob: float = setting(0.1, "probability of training a sample unconditionally (c = 0)")
    ema_decay: float = setting(0.999, "decay of the exponential moving average of the weights used for "
                                      "sampling (0: off)")
    flip: bool = setting(False, "random horizontal flips")
    guidance: List[float] = setting([0.0, 1.0, 3.0], "guidance weights w of S1 eq. 5")
    n_sample: int = setting(4, "generated images per class in each grid")
    sampler: str = setting("ddpm", "sampler: the sheet's ddpm (all T steps), ddim, or dpm++2m "
                                   "(DPM-Solver++, second-order multistep)", SAMPLERS)
    sample_steps: Optional[int] = setting(None, "steps of ddim/dpm++2m (default: ddim 50, dpm++2m 20)")
    eta: float = setting(0.0, "stochasticity of ddim and dpm++2m: 0 = deterministic, 1 = DDIM's ancestral "
                              "variance or SDE-DPM-Solver++(2M)")
    spacing: str = setting("logsnr", "timesteps of dpm++2m: evenly in log-SNR or in t", SPACINGS)
    clip_denoised: bool = setting(False, "clip the predicted y_0 to [-1, 1] at every sampling step (needed by "
                                         "the cosine schedule)")
    sample_every: int = setting(5, "epochs between sample grids (the last epoch always gets one)")
    gif_every: int = setting(5, "epochs between GIFs of the reverse process (the last epoch always gets one)")
    save_every: int = setting(5, "epochs between checkpoints (the last epoch always gets one)")
    eval_every: int = setting(1, "epochs between test-loss measurements (0: never)")
    eval_images: int = setting(500, "test images in the test loss")
    eval_timesteps: int = setting(10, "timesteps, spread over 1..T, at which the test loss is measured")
    subset: Optional[int] = setting(None, "train on the first N training images only")
    device: str = setting("auto", "auto picks cuda, then mps, then cpu", DEVICES)
    seed: int = setting(0, "random seed")
    fast: bool = setting(True, "the machine's measured fast path (lab/speed.py, docs/speed.md: memory format, "
                               "bf16 where native, BatchNorm folding, ...); --no-fast: plain fp32 eager")
    precision: str = setting("auto", "arithmetic of the U-Net: fp32, bf16 (autocast; weights, optimizer, EMA and "
                                     "loss stay fp32) or auto: bf16 where the CPU computes it natively", PRECISIONS)
    compile: Optional[bool] = setting(None, "torch.compile the U-Net for training and sampling (CUDA graphs on "
                                            "CUDA): --compile always, --no-compile never, neither: where the "
                                            "machine's rule says a run this long repays compiling")
    resume: Optional[str] = setting(None, "checkpoint to continue from, or 'auto' for the newest run of --out "
                                          "(a new run when there is none)")
    overwrite: bool = setting(False, "let a new run write into an --out that holds another run")
    in_channels: int = setting(1, "image channels, set by the dataset", flag=False)
    n_classes: int = setting(10, "number of classes, set by the dataset (1 for a dataset without classes)",
                             flag=False)

    @classmethod
    def for_dataset(cls, dataset: str, **changes) -> "TrainConfig":
        """The defaults with the dataset's image geometry, and ``changes``."""
        return cls(dataset=dataset, **{**GEOMETRY.get(dataset, {}), **changes})

    @property
    def unconditional(self) -> bool:
        return is_unconditional(self.drop_prob)


def is_unconditional(drop_prob: float) -> bool:
    """Whether a run with this p_uncond (drop_prob) trains the unconditional model: every sample on the null class
    c = 0, as for a dataset without classes; such a model is sampled with c = 0 and w = 0."""
    return drop_prob == 1


def field_help(name: str) -> str:
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


def field_choices(name: str):
    return TrainConfig.__dataclass_fields__[name].metadata["choices"]


def flag_fields(dataset: Optional[str] = None) -> list:
    """The fields that are command-line flags (of ``dataset``'s script, when given), in declaration order."""
    def is_flag(marked) -> bool:
        return marked is True or (isinstance(marked, tuple) and (dataset is None or dataset in marked))
    return [item for item in dataclasses.fields(TrainConfig) if is_flag(item.metadata["flag"])]


def validate(config: TrainConfig) -> None:
    """Refuse settings no run can use: ValueError naming the flag."""
    for name in ("epochs", "batch_size", "n_sample", "sample_every", "gif_every", "save_every", "eval_images",
                 "eval_timesteps"):
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ValueError(f"--lr must be a positive number, got {config.lr}")
    for name in ("subset", "sample_steps"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.eval_every < 0:
        raise ValueError(f"--eval-every must be 0 or positive, got {config.eval_every}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {config.ema_decay}")
    if not all(math.isfinite(w) for w in config.guidance):
        raise ValueError(f"--guidance weights must be finite numbers, got {config.guidance}")
    if config.image_size < 4 or config.image_size % 4:
        raise ValueError(f"--image-size must be a multiple of 4 (the U-Net pools twice by 2), got {config.image_size}")
    if config.unconditional and any(w != 0 for w in config.guidance):
        raise ValueError(f"--guidance must be 0 for an unconditional model (--drop-prob 1: no class to guide "
                         f"towards), got {config.guidance}")


# The sheets' settings of the training scripts (train_mnist.py, train_cifar10.py, train_butterflies.py).
MNIST = TrainConfig.for_dataset("mnist", out="log_mnist", epochs=20, batch_size=128, guidance=[0.0, 1.0, 3.0],
                                sample_every=5, gif_every=5, save_every=5, flip=False)
CIFAR10 = TrainConfig.for_dataset("cifar10", out="log_cifar10", epochs=100, batch_size=128, guidance=[1.0, 3.0],
                                  sample_every=10, gif_every=20, save_every=10, flip=True)
# Sheet 2, 2.5: the butterflies have no classes, so the run trains the unconditional model of the sheets' maths
# (drop_prob = 1: every sample on the null class c = 0; one class-vector entry, always 0) and samples it with
# w = 0. Photographs made square and resized to 64 px (--image-size 128, as the sheet suggests, costs ~4x).
BUTTERFLIES = TrainConfig(dataset="butterflies", in_channels=3, image_size=64, n_classes=1, drop_prob=1.0,
                          out="log_butterflies", epochs=100, batch_size=64, guidance=[0.0], n_sample=20,
                          eval_images=100, sample_every=10, gif_every=20, save_every=10, flip=True)
SCRIPT_DEFAULTS = {"mnist": MNIST, "cifar10": CIFAR10, "butterflies": BUTTERFLIES}
