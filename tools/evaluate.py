"""Judge generated samples with the project's own classifier: class accuracy, Frechet distance, diversity.

    python -m tools.evaluate metrics --checkpoint CKPT [--guidance 0 1 3] [--n-per-class 50 | 100 50 50]
                       [--sampler ddpm|ddim|dpm++2m] [--steps S] [--weights ema|raw] [--clip-denoised]
                       [--chunk-size N] [--csv PATH] [--overwrite]
        samples n-per-class images of every class per guidance weight, prints the metric table
        (lab/sample_quality.py explains the columns) and writes it as CSV, by default next to the checkpoint under a
        name that carries the settings, e.g. model_ep20_eval_ddpm400_w0-1-3_n50.csv. An existing file is never
        replaced without --overwrite.
    python -m tools.evaluate train-classifier mnist|cifar10 [--data-root DIR | --image-folder DIR] [--epochs N]
                       [--no-fast]
        trains the judge, a small CNN (lab/judge.py), on the dataset's training split and saves it to
        classifiers/<dataset>.pt (or --classifier PATH); an existing file is kept without --overwrite.

Errors are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from lab.cli import (OneLineParser, add_checkpoint_flags, add_data_flags, add_device_flag, add_fast_path_flags,
                     add_guidance_flag, add_judging_flags, add_overwrite_flag, add_sampler_flags, add_seed_flag, data_flags,
                     exit_on_error, refuse_existing, resolve_device, tool_flags)
from lab.checkpoints import load_network
from lab.generation import fast_sampling_model, sampled_image_steps, sampler_steps, sampling_path
from lab.image_data import load_data, to_model_scale
from lab.judge import (ARCHITECTURES, AUGMENTATION, EPOCHS, Classifier, classify, default_classifier_path,
                       save_classifier, train_classifier)
from lab.metrics import class_accuracy
from lab.sample_quality import ALL_TEST_IMAGES, evaluate_model, format_table, images_per_weight, write_table
from lab.speed import FastPath
from lab.train_config import BUILT_IN, SCRIPT_DEFAULTS, is_unconditional
from training import resolve_config


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------

def default_csv_path(args: argparse.Namespace, n_timesteps: int) -> str:
    """<checkpoint stem>_eval_<sampler><steps>[_<spacing>][_eta<eta>]_w<w1-w2-...>_n<per class>[_raw][_clip]
    [_seed<s>].csv"""
    stem, _ = os.path.splitext(args.checkpoint)
    steps = sampler_steps(args.sampler, args.sample_steps, n_timesteps) or n_timesteps
    parts = [f"{args.sampler}{steps}"]
    if args.sampler == "dpm++2m" and args.spacing != "logsnr":
        parts.append(args.spacing)
    if args.sampler != "ddpm" and args.eta:
        parts.append(f"eta{args.eta:g}")
    parts += ["w" + "-".join(f"{w:g}" for w in args.guidance), "n" + "-".join(map(str, args.n_per_class))]
    parts += [name for name, on in (("raw", args.weights == "raw"), ("clip", args.clip_denoised)) if on]
    if args.seed:
        parts.append(f"seed{args.seed}")
    return f"{stem}_eval_{'_'.join(parts)}.csv"


def run_metrics(args: argparse.Namespace) -> list[dict]:
    """Sample for every guidance weight, judge, print the table and write the CSV; returns the rows."""
    images_per_weight(args.guidance, args.n_per_class)                     # refuses bad counts before loading
    if not all(math.isfinite(w) for w in args.guidance):
        raise ValueError(f"--guidance weights must be finite numbers, got {args.guidance}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be positive, got {args.chunk_size}")
    network, config = load_network(args.checkpoint, args.weights)
    images = sum(images_per_weight(args.guidance, args.n_per_class)) * config["n_classes"]
    device = resolve_device(args.device)
    path = sampling_path(device, config, args.fast, args.compile,
                         sampled_image_steps(args.sampler, args.sample_steps, config["timesteps"], images))
    print(f"sampling {images} images on {device}; {path.announce()}", flush=True)
    model = fast_sampling_model(network.to(device), config, device, path)
    if is_unconditional(model.config["drop_prob"]) or model.config.get("dataset") not in BUILT_IN:
        raise ValueError(f"{args.checkpoint} is a model of {model.config.get('dataset')!r} "
                         f"(p_uncond = {model.config['drop_prob']}); the metrics judge the classes of MNIST and "
                         f"CIFAR-10 only")
    csv_path = args.csv or default_csv_path(args, model.n_timesteps)
    refuse_existing(csv_path, args.overwrite)
    rows = evaluate_model(model, f"{args.checkpoint} ({args.weights} weights)", args.guidance, args.n_per_class,
                          args.sampler, args.sample_steps, args.weights, args.clip_denoised, args.seed,
                          data_flags(args), args.classifier, args.chunk_size, args.spacing, args.eta)
    write_table(rows, csv_path)
    print(format_table(rows))
    print(f"wrote {csv_path}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# train-classifier
# ----------------------------------------------------------------------------------------------------------------

def run_train_classifier(args: argparse.Namespace) -> None:
    """Train the judge of a dataset, measure its test accuracy, save it."""
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    path = args.classifier or default_classifier_path(args.dataset)
    refuse_existing(path, args.overwrite)
    device = resolve_device(args.device)
    config = resolve_config(SCRIPT_DEFAULTS[args.dataset], {**data_flags(args), "eval_images": ALL_TEST_IMAGES})
    train_set, test_set = load_data(config)
    print(f"training the {args.dataset} classifier on {len(train_set)} images ({device}), testing on {len(test_set)}")
    started, epochs = time.perf_counter(), args.epochs or EPOCHS[args.dataset]
    torch.manual_seed(args.seed)
    classifier = Classifier(train_set.images.shape[1], len(train_set.classes), **ARCHITECTURES[args.dataset])
    fast_path = FastPath.for_machine(device, train_set.images.shape[1]) if args.fast else FastPath()
    chosen = [name for name, on in (("channels_last", fast_path.train_channels_last),
                                    ("bf16 autocast", fast_path.bf16_autocast)) if on]
    print(f"classifier training: {', '.join(chosen) or 'plain fp32'}" + (" (--no-fast: plain fp32)" if chosen else ""))
    train_classifier(classifier, train_set, epochs, args.batch_size, device=device, path=fast_path,
                     **AUGMENTATION[args.dataset])
    save_classifier(classifier, path, args.dataset, test_set.images.shape[-1], float("nan"))   # kept, come what may
    _, predicted = classify(classifier, to_model_scale(test_set.images))
    accuracy = class_accuracy(predicted, test_set.labels)
    save_classifier(classifier, path, args.dataset, test_set.images.shape[-1], accuracy)
    print(f"test accuracy {accuracy:.4f} after {epochs} epochs ({time.perf_counter() - started:.0f} s); "
          f"saved {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    metrics = commands.add_parser("metrics", help="the metric table of a checkpoint's samples")
    flags = tool_flags(metrics)
    add_checkpoint_flags(flags)
    add_guidance_flag(flags, many=True, default=[0.0, 1.0, 3.0])
    add_judging_flags(flags)
    add_sampler_flags(flags)
    add_fast_path_flags(flags)
    metrics.add_argument("--csv", help="where to write the table (default: next to the checkpoint, named by the "
                                       "settings)")
    metrics.set_defaults(run=run_metrics)

    train = commands.add_parser("train-classifier", help="train the judge of a dataset")
    flags = tool_flags(train)
    train.add_argument("dataset", choices=sorted(BUILT_IN), help="which dataset's judge")
    flags.add("epochs", type=int, help=f"the classifier's training epochs (default: {EPOCHS})")
    flags.add("batch_size", type=int, default=128, help="the classifier's training batch (default: 128)")
    train.add_argument("--no-fast", dest="fast", action="store_false",
                       help="train in plain fp32 instead of the machine's fast path (channels_last; bf16 autocast "
                            "where the CPU computes bf16 natively)")
    train.set_defaults(run=run_train_classifier)

    for command in (metrics, train):
        flags = tool_flags(command)
        add_data_flags(flags)
        add_seed_flag(flags)
        add_device_flag(flags)
        add_overwrite_flag(flags)
        command.add_argument("--classifier", help="classifier file to write or to judge with "
                                                  "(default: classifiers/<dataset>.pt)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen command; errors are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    exit_on_error(args.run, args)


if __name__ == "__main__":
    main()
