"""Figures of the diffusion model: beta schedules, forward and reverse process strips, class-mixture comparison.

    python -m tools.visualize schedules --out schedules.png [--timesteps 400 --beta1 1e-4 --beta2 0.02]
    python -m tools.visualize forward (--checkpoint CKPT | --dataset mnist --data-root DIR | --image-folder DIR)
                                --out forward.png [--index 0 --seed 0]
    python -m tools.visualize reverse --checkpoint CKPT --class 3 [--guidance 3 --seed 0] --out reverse.png
    python -m tools.visualize mixtures --checkpoint CKPT --pairs 3:8 1:7 [--guidance 3 --n 8] --out mixtures.png

The strips show t = 0, T/8, 2T/8, ..., T. Errors are one line on stderr with exit code 2 (as in tools/sample.py).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import utils
from ddpm import DDPM, SCHEDULES, ddpm_schedule
from lab.checkpoints import load_checkpoint
from lab.cli import (OneLineParser, add_checkpoint_flags, add_count_flag, add_data_flags, add_out_flag,
                     add_sampler_flags, add_seed_flag, exit_on_error, resolve_device, tool_flags)
from lab.generation import SamplingModel, generate, load_for_sampling
from lab.image_data import load_builtin, load_data, load_image_folder, to_model_scale
from tools.sample import (add_model_flags, check_classes, check_sampling_arguments, class_conditions,
                          composed_mixture_conditions, convex_mixture_conditions, make_parent_folder, sampler_settings)
from lab.train_config import GEOMETRY, TrainConfig

STRIP_PARTS = 8      # the strips show t = k T / 8, k = 0..8


def strip_timesteps(n_timesteps: int, parts: int = STRIP_PARTS) -> list[int]:
    """t = round(k T / parts), k = 0..parts, ascending and without repeats (T < parts gives fewer)."""
    return sorted({round(k * n_timesteps / parts) for k in range(parts + 1)})


# ----------------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------------

def draw_schedules(args: argparse.Namespace) -> str:
    """beta_t and alpha_bar_t of every schedule (S2 eq. 10 for the sigmoid one) on one figure."""
    schedules = {name: ddpm_schedule(args.beta1, args.beta2, args.timesteps, name) for name in SCHEDULES}
    schedules = {("cosine (no beta range)" if name == "cosine" else name): terms for name, terms in schedules.items()}
    make_parent_folder(args.out)
    utils.plot_schedules(schedules, args.out, f"Beta schedules, T = {args.timesteps}, "
                                              f"beta_1 = {args.beta1:g}, beta_T = {args.beta2:g}")
    return args.out


# ----------------------------------------------------------------------------------------------------------------
# forward process
# ----------------------------------------------------------------------------------------------------------------

def forward_process_model(config: dict) -> DDPM:
    """A DDPM with the config's schedule (timesteps, beta1, beta2, schedule) on the CPU, for its ``q_sample``;
    the forward process needs no network, so it holds none (an identity)."""
    return DDPM(torch.nn.Identity(), config["beta1"], config["beta2"], config["timesteps"], device="cpu",
                schedule=config["schedule"])


def forward_config(args: argparse.Namespace) -> dict:
    """The checkpoint's training config, or the schedule and data flags when there is no checkpoint."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)["config"]
    return dict(timesteps=args.timesteps, beta1=args.beta1, beta2=args.beta2, schedule=args.schedule,
                dataset=args.dataset or "mnist", data_root=args.data_root or "./data", image_folder=None)


