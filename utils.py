"""Plotting: sample grids, GIFs of the reverse process, loss curves, schedule plots and process strips.

Images come in as tensors in [-1, 1] (the training scale) and are mapped to [0, 1] for torchvision.
"""
from __future__ import annotations

import csv
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def save_sample_grid(generated: torch.Tensor, real: torch.Tensor, path: str, nrow: int = 10) -> None:
    """Generated rows above real rows (figure 2 of sheet 1): generated, real [N, C, H, W] in [-1, 1]."""
    grid = torch.cat((generated.detach().cpu(), real.detach().cpu()))
    save_image(to_unit_range(grid), path, nrow=nrow, padding=2)


def save_gif(frames: np.ndarray, path: str, nrow: int = 10, scale: int = 2, frame_ms: int = 100,
             hold_last_ms: int = 1500) -> None:
    """An animated GIF of the reverse process: frames [F, N, C, H, W] in [-1, 1], one grid per frame."""
    pictures = []
    for frame in frames:
        grid = make_grid(to_unit_range(torch.from_numpy(frame)), nrow=nrow, padding=2)
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
        pictures.append(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST))
    durations = [frame_ms] * (len(pictures) - 1) + [hold_last_ms]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def write_rows_csv(rows: Sequence[dict], path: str, columns: Sequence[str] | None = None) -> None:
    """A CSV with a header: ``columns``, by default the union of the rows' keys in first-seen order."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_loss_csv(path: str) -> list[dict]:
    """The per-epoch records of a loss.csv: 'epoch' as int, the other filled cells as float."""
    with open(path, newline="") as file:
        return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items() if value != ""}
                for row in csv.DictReader(file)]


def plot_loss_comparison(curves: dict[str, Sequence[dict]], path: str, title: str, x: str = "images") -> None:
    """Train (left) and test (right) loss of several runs, one line each: ``curves`` maps a run's label to its
    loss records (with 'epoch', 'train_loss', optional 'test_loss', 'seconds' and 'images'); ``x`` is 'images'
    (images seen) or 'seconds' (cumulative training time)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, records in curves.items():
        positions = np.cumsum([record[x] for record in records])
        for axis, key in zip(axes, ("train_loss", "test_loss")):
            points = [(position, record[key]) for position, record in zip(positions, records) if key in record]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    for axis, name in zip(axes, ("train loss (mean over each epoch)", "test loss (fixed t and noise)")):
        axis.set(title=name, xlabel="images seen" if x == "images" else "training seconds",
                 ylabel="noise-prediction loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_losses(records: Sequence[dict], path: str, title: str = "Training progress") -> None:
    """Mean training loss per epoch and, when measured, the test loss (not smoothed)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train (mean over the epoch)"), ("test_loss", "test (fixed t and noise)")):
        points = [(record["epoch"], record[key]) for record in records if key in record]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    axis.set(title=title, xlabel="epoch", ylabel="noise-prediction loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_test_loss_by_timestep(records: Sequence[dict], path: str) -> None:
    """Test loss against t for some epochs (columns test_loss_t{t} of the records)."""
    measured = [record for record in records if any(key.startswith("test_loss_t") for key in record)]
    if not measured:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    shown = measured if len(measured) <= 5 else [measured[i] for i in np.linspace(0, len(measured) - 1, 5).astype(int)]
    for record in shown:
        steps = sorted(int(key[len("test_loss_t"):]) for key in record if key.startswith("test_loss_t"))
        axis.plot(steps, [record[f"test_loss_t{t}"] for t in steps], marker="o", markersize=3,
                  label=f"epoch {int(record['epoch'])}")
    axis.set(title="Test loss by timestep", xlabel="timestep t", ylabel="noise-prediction loss", yscale="log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_sampler_study(rows: Sequence[dict], path: str, title: str) -> None:
    """Class accuracy and Frechet distance against network evaluations per image: one line per sampler (with its
    spacing and eta) and guidance weight, from the rows of tools/samplers.py's table (the 'real' row is a dashed
    reference)."""
    figure, axes = plt.subplots(1, 2, figsize=(13.5, 4.2))
    generated = [row for row in rows if row["setting"] != "real"]
    real = [row for row in rows if row["setting"] == "real"]
    def family(row: dict) -> tuple[str, str, float]:
        return row["sampler"], row["spacing"], float(row.get("eta") or 0)

    families = sorted({family(row) for row in generated})
    weights = sorted({float(row["w"]) for row in generated})
    colours = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(weights, "osD^v"))
    for sampler, spacing, eta in families:
        for w in weights:
            points = sorted((float(row["evaluations_per_image"]), float(row["accuracy"]), float(row["frechet"]))
                            for row in generated if family(row) == (sampler, spacing, eta) and float(row["w"]) == w)
            if not points:
                continue
            details = [spacing] if spacing else []
            details += [f"eta {eta:g}"] if eta else []
            label = f"{sampler}{' (' + ', '.join(details) + ')' if details else ''}, w = {w:g}"
            for axis, column in zip(axes, (1, 2)):
                axis.plot([p[0] for p in points], [p[column] for p in points], marker=markers[w], markersize=4,
                          color=colours[(sampler, spacing, eta)], label=label)
    for axis, key, name in ((axes[0], "accuracy", "class accuracy (judge)"), (axes[1], "frechet", "Frechet distance")):
        if real:
            axis.axhline(float(real[0][key]), color="grey", linestyle="--", linewidth=1, label="real test images")
        axis.set(xscale="log", xlabel="network evaluations per image", ylabel=name, title=name)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))     # beside the plots, hiding no point
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_schedules(schedules: dict[str, dict[str, torch.Tensor]], path: str, title: str) -> None:
    """beta_t and alpha_bar_t of several schedules; schedules maps a name to its ``ddpm_schedule`` dict."""
    figure, (beta_axis, alpha_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, terms in schedules.items():
        steps = np.arange(1, len(terms["alpha_t"]))
        beta = 1 - terms["alpha_t"][1:].numpy()
        beta_axis.plot(steps, beta, label=name)
        alpha_axis.plot(steps, terms["alpha_bar_t"][1:].numpy(), label=name)
    beta_axis.set(title=r"noise added per step $\beta_t$", xlabel="timestep t", ylabel=r"$\beta_t$ (log scale)",
                  yscale="log")
    alpha_axis.set(title=r"signal kept $\bar\alpha_t = \prod_{s=1}^{t} (1 - \beta_s)$", xlabel="timestep t",
                   ylabel=r"$\bar\alpha_t$", ylim=(-0.02, 1.02))
    for axis, corner in ((beta_axis, "upper left"), (alpha_axis, "lower left")):
        axis.grid(alpha=0.3)
        axis.legend(title="schedule", loc=corner)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_strip(images: torch.Tensor, labels: Sequence[str], path: str, title: str, scale: int = 4) -> None:
    """A row of images [K, C, H, W] in [-1, 1] with a label under each, upscaled without blurring."""
    figure, axes = plt.subplots(1, len(images), figsize=(1.3 * len(images), 1.9))
    for axis, image, label in zip(np.atleast_1d(axes), images, labels):
        picture = to_unit_range(image).permute(1, 2, 0).numpy()
        picture = np.kron(picture, np.ones((scale, scale, 1)))  # nearest-neighbour upscaling
        axis.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1,
                    interpolation="nearest")
        axis.set_xlabel(label, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_labelled_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], path: str, title: str,
                       group_titles: Sequence[str | None] | None = None, scale: int = 4) -> None:
    """One row of images per entry of ``rows`` (each [n, C, H, W] in [-1, 1]), its label at the left.

    Images are upscaled ``scale`` times without blurring; ``group_titles[i]``, when not None, is shown above row i.
    """
    figure, axes = plt.subplots(len(rows), 1, figsize=(1.1 * max(len(row) for row in rows) + 1.6, 1.25 * len(rows)),
                                squeeze=False)
    for index, (axis, row, label) in enumerate(zip(axes[:, 0], rows, labels)):
        grid = make_grid(to_unit_range(row.detach().cpu()), nrow=len(row), padding=2, pad_value=1)
        picture = np.kron(grid.permute(1, 2, 0).numpy(), np.ones((scale, scale, 1)))  # nearest-neighbour upscaling
        axis.imshow(picture, vmin=0, vmax=1, interpolation="nearest")
        axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
        if group_titles is not None and group_titles[index]:
            axis.set_title(group_titles[index], fontsize=9, loc="left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
