"""Sample quality against the number of steps: the DDPM, DDIM and DPM-Solver++(2M) samplers on one checkpoint,
judged by tools/evaluate.py's metrics (sheet 1 Q6: the main drawback of diffusion models is slow sampling).

    python -m tools.samplers --checkpoint log_mnist/model_ep20.pth --data-root /path/to/data --out log_mnist/samplers
    python -m tools.samplers --checkpoint log_cifar10/model_ep34_step1.pth \\
        --image-folder /path/to/data/cifar10-jpeg/train --out log_cifar10/samplers

Every sampler setting gets its own metric table in --out (<sampler><steps>[_<spacing>].csv, reused when the
command runs again). The generated images of each setting and weight are kept in --out/samples/ (git-ignored
.pt files, reused by a later call with the same settings): an interrupted study loses one weight's sampling at
most, and deleting a table judges its saved images again, e.g. with a new judge, in seconds. Then the study
writes

    samplers.csv   one row per sampler setting and guidance weight of every table in --out (earlier calls' too):
                   steps, network evaluations per image, images/s, class accuracy, Frechet distance, diversity
                   (and the real test images' row)
    samplers.png   accuracy and Frechet distance against network evaluations per image, one line per sampler
"""
from __future__ import annotations

import argparse
import csv
import os

import utils
from lab.cli import (OneLineParser, add_checkpoint_flags, add_compile_flag, add_data_flags, add_device_flag,
                     add_guidance_flag, add_judging_flags, add_out_flag, add_seed_flag, data_flags, exit_on_error,
                     resolve_device, tool_flags)
from lab.generation import load_for_sampling
from lab.sample_quality import evaluate_model, write_table

# (sampler, steps, spacing, eta); eta = 1 makes dpm++2m the SDE solver (SDE-DPM-Solver++(2M))
SETTINGS = [("ddpm", None, "time", 0.0), ("ddim", 10, "time", 0.0), ("ddim", 20, "time", 0.0),
            ("ddim", 50, "time", 0.0), ("ddim", 50, "time", 1.0), ("dpm++2m", 10, "logsnr", 0.0),
            ("dpm++2m", 15, "logsnr", 0.0), ("dpm++2m", 20, "logsnr", 0.0), ("dpm++2m", 25, "logsnr", 0.0),
            ("dpm++2m", 50, "logsnr", 0.0), ("dpm++2m", 10, "time", 0.0), ("dpm++2m", 20, "time", 0.0),
            ("dpm++2m", 10, "logsnr", 1.0), ("dpm++2m", 20, "logsnr", 1.0), ("dpm++2m", 50, "logsnr", 1.0)]


def setting_name(sampler: str, steps: int | None, spacing: str, eta: float = 0.0) -> str:
    """'ddpm', 'ddim20', 'ddim50_eta1', 'dpm++2m20' (log-SNR spacing), 'dpm++2m20_time' or 'dpm++2m20_sde' (eta = 1:
    the SDE solver)."""
    suffix = "_time" if sampler == "dpm++2m" and spacing == "time" else ""
    suffix += "_sde" if eta == 1 and sampler == "dpm++2m" else f"_eta{eta:g}" if eta else ""
    return f"{sampler}{steps or ''}{suffix}"


def table_for(model, folder: str, sampler: str, steps: int | None, spacing: str, eta: float, args) -> None:
    """Write the metric table of one sampler setting, unless an earlier call wrote it."""
    name = setting_name(sampler, steps, spacing, eta)
    path = os.path.join(folder, name + ".csv")
    if not os.path.exists(path):
        rows = evaluate_model(model, f"{args.checkpoint} with {name}", args.guidance, args.n_per_class, sampler,
                              steps, seed=args.seed, flags=data_flags(args), classifier_path=args.classifier,
                              chunk_size=args.chunk_size, spacing=spacing, eta=eta,
                              sample_cache=os.path.join(folder, "samples", name))
        write_table(rows, path)


def tables_in(folder: str) -> dict:
    """Every setting's metric table in ``folder``, in the order of SETTINGS: the rows of <setting>.csv by name
    (tables of earlier calls with other --only or --guidance included)."""
    tables = {}
    for setting in SETTINGS:
        path = os.path.join(folder, setting_name(*setting) + ".csv")
        if os.path.exists(path):
            with open(path, newline="") as file:
                tables[setting_name(*setting)] = list(csv.DictReader(file))
    return tables


def summary_rows(tables: dict) -> list[dict]:
    """The study's table: the real images' row once, then one row per setting and w, with the cost."""
    rows = []
    for name, table in tables.items():
        for row in table:
            if row["images"] == "real" and rows:
                continue
            steps = int(row["steps"]) if row["steps"] else 0
            w = float(row["w"]) if row["w"] != "" else None
            evaluations = steps * (1 if w == 0 else 2) if w is not None else ""
            seconds = float(row["seconds"]) if row["seconds"] else None
            rows.append({"setting": name if w is not None else "real", "sampler": row["sampler"], "steps": row["steps"],
                         "spacing": row.get("spacing", ""), "eta": row.get("eta", ""), "w": row["w"],
                         "evaluations_per_image": evaluations,
                         "images_per_s": round(int(row["n"]) / seconds, 2) if seconds else "",
                         "accuracy": row["accuracy"], "frechet": row["frechet"], "diversity": row["diversity"],
                         "n": row["n"]})
    return rows


def run(args: argparse.Namespace) -> None:
    model = load_for_sampling(args.checkpoint, resolve_device(args.device), compile=args.compile)
    os.makedirs(args.out, exist_ok=True)
    by_name = {setting_name(*setting): setting for setting in SETTINGS}
    unknown = sorted(set(args.only or []) - set(by_name))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(by_name)}")
    chosen = [by_name[name] for name in args.only] if args.only else SETTINGS      # in the order asked for
    for setting in chosen:
        table_for(model, args.out, *setting, args)
    rows = summary_rows(tables_in(args.out))
    utils.write_rows_csv(rows, os.path.join(args.out, "samplers.csv"))
    utils.plot_sampler_study(rows, os.path.join(args.out, "samplers.png"),
                             f"{os.path.basename(args.checkpoint)}: quality against network evaluations")
    print(f"wrote {os.path.join(args.out, 'samplers.csv')} and samplers.png")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    flags = tool_flags(parser)
    add_checkpoint_flags(flags, weights=False)
    add_guidance_flag(flags, many=True, default=[0.0, 1.0, 3.0])
    add_judging_flags(flags)
    add_compile_flag(flags)
    parser.add_argument("--only", nargs="+", metavar="SETTING",
                        help=f"only these settings, in this order (default: all: "
                             f"{' '.join(setting_name(*s) for s in SETTINGS)})")
    add_data_flags(flags)
    add_seed_flag(flags)
    add_device_flag(flags)
    add_out_flag(flags, "folder for the tables and the figure")
    parser.add_argument("--classifier", help="the judge (default: classifiers/<dataset>.pt)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_error(run, args)


if __name__ == "__main__":
    main()
