"""Sample a trained conditional DDPM: classes, or a mixture of classes (sheet 1: guiding towards a mixture).

    python sample.py --checkpoint CKPT [--classes 3 7 | --mix 3:0.5,8:0.5 [--compose]] [--n 8] [--guidance 2]
                     [--sampler ddpm|ddim] [--steps 50] [--eta 0] [--clip-denoised] [--seed 0]
                     [--device auto|cpu|cuda|mps] --out out.png [--gif out.gif]

Classes give a grid with one column per class and --n rows; a mixture gives --n images in a row-major grid.
Two ways to guide towards a mixture sum_i p_i c_i of one-hot classes c_i (weights normalised to sum to 1):

    convex (default)   one class vector c = sum_i p_i c_i in S1 eq. 5:
                       eps~ = (1 + w) eps(y_t, t, c) - w eps(y_t, t, 0)
    composed (--compose)  one conditional copy per class, composed guidance:
                       eps~ = eps(y_t, t, 0) + sum_i (1 + w) p_i (eps(y_t, t, c_i) - eps(y_t, t, 0))

Both reduce to eq. 5 for a single class; ``DDPM.guided_noise`` evaluates either in one batched network call.
Errors (bad checkpoint, class, mixture, flag) are one line on stderr with exit code 2.
"""
import argparse
import math
import os
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import utils
from cli import DEVICES, OneLineParser, exit_on_error, resolve_device
from ddpm import DDPM, SAMPLERS
from speed import load_fast_sampler

MAX_GRID_COLUMNS = 8                       # a mixture's n images are laid out row-major, this many per row
DEFAULT_DDIM_STEPS = 50

Mixture = dict[int, float]                 # class -> (unnormalised, non-negative) weight, in the order given


# ----------------------------------------------------------------------------------------------------------------
# Conditions and guidance weights for DDPM.sample_guided / guided_noise: (conditions [K, N, n_classes], K weights)
# ----------------------------------------------------------------------------------------------------------------

def class_conditions(classes: Sequence[int], n: int, n_classes: int,
                     guidance: float) -> tuple[torch.Tensor, tuple[float]]:
    """n images of each class, ordered class-fastest (row r holds the r-th image of every class), S1 eq. 5.

    Returns conditions [1, n * len(classes), n_classes] (one-hot) and the weight (1 + w,).
    """
    check_classes(classes, n_classes)
    labels = torch.tensor(list(classes)).repeat(n)
    return F.one_hot(labels, n_classes).float().unsqueeze(0), (1.0 + guidance,)


def convex_mixture_conditions(mixture: Mixture, n: int, n_classes: int,
                              guidance: float) -> tuple[torch.Tensor, tuple[float]]:
    """Mixture as ONE class vector c = sum_i p_i e_{c_i} (a convex combination of one-hot vectors), S1 eq. 5.

    Returns conditions [1, n, n_classes] (n copies of c) and the weight (1 + w,).
    """
    proportions = normalised(mixture, n_classes)
    vector = torch.zeros(n_classes)
    for label, p in proportions.items():
        vector[label] = p
    return vector.expand(1, n, n_classes).clone(), (1.0 + guidance,)


def composed_mixture_conditions(mixture: Mixture, n: int, n_classes: int,
                                guidance: float) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Mixture by composed guidance: one conditional copy per class c_i with weight w_i = (1 + w) p_i.

    eps~ = eps(0) + sum_i w_i (eps(c_i) - eps(0)). Returns conditions [K, n, n_classes] (conditions[i] = n copies
    of e_{c_i}) and the K weights, K = number of classes in the mixture.
    """
    proportions = normalised(mixture, n_classes)
    one_hots = F.one_hot(torch.tensor(list(proportions)), n_classes).float()       # [K, n_classes]
    conditions = one_hots.unsqueeze(1).expand(-1, n, -1).clone()                     # [K, n, n_classes]
    return conditions, tuple((1.0 + guidance) * p for p in proportions.values())


def normalised(mixture: Mixture, n_classes: int) -> Mixture:
    """The mixture proportions p_i = weight_i / sum_j weight_j; refuses bad classes and weights."""
    check_classes(list(mixture), n_classes)
    weights = list(mixture.values())
    if not all(math.isfinite(weight) for weight in weights):
        raise ValueError(f"mixture weights must be finite numbers, got {weights}")
    if any(weight < 0 for weight in weights):
        raise ValueError(f"mixture weights must not be negative, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture weights must sum to a positive number, got {weights} (sum {total})")
    return {label: weight / total for label, weight in mixture.items()}


def check_classes(classes: Sequence[int], n_classes: int) -> None:
    if not len(classes):
        raise ValueError("give at least one class")
    bad = [label for label in classes if not 0 <= label < n_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is outside 0..{n_classes - 1} (the model knows {n_classes} classes)")


def parse_mixture(text: str) -> Mixture:
    """'3:0.5,8:0.5' -> {3: 0.5, 8: 0.5}; the weights are normalised later (``normalised``)."""
    mixture: Mixture = {}
    for item in text.split(","):
        label, separator, weight = item.strip().partition(":")
        try:
            if not separator:
                raise ValueError
            label, weight = int(label), float(weight)
        except ValueError:
            raise ValueError(f"--mix must look like CLASS:WEIGHT,CLASS:WEIGHT (e.g. 3:0.5,8:0.5), "
                             f"got {item.strip()!r} in {text!r}") from None
        if label in mixture:
            raise ValueError(f"--mix names class {label} twice in {text!r}")
        mixture[label] = weight
    return mixture


# ----------------------------------------------------------------------------------------------------------------
# Model, sampling, writing
# ----------------------------------------------------------------------------------------------------------------

def image_size(model: DDPM) -> tuple[int, int, int]:
    """(C, H, W) of the images the model's U-Net makes."""
    network = model.nn_model
    return network.in_channels, network.height, network.height


