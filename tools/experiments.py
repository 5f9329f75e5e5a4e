"""Short training runs that compare settings at an equal budget, judged by tools/evaluate.py (sheet 2: "train with
different settings" and 2.3, the beta schedules; sheet 1 Q4: capacity and hyper-parameters for CIFAR-10).

    python -m tools.experiments mnist --data-root /path/to/data
    python -m tools.experiments cifar10 --image-folder /path/to/data/cifar10-jpeg/train
    python -m tools.experiments mnist --runs baseline cosine      # some runs only; --list shows a study's runs

Every run of a study trains with the study's shared settings plus its own changes, into --work/<study>/<run>/
(scratch space: checkpoints, grids). Running the command again continues unfinished runs from their newest
checkpoint and reuses finished runs and their metric tables, so an interrupted study loses at most an epoch.
The study's results go to --out (small files only, meant to be committed):

    <study>_runs.csv          per run: settings, parameters, images seen, training seconds, final losses
    <study>_losses.csv        train and test loss per epoch of every run
    <study>_<comparison>.png  one figure per comparison: train and test loss of the runs it compares
    <study>_metrics.csv       the tools/evaluate.py table of every run's final checkpoint (column 'run')
    <study>_<run>_w<w>.png    the run's final sample grid

Test losses are comparable between runs with the same T and loss type only: they are averaged over timesteps
spread over 1..T, and an l1 run reports the l1 loss. The metric table compares every run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import utils
from lab.cli import OneLineParser, add_data_flags, add_device_flag, add_out_flag, exit_on_error, resolve_device, tool_flags
from lab.checkpoints import network_from_config
from lab.generation import load_for_sampling
from lab.image_data import load_data
from lab.sample_quality import CSV_FIELDS, evaluate_checkpoint, write_table
from lab.train_config import SCRIPT_DEFAULTS, TrainConfig
from training import count_parameters, resolve_config, test_loss, train

RAW = ":raw"  # suffix of a run name in a comparison: the run's raw weights instead of its EMA


@dataclass
class Evaluation:
    """How every run of a study is judged (tools/evaluate.py's settings)."""
    guidance: List[float]
    n_per_class: int
    sampler: str = "ddim"
    steps: Optional[int] = 50
    clip_denoised: bool = True  # the cosine schedule needs it; every run of a study is judged the same way


@dataclass
class Study:
    """Runs that share ``base`` and differ by their own settings, and the comparisons drawn between them.

    ``runs`` maps a run name to its TrainConfig changes; ``comparisons`` maps a figure name to the runs it
    shows (a name ending in ':raw' is that run's raw weights, as if it had trained without EMA); ``x`` is the
    figures' horizontal axis, 'images' (images seen) or 'seconds' (training time, for equal-time budgets).
    """
    dataset: str
    base: dict
    runs: Dict[str, dict]
    comparisons: Dict[str, List[str]]
    evaluation: Evaluation
    x: str = "images"
    defaults: TrainConfig = field(init=False)

    def __post_init__(self):
        self.defaults = SCRIPT_DEFAULTS[self.dataset]

    def raw_runs(self) -> list[str]:
        """Runs whose raw weights some comparison needs."""
        return sorted({name[:-len(RAW)] for names in self.comparisons.values() for name in names
                       if name.endswith(RAW)})


# Short runs for the budget of a 2-core CPU (10 to 20 minutes each there, one thread). What matters early in
# training is the number of steps, and on one CPU thread images/s hardly depends on the batch size, so the
# studies take steps of 32 images: 1,000 steps in 32,000 images. (188 steps of 128 images left every MNIST run
# sampling near chance, too early to tell settings apart.) The sample grids use 50 DDIM steps to stay cheap, and
# clip the predicted y_0, without which the cosine schedule's samples diverge (ddpm.noise_for_clipped_start).
QUICK_GRIDS = dict(batch_size=32, guidance=[3.0], sampler="ddim", sample_steps=50, clip_denoised=True,
                   save_every=1, sample_every=1000, gif_every=1000, eval_images=200)

PRECISION_RUNS = dict(save_every=1, sample_every=1000, gif_every=1000, eval_images=2000)
PRECISION_SEEDS = {f"{precision}-seed{seed}": dict(precision=precision, seed=seed)
                   for precision in ("fp32", "bf16") for seed in (0, 1, 2)}

STUDIES = {
    # sheet 2: schedules, loss type, learning rate, T and EMA, each against the sheet-1 baseline
    "mnist": Study(
        dataset="mnist",
        base=dict(subset=8000, epochs=4, **QUICK_GRIDS),
        runs={"baseline": {}, "cosine": dict(schedule="cosine"), "sigmoid": dict(schedule="sigmoid"),
              "l1": dict(loss="l1"), "lr1e-4": dict(lr=1e-4), "T100": dict(timesteps=100),
              # the same beta range over 100 steps leaves alpha_bar_T = 0.36; 4x the betas give 0.016 (T = 400: 0.017)
              "T100-scaled": dict(timesteps=100, beta1=4e-4, beta2=0.08)},
        comparisons={"schedule": ["baseline", "cosine", "sigmoid"], "loss": ["baseline", "l1"],
                     "lr": ["baseline", "lr1e-4"], "timesteps": ["baseline", "T100", "T100-scaled"],
                     "ema": ["baseline", "baseline" + RAW]},
        evaluation=Evaluation(guidance=[0.0, 1.0, 3.0], n_per_class=10)),
    # sheet 1 Q4: capacity at an equal training time (F=64 trains about 4x slower, so it sees a quarter of the
    # images) and at an equal number of steps (4x the time), then the first hyper-parameters a practitioner
    # tries on the F=32 model
    "cifar10": Study(
        dataset="cifar10",
        base=dict(epochs=4, **QUICK_GRIDS),
        runs={"F32": dict(subset=8000), "F64": dict(subset=2000, n_features=64),
              "F32-lr3e-4": dict(subset=8000, lr=3e-4), "F32-cosine": dict(subset=8000, schedule="cosine"),
              "F64-steps": dict(subset=8000, n_features=64)},
        comparisons={"capacity": ["F32", "F64", "F64-steps"], "lr": ["F32", "F32-lr3e-4"],
                     "schedule": ["F32", "F32-cosine"], "ema": ["F32", "F32" + RAW]},
        evaluation=Evaluation(guidance=[0.0, 3.0], n_per_class=10),
        x="seconds"),
    # --precision: fp32 against bf16 autocast, three seeds each, with the scripts' settings otherwise; the test
    # losses after the same steps, set against the seed-to-seed spread, show whether bf16 costs quality
    "precision-mnist": Study(
        dataset="mnist", base=dict(epochs=2, **PRECISION_RUNS), runs=PRECISION_SEEDS,
        comparisons={"precision": list(PRECISION_SEEDS)}, evaluation=Evaluation(guidance=[0.0, 3.0], n_per_class=10)),
    "precision-cifar10": Study(
        dataset="cifar10", base=dict(epochs=2, **PRECISION_RUNS), runs=PRECISION_SEEDS,
        comparisons={"precision": list(PRECISION_SEEDS)}, evaluation=Evaluation(guidance=[0.0, 3.0], n_per_class=10)),
}


# ----------------------------------------------------------------------------------------------------------------
# Training and judging one run
# ----------------------------------------------------------------------------------------------------------------

def run_folder(work: str, study_name: str, run_name: str) -> str:
    return os.path.join(work, study_name, run_name)


def epoch_checkpoint(config: TrainConfig, epoch: int) -> str:
    """The checkpoint the training loop writes after ``epoch`` (every epoch in a study: save_every = 1)."""
    return os.path.join(config.out, f"model_ep{epoch}.pth")


def final_checkpoint(config: TrainConfig) -> str:
    return epoch_checkpoint(config, config.epochs)


def run_config(study: Study, run_name: str, folder: str, flags: dict) -> TrainConfig:
    """The run's TrainConfig: the dataset's defaults, the study's base, the run's changes and the data flags;
    resumed from the newest checkpoint when the folder has one."""
    given = {**study.base, **study.runs[run_name], **flags, "out": folder}
    has_checkpoint = os.path.isdir(folder) and any(name.endswith(".pth") for name in os.listdir(folder))
    return resolve_config(study.defaults, {**given, "resume": "auto"} if has_checkpoint else given)


class StudyStopped(Exception):
    """A run stopped before its last epoch (Ctrl-C or SIGTERM); its resumable checkpoint is saved."""


def train_run(config: TrainConfig) -> str:
    """Train (or finish training) the run; returns its final checkpoint. Raises StudyStopped when a signal
    stopped the training (the loop has saved a resumable checkpoint)."""
    path = final_checkpoint(config)
    if not os.path.exists(path):
        train(config)
    if not os.path.exists(path):
        raise StudyStopped(f"the run in {config.out} stopped before its last epoch; run the same command again "
                           f"to continue it")
    return path


def metric_rows(study: Study, checkpoint: str, weights: str, flags: dict, device: torch.device) -> list[dict]:
    """tools/evaluate.py's table of the checkpoint, read back from its CSV when an earlier call wrote it."""
    stem, _ = os.path.splitext(checkpoint)
    path = f"{stem}_eval.csv" if weights == "ema" else f"{stem}_raw_eval.csv"
    if not os.path.exists(path):
        judged = study.evaluation
        rows = evaluate_checkpoint(checkpoint, judged.guidance, judged.n_per_class, judged.sampler, judged.steps,
                                   weights, judged.clip_denoised, device=device, flags=flags)
        write_table(rows, path)
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def raw_test_losses(config: TrainConfig, device: torch.device) -> list[dict]:
    """Test loss per epoch of the run's raw weights, from its per-epoch checkpoints (the EMA's is in loss.csv)."""
    _, test_set = load_data(config)  # the test images of the run's own test loss
    records = []
    for epoch in range(1, config.epochs + 1):
        path = epoch_checkpoint(config, epoch)
        if os.path.exists(path):
            model = load_for_sampling(path, device, weights="raw")
            records.append({"epoch": epoch, **test_loss(model, test_set, config)})
    return records


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------

def run_study(name: str, study: Study, flags: dict, out: str, work: str, device: torch.device,
              only: list[str] | None = None) -> None:
    """Train and judge the study's runs (all, or ``only`` these), then write its tables and figures to ``out``.

    ``flags`` are data settings (TrainConfig fields: data_root, image_folder, cache_dir) for every run.
    """
    chosen = only or list(study.runs)
    for run_name in chosen:
        config = run_config(study, run_name, run_folder(work, name, run_name), {**flags, "device": device.type})
        print(f"== {name}/{run_name}: {describe_changes(study, run_name)}")
        checkpoint = train_run(config)
        metric_rows(study, checkpoint, "ema", flags, device)
        if run_name in study.raw_runs():
            metric_rows(study, checkpoint, "raw", flags, device)
    write_results(name, study, flags, out, work, device)


def describe_changes(study: Study, run_name: str) -> str:
    changes = study.runs[run_name]
    return ", ".join(f"{key}={value}" for key, value in changes.items()) or "the study's base settings"


def finished_runs(name: str, study: Study, flags: dict, work: str) -> dict[str, TrainConfig]:
    """Configs of the runs whose final checkpoint exists, in the study's order."""
    configs = {}
    for run_name in study.runs:
        folder = run_folder(work, name, run_name)
        if os.path.isdir(folder):
            config = run_config(study, run_name, folder, flags)
            if os.path.exists(final_checkpoint(config)):
                configs[run_name] = config
    return configs


def write_results(name: str, study: Study, flags: dict, out: str, work: str, device: torch.device) -> None:
    """The study's summary, loss table, comparison figures, metric table and final grids, from finished runs."""
    configs = finished_runs(name, study, flags, work)
    if not configs:
        return
    os.makedirs(out, exist_ok=True)
    curves = {run_name: [{**record, "images": len_subset(config)}
                         for record in utils.read_loss_csv(os.path.join(config.out, "loss.csv"))]
              for run_name, config in configs.items()}
    for run_name in study.raw_runs():
        if run_name in configs:
            curves[run_name + RAW] = merge_raw_test_losses(curves[run_name], raw_test_losses(configs[run_name], device))
    write_loss_table(curves, os.path.join(out, f"{name}_losses.csv"))
    for comparison, runs in study.comparisons.items():
        shown = {run: curves[run] for run in runs if run in curves}
        if len(shown) > 1:
            utils.plot_loss_comparison(shown, os.path.join(out, f"{name}_{comparison}.png"),
                                       f"{name}: {comparison}", study.x)
    metrics = []
    for run_name, config in configs.items():
        for weights in ["ema"] + (["raw"] if run_name in study.raw_runs() else []):
            rows = metric_rows(study, final_checkpoint(config), weights, flags, device)
            # the real test images' row once, first; then every generated row
            metrics += [{"run": run_name, **row} for row in rows if row["images"] == "generated" or not metrics]
        for w in config.guidance:
            shutil.copyfile(os.path.join(config.out, f"image_ep{config.epochs}_w{w}.png"),
                            os.path.join(out, f"{name}_{run_name}_w{w:g}.png"))
    utils.write_rows_csv(metrics, os.path.join(out, f"{name}_metrics.csv"), ("run", *CSV_FIELDS))
    summaries = [run_summary(study, run_name, config, curves[run_name]) for run_name, config in configs.items()]
    utils.write_rows_csv(summaries, os.path.join(out, f"{name}_runs.csv"))
    print(f"wrote the {name} study's tables and figures to {out}")


def merge_raw_test_losses(records: list[dict], raw: list[dict]) -> list[dict]:
    """The run's records with the test losses replaced by those of its raw weights (the training is the same)."""
    raw_by_epoch = {record["epoch"]: record for record in raw}
    merged = []
    for record in records:
        kept = {key: value for key, value in record.items() if not key.startswith("test_loss")}
        merged.append({**kept, **{key: value for key, value in raw_by_epoch.get(record["epoch"], {}).items()
                                  if key.startswith("test_loss")}})
    return merged


def write_loss_table(curves: dict[str, list[dict]], path: str) -> None:
    rows = [{"run": run_name, **record} for run_name, records in curves.items() for record in records]
    utils.write_rows_csv(rows, path)


def run_summary(study: Study, run_name: str, config: TrainConfig, records: list[dict]) -> dict:
    seconds = sum(float(record["seconds"]) for record in records)
    images = len_subset(config) * config.epochs
    last = records[-1]
    parameters = count_parameters(network_from_config(dataclasses.asdict(config)))
    return {"run": run_name, "changes": describe_changes(study, run_name), "parameters": parameters,
            "images_seen": images, "epochs": config.epochs, "train_seconds": round(seconds, 1),
            "seconds_per_1000_images": round(1000 * seconds / images, 2),
            "final_train_loss": last["train_loss"], "final_test_loss": last.get("test_loss", "")}


def len_subset(config: TrainConfig) -> int:
    """Training images per epoch (the subset the study sets)."""
    if config.subset is None:
        raise ValueError("a study's runs must set subset (the budget in images per epoch)")
    return config.subset


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    flags = tool_flags(parser)
    parser.add_argument("study", choices=sorted(STUDIES), help="which study to run")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="train and judge only these runs (default: all)")
    parser.add_argument("--list", action="store_true", help="list the study's runs and comparisons, then stop")
    add_data_flags(flags)
    add_device_flag(flags)
    add_out_flag(flags, "folder for the study's tables and figures (default: <work>/<study>/results; the "
                        "committed results were written with --out log_<study>/experiments)", required=False)
    parser.add_argument("--work", default="scratch/experiments",
                        help="folder for the runs' checkpoints and grids (default: scratch/experiments)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the study; errors and stops are one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        exit_on_error(run, args)
    except StudyStopped as stopped:
        raise SystemExit(f"stopped: {stopped}") from None


def run(args: argparse.Namespace) -> None:
    study = STUDIES[args.study]
    unknown = sorted(set(args.runs or []) - set(study.runs))
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(unknown)} of study {args.study}; valid: {', '.join(study.runs)}")
    if args.list:
        for run_name in study.runs:
            print(f"{run_name}: {describe_changes(study, run_name)}")
        for comparison, runs in study.comparisons.items():
            print(f"figure {comparison}: {', '.join(runs)}")
        return
    flags = {key: value for key, value in (("data_root", args.data_root), ("image_folder", args.image_folder),
                                           ("cache_dir", args.cache_dir)) if value is not None}
    out = args.out or os.path.join(args.work, args.study, "results")
    run_study(args.study, study, flags, out, args.work, resolve_device(args.device), args.runs)


if __name__ == "__main__":
    main()