def real_image(args: argparse.Namespace, config: dict) -> torch.Tensor:
    """Training image number --index, [1, C, H, W] in [-1, 1], from the data flags, else the checkpoint's data."""
    if args.image_folder or args.dataset:
        dataset, image_folder = args.dataset or config.get("dataset", "mnist"), args.image_folder
    else:
        dataset, image_folder = config.get("dataset", "mnist"), config.get("image_folder")
    if dataset not in GEOMETRY:             # the butterflies: the run's photographs, made square as it made them
        saved = {key: value for key, value in config.items() if key in TrainConfig.__dataclass_fields__}
        given = {"image_folder": image_folder, **({"cache_dir": args.cache_dir} if args.cache_dir is not None else {})}
        images = load_data(TrainConfig(**{**saved, **given}))[0].images
    elif image_folder:
        channels = config.get("in_channels", GEOMETRY[dataset]["in_channels"])
        size = config.get("image_size", GEOMETRY[dataset]["image_size"])
        cache = args.cache_dir if args.cache_dir is not None else config.get("cache_dir", "")
        images = load_image_folder(image_folder, channels, size, os.path.expanduser(cache) if cache else None).images
    else:
        images = load_builtin(dataset, args.data_root or config.get("data_root", "./data"), train=True).images
    if not 0 <= args.index < len(images):
        raise ValueError(f"--index must lie in 0..{len(images) - 1}, got {args.index}")
    return to_model_scale(images[args.index:args.index + 1])


def forward_frames(model: DDPM, y0: torch.Tensor, timesteps: list[int], seed: int) -> torch.Tensor:
    """y_t ~ q(y_t | y_0) (S1 eq. 3) with ONE noise draw eps shared by every t: y0 [1, C, H, W] -> [K, C, H, W].

    t = 0 is y_0 itself.
    """
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed))
    frames = [y0 if t == 0 else model.q_sample(y0, torch.tensor([t]), noise) for t in timesteps]
    return torch.cat(frames)


def draw_forward(args: argparse.Namespace) -> str:
    config = forward_config(args)
    model = forward_process_model(config)
    timesteps = strip_timesteps(model.n_timesteps)
    frames = forward_frames(model, real_image(args, config), timesteps, args.seed)
    make_parent_folder(args.out)
    utils.save_strip(frames, [f"t = {t}" for t in timesteps], args.out,
                     f"Forward process q(y_t | y_0), {model.schedule} schedule, T = {model.n_timesteps}")
    return args.out


# ----------------------------------------------------------------------------------------------------------------
# reverse process
# ----------------------------------------------------------------------------------------------------------------

def reverse_frames(model: SamplingModel, label: int, guidance: float, timesteps: list[int],
                   seed: int) -> torch.Tensor:
    """One sample of class ``label`` by the sheet's sampler (S1 eqs. 4-5): y_t for the given t (T is the initial
    noise, 0 the sample), in descending order, [K, C, H, W] on the CPU."""
    conditions, _ = class_conditions([label], 1, model.n_classes)
    _, frames = generate(model, conditions, guidance, sampler="ddpm", seed=seed, keep=timesteps)
    return torch.from_numpy(frames[:, 0])


def draw_reverse(args: argparse.Namespace) -> str:
    check_sampling_arguments(args)
    model = load_for_sampling(args.checkpoint, resolve_device(args.device), args.weights)
    check_classes([args.label], model.n_classes)
    timesteps = strip_timesteps(model.n_timesteps)[::-1]
    frames = reverse_frames(model, args.label, args.guidance, timesteps, args.seed)
    make_parent_folder(args.out)
    utils.save_strip(frames, [f"t = {t}" for t in timesteps], args.out,
                     f"Reverse process (DDPM sampler) of class {args.label}, guidance w = {args.guidance:g}, "
                     f"seed {args.seed}")
    return args.out


# ----------------------------------------------------------------------------------------------------------------
# class mixtures
# ----------------------------------------------------------------------------------------------------------------

def parse_pair(text: str) -> tuple[int, int]:
    """'3:8' -> (3, 8)."""
    first, separator, second = text.partition(":")
    try:
        if not separator:
            raise ValueError
        pair = int(first), int(second)
    except ValueError:
        raise ValueError(f"--pairs must look like A:B (e.g. 3:8), got {text!r}") from None
    if pair[0] == pair[1]:
        raise ValueError(f"a pair needs two different classes, got {text!r}")
    return pair


