"""Sample a trained conditional DDPM: classes, or a mixture of classes (sheet 1: guiding towards a mixture).

An unconditional model (trained with p_uncond = 1, like train_butterflies.py's) has no classes: it draws --n images
with the null class c = 0, where eq. 5 gives eps(y_t, t, 0) for every w (so w = 0 is used).

    python -m tools.sample --checkpoint CKPT [--classes 3 7 | --mix 3:0.5,8:0.5 [--compose]] [--n 8] [--guidance 2]
                     [--sampler ddpm|ddim|dpm++2m] [--steps S] [--eta 0] [--clip-denoised] [--seed 0]
                     [--weights ema|raw] [--device auto|cpu|cuda|mps] --out out.png [--gif out.gif]

Classes give a grid with one column per class and --n rows; a mixture gives --n images in a row-major grid.
Two ways to guide towards a mixture sum_i p_i c_i of one-hot classes c_i (weights normalised to sum to 1):

    convex (default)   one class vector c = sum_i p_i c_i in S1 eq. 5:
                       eps~ = (1 + w) eps(y_t, t, c) - w eps(y_t, t, 0)
    composed (--compose)  one conditional copy per class, eq. 5 for each, averaged with the proportions:
                       eps~ = eps(y_t, t, 0) + (1 + w) sum_i p_i (eps(y_t, t, c_i) - eps(y_t, t, 0))

Both reduce to eq. 5 for a single class; ``lab.generation.SamplingDDPM.guided_noise`` evaluates either in one batched
network call. Errors (bad checkpoint, class, mixture, flag) are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import utils
from lab.cli import (OneLineParser, add_checkpoint_flags, add_count_flag, add_device_flag, add_fast_path_flags,
                     add_guidance_flag, add_out_flag, add_sampler_flags, add_seed_flag, exit_on_error, resolve_device,
                     tool_flags)
from ddpm import class_grid_labels
from lab.checkpoints import load_network
from lab.generation import (animation_states, fast_sampling_model, generate, sampled_image_steps,
                            sampling_path)
from lab.train_config import is_unconditional

MAX_GRID_COLUMNS = 8                       # a mixture's n images are laid out row-major, this many per row

Mixture = Dict[int, float]                 # class -> (unnormalised, non-negative) weight, in the order given


# ----------------------------------------------------------------------------------------------------------------
# Conditions and proportions for generation.generate: (conditions [K, N, n_classes], K proportions summing to 1)
# ----------------------------------------------------------------------------------------------------------------

def class_conditions(classes: Sequence[int], n: int, n_classes: int) -> tuple[torch.Tensor, tuple[float]]:
    """n images of each class, ordered class-fastest (row r holds the r-th image of every class), S1 eq. 5.

    Returns conditions [1, n * len(classes), n_classes] (one-hot) and the proportions (1.0,).
    """
    check_classes(classes, n_classes)
    return F.one_hot(class_grid_labels(classes, n), n_classes).float().unsqueeze(0), (1.0,)


def convex_mixture_conditions(mixture: Mixture, n: int, n_classes: int) -> tuple[torch.Tensor, tuple[float]]:
    """Mixture as ONE class vector c = sum_i p_i e_{c_i} (a convex combination of one-hot vectors), S1 eq. 5.

    Returns conditions [1, n, n_classes] (n copies of c) and the proportions (1.0,).
    """
    proportions = normalised(mixture, n_classes)
    vector = torch.zeros(n_classes)
    for label, p in proportions.items():
        vector[label] = p
    return vector.expand(1, n, n_classes).clone(), (1.0,)


def composed_mixture_conditions(mixture: Mixture, n: int, n_classes: int) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Mixture by composed guidance: one conditional copy per class c_i, weighted by its proportion p_i.

    Returns conditions [K, n, n_classes] (conditions[i] = n copies of e_{c_i}) and the K proportions
    (``lab.mixtures.composed_guidance``), K = number of classes in the mixture.
    """
    proportions = normalised(mixture, n_classes)
    one_hots = F.one_hot(torch.tensor(list(proportions)), n_classes).float()       # [K, n_classes]
    conditions = one_hots.unsqueeze(1).expand(-1, n, -1).clone()                     # [K, n, n_classes]
    return conditions, tuple(proportions.values())


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
# Writing and the command line
# ----------------------------------------------------------------------------------------------------------------

def save_grid(images: torch.Tensor, path: str, columns: int) -> None:
    """images [N, C, H, W] in [-1, 1] as a grid with ``columns`` images per row (padding 2)."""
    make_parent_folder(path)
    save_image(utils.to_unit_range(images), path, nrow=columns, padding=2)