def generate(model: DDPM, conditions: torch.Tensor, weights: Sequence[float], sampler: str = "ddpm",
             steps: int | None = None, eta: float = 0.0, seed: int = 0,
             clip_denoised: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """``DDPM.sample_guided`` from noise fixed by ``seed``: (y_0 [N, C, H, W] on the CPU, frames [F, N, C, H, W]).

    conditions [K, N, n_classes] (moved to the model's device); the same seed and N give the same noise, so rows
    sampled with different conditions are directly comparable.
    """
    torch.manual_seed(seed)
    images, frames = model.sample_guided(conditions.to(model.device), tuple(weights), image_size(model),
                                         sampler, ddim_steps(model, sampler, steps), eta, clip_denoised)
    return images.float().cpu(), frames


def ddim_steps(model: DDPM, sampler: str, steps: int | None) -> int | None:
    """--steps as given; for DDIM without --steps, min(50, T)."""
    if steps is None and sampler == "ddim":
        return min(DEFAULT_DDIM_STEPS, model.n_timesteps)
    return steps


def save_grid(images: torch.Tensor, path: str, columns: int) -> None:
    """images [N, C, H, W] in [-1, 1] as a grid with ``columns`` images per row (padding 2)."""
    make_parent_folder(path)
    save_image(utils.to_unit_range(images), path, nrow=columns, padding=2)


def make_parent_folder(path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        utils.ensure_folder(folder)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared with visualize.py: checkpoint, guidance, seed, device."""
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (model_ep*.pth)")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance weight w of S1 eq. 5 (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial and per-step noise")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda, then mps, then cpu")


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared with visualize.py: sampler, DDIM steps, eta, clipping of the predicted y_0."""
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="the sheet's ancestral sampler (all T steps) or DDIM (default: ddpm)")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default: min({DEFAULT_DDIM_STEPS}, T))")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity, 0 = deterministic (default: 0)")
    parser.add_argument("--clip-denoised", action="store_true",
                        help="clip the predicted y_0 to [-1, 1] at every step (needed by cosine-schedule models)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    add_sampler_flags(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--classes", type=int, nargs="+", metavar="C", help="classes, one column each (default: all)")
    what.add_argument("--mix", metavar="C:W,...", help="a mixture of classes, e.g. 3:0.5,8:0.5 (weights normalised)")
    parser.add_argument("--compose", action="store_true",
                        help="guide towards the --mix by composed guidance instead of a convex class vector")
    parser.add_argument("--n", type=int, default=8, help="images per class, or of the mixture (default: 8)")
    parser.add_argument("--out", required=True, help="PNG grid to write")
    parser.add_argument("--gif", help="also write the reverse process as an animated GIF")
    return parser


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Checks of the flags a command has that need no model; raise ValueError naming the flag."""
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    eta = getattr(args, "eta", 0.0)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"--eta must be a non-negative number, got {eta}")
    if getattr(args, "steps", None) is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if getattr(args, "n", 1) < 1:
        raise ValueError(f"--n must be positive, got {args.n}")


def requested_conditions(args: argparse.Namespace, n_classes: int) -> tuple[torch.Tensor, tuple, int, str]:
    """(conditions, weights, grid columns, description) for --classes, --mix [--compose], or all classes."""
    if args.mix is not None:
        mixture = parse_mixture(args.mix)
        build = composed_mixture_conditions if args.compose else convex_mixture_conditions
        conditions, weights = build(mixture, args.n, n_classes, args.guidance)
        kind = "composed guidance" if args.compose else "convex class vector"
        return conditions, weights, min(args.n, MAX_GRID_COLUMNS), f"{args.n} images of the mixture {args.mix} ({kind})"
    classes = args.classes if args.classes is not None else list(range(n_classes))
    conditions, weights = class_conditions(classes, args.n, n_classes, args.guidance)
    return conditions, weights, len(classes), f"{args.n} images each of classes {' '.join(map(str, classes))}"


def run(args: argparse.Namespace) -> None:
    check_sampling_arguments(args)
    if args.compose and args.mix is None:
        raise ValueError("--compose needs --mix (it chooses how a mixture is guided)")
    if args.mix is not None:
        parse_mixture(args.mix)                         # syntax errors before the (slow) model load
    started = time.perf_counter()
    model = load_fast_sampler(args.checkpoint, resolve_device(args.device))
    conditions, weights, columns, description = requested_conditions(args, model.n_classes)
    images, frames = generate(model, conditions, weights, args.sampler, args.steps, args.eta, args.seed,
                              args.clip_denoised)
    save_grid(images, args.out, columns)
    written = [args.out]
    if args.gif:
        make_parent_folder(args.gif)
        utils.save_gif(frames, args.gif, nrow=columns)
        written.append(args.gif)
    print(f"wrote {' and '.join(written)}: {description}, w = {args.guidance}, {args.sampler}, "
          f"{model.device}, {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: sys.argv[1:]) and sample; errors are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    exit_on_error(run, args)


if __name__ == "__main__":
    main()