def mixture_rows(model: SamplingModel, a: int, b: int,
                 args: argparse.Namespace) -> tuple[list[torch.Tensor], list[str]]:
    """Rows of n images [n, C, H, W], all from the same noise: class a, class b, the 50/50 mixture as a convex
    class vector, and the 50/50 mixture by composed guidance; with their labels."""
    n, k = args.n, model.n_classes
    mixture = {a: 0.5, b: 0.5}
    built = [(class_conditions([a], n, k), f"class {a}"),
             (class_conditions([b], n, k), f"class {b}"),
             (convex_mixture_conditions(mixture, n, k), f"convex\nc = 0.5 e{a} + 0.5 e{b}"),
             (composed_mixture_conditions(mixture, n, k), "composed\np_i = 1/2")]
    rows = [generate(model, conditions, args.guidance, proportions, **sampler_settings(args))[0]
            for (conditions, proportions), _ in built]
    return rows, [label for _, label in built]


def draw_mixtures(args: argparse.Namespace) -> str:
    check_sampling_arguments(args)
    pairs = [parse_pair(text) for text in args.pairs]
    model = load_for_sampling(args.checkpoint, resolve_device(args.device), args.weights)
    rows, labels, group_titles = [], [], []
    for a, b in pairs:
        check_classes([a, b], model.n_classes)
        pair_rows, pair_labels = mixture_rows(model, a, b, args)
        rows += pair_rows
        labels += pair_labels
        group_titles += [f"classes {a} and {b}"] + [None] * (len(pair_rows) - 1)
    make_parent_folder(args.out)
    utils.save_labelled_rows(rows, labels, args.out,
                             f"Guiding towards a mixture of two classes, w = {args.guidance:g}, {args.sampler} "
                             f"sampler; every row starts from the same noise", group_titles)
    return args.out


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    """--timesteps, --beta1, --beta2 (and --schedule) of a diffusion without a checkpoint."""
    flags = tool_flags(parser)
    defaults = TrainConfig()
    for name in ("timesteps", "beta1", "beta2"):
        flags.add(name, type=type(getattr(defaults, name)), default=getattr(defaults, name))
    flags.add("schedule", default=defaults.schedule)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    schedules = commands.add_parser("schedules", help="beta_t and alpha_bar_t of the three schedules")
    add_schedule_flags(schedules)
    schedules.set_defaults(run=draw_schedules)

    forward = commands.add_parser("forward", help="one real image diffused to t = 0, T/8, ..., T")
    add_checkpoint_flags(tool_flags(forward), required=False, weights=False,
                         help="take the schedule (and, by default, the data) from this checkpoint")
    forward.add_argument("--dataset", choices=tuple(GEOMETRY), help="built-in dataset (default: the checkpoint's, "
                                                                    "else mnist)")
    add_data_flags(tool_flags(forward))
    forward.add_argument("--index", type=int, default=0, help="which training image (default: 0)")
    add_seed_flag(tool_flags(forward))
    add_schedule_flags(forward)
    forward.set_defaults(run=draw_forward)

    reverse = commands.add_parser("reverse", help="one guided sample at t = T, 7T/8, ..., 0 (DDPM sampler)")
    add_model_flags(reverse)
    reverse.add_argument("--class", dest="label", type=int, required=True, help="the class to sample")
    reverse.set_defaults(run=draw_reverse)

    mixtures = commands.add_parser("mixtures", help="class a, class b, convex and composed 50/50 mixtures")
    add_model_flags(mixtures)
    add_sampler_flags(tool_flags(mixtures))
    mixtures.add_argument("--pairs", nargs="+", required=True, metavar="A:B", help="class pairs, e.g. 3:8 1:7")
    add_count_flag(tool_flags(mixtures), "images per row")
    mixtures.set_defaults(run=draw_mixtures)

    for command in (schedules, forward, reverse, mixtures):
        add_out_flag(tool_flags(command), "PNG to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: sys.argv[1:]) and draw; errors are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)

    def draw(args: argparse.Namespace) -> None:
        started = time.perf_counter()
        written = args.run(args)
        print(f"wrote {written} in {time.perf_counter() - started:.1f} s")

    exit_on_error(draw, args)


if __name__ == "__main__":
    main()