def make_parent_folder(path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


def add_model_flags(parser: argparse.ArgumentParser, guidance: float = 2.0) -> None:
    """The flags of every tool that samples one checkpoint: checkpoint, weights, guidance, seed, device."""
    flags = tool_flags(parser)
    add_checkpoint_flags(flags)
    add_guidance_flag(flags, many=False, default=guidance)
    add_seed_flag(flags)
    add_device_flag(flags)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    flags = tool_flags(parser)
    add_sampler_flags(flags)
    add_fast_path_flags(flags)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--classes", type=int, nargs="+", metavar="C", help="classes, one column each (default: all)")
    what.add_argument("--mix", metavar="C:W,...", help="a mixture of classes, e.g. 3:0.5,8:0.5 (weights normalised)")
    parser.add_argument("--compose", action="store_true",
                        help="guide towards the --mix by composed guidance instead of a convex class vector")
    add_count_flag(flags, "images per class, or of the mixture")
    add_out_flag(flags, "PNG grid to write")
    parser.add_argument("--gif", help="also write the reverse process as an animated GIF")
    return parser


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Checks of the flags a command has that need no model; raise ValueError naming the flag."""
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    eta = getattr(args, "eta", 0.0)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"--eta must be a non-negative number, got {eta}")
    if getattr(args, "sample_steps", None) is not None and args.sample_steps < 1:
        raise ValueError(f"--steps must be positive, got {args.sample_steps}")
    if getattr(args, "n", 1) < 1:
        raise ValueError(f"--n must be positive, got {args.n}")


def requested_conditions(args: argparse.Namespace, n_classes: int) -> tuple[torch.Tensor, tuple, int, str]:
    """(conditions, proportions, grid columns, description) for --classes, --mix [--compose], or all classes."""
    if args.mix is not None:
        mixture = parse_mixture(args.mix)
        build = composed_mixture_conditions if args.compose else convex_mixture_conditions
        conditions, proportions = build(mixture, args.n, n_classes)
        kind = "composed guidance" if args.compose else "convex class vector"
        return (conditions, proportions, min(args.n, MAX_GRID_COLUMNS),
                f"{args.n} images of the mixture {args.mix} ({kind})")
    classes = args.classes if args.classes is not None else list(range(n_classes))
    conditions, proportions = class_conditions(classes, args.n, n_classes)
    return conditions, proportions, len(classes), f"{args.n} images each of classes {' '.join(map(str, classes))}"


def unconditional_conditions(args: argparse.Namespace, n_classes: int) -> tuple[torch.Tensor, tuple, int, str]:
    """What ``requested_conditions`` gives for an unconditional model: --n null-class vectors c = 0."""
    if args.classes is not None or args.mix is not None:
        raise ValueError(f"{args.checkpoint} is an unconditional model (trained with p_uncond = 1): it has no "
                         f"classes to choose; leave out --classes and --mix")
    return (torch.zeros(1, args.n, n_classes), (1.0,), min(args.n, MAX_GRID_COLUMNS),
            f"{args.n} images of the unconditional model (c = 0)")


def sampler_settings(args: argparse.Namespace) -> dict:
    """The sampler flags as keyword arguments of ``generation.generate``."""
    return dict(sampler=args.sampler, steps=args.sample_steps, eta=args.eta, clip_denoised=args.clip_denoised,
                spacing=args.spacing, seed=args.seed)


def run(args: argparse.Namespace) -> None:
    check_sampling_arguments(args)
    if args.compose and args.mix is None:
        raise ValueError("--compose needs --mix (it chooses how a mixture is guided)")
    if args.mix is not None:
        parse_mixture(args.mix)                         # syntax errors before the (slow) model load
    started = time.perf_counter()
    network, config = load_network(args.checkpoint, args.weights)
    if is_unconditional(config["drop_prob"]):
        conditions, proportions, columns, description = unconditional_conditions(args, config["n_classes"])
        args.guidance = 0.0                             # eq. 5 at c = 0 is eps(y_t, t, 0) whatever w is
    else:
        conditions, proportions, columns, description = requested_conditions(args, config["n_classes"])
    device = resolve_device(args.device)
    work = sampled_image_steps(args.sampler, args.sample_steps, config["timesteps"], conditions.shape[-2])
    path = sampling_path(device, config, args.fast, args.compile, work)
    print(f"sampling {conditions.shape[-2]} images on {device}; {path.announce()}", flush=True)
    model = fast_sampling_model(network.to(device), config, device, path)
    keep = animation_states(model.ddpm, args.sampler, args.sample_steps, args.spacing) if args.gif else ()
    images, frames = generate(model, conditions, args.guidance, proportions, keep=keep, **sampler_settings(args))
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
