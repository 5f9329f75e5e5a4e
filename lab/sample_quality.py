"""The metric table of a checkpoint: sample every class per guidance weight, judge the images (lab/judge.py,
lab/metrics.py), and compare them with the real test images. tools/evaluate.py is its command line; tools/experiments.py
calls ``evaluate_checkpoint`` for every run of a study.

Columns (one row for the real test images, then one per guidance weight):

    accuracy        fraction of images the judge assigns to the class they were conditioned on
    frechet         Frechet distance between the judge's penultimate features of the images and of the real
                    test split (real row: of one part of the test split, as large as the generated set, and
                    the rest, the noise floor of that sample size)
    diversity       mean pairwise feature distance among images of the same class, averaged over classes
    real_diversity  the same for the real test images

Images enter the judge in the diffusion model's scale, [-1, 1] (``image_data.to_model_scale``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from ddpm import class_grid_labels
from lab import few_step
from lab.checkpoints import save_checkpoint
from lab.generation import SamplingModel, generate, load_for_sampling, sampler_steps
from lab.image_data import DataError, load_data, to_model_scale
from lab.judge import Classifier, classify, judge_for
from lab.metrics import class_accuracy, diversity, frechet_distance, noise_floor_split
from lab.train_config import TrainConfig

ALL_TEST_IMAGES = sys.maxsize                                   # eval_images that keeps the whole test split
CSV_FIELDS = ("images", "weights", "w", "sampler", "steps", "spacing", "eta", "clip", "chunk", "n", "accuracy",
              "frechet", "diversity", "real_diversity", "seconds")
TABLE_FORMATS = {"w": "g", "eta": "g", "accuracy": ".4f", "frechet": ".4f", "diversity": ".4f", "real_diversity": ".4f",
                 "seconds": ".1f"}


def evaluation_data_config(saved: dict, flags: dict) -> TrainConfig:
    """The checkpoint's data settings with the data flags given, keeping the whole test split.

    --data-root without --image-folder means the built-in dataset, even when the run trained on an image folder.
    """
    if "data_root" in flags and "image_folder" not in flags:
        flags = {**flags, "image_folder": None}
    known = {key: value for key, value in saved.items() if key in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{**known, **flags, "eval_images": ALL_TEST_IMAGES, "subset": None})


def generate_classes(model: SamplingModel, n_per_class: int, w: float, chunk_size: int | None = None,
                     **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_class images of every class with guidance w, class-fastest, ``chunk_size`` images per call (default:
    the model's).

    ``sampling``: sampler, steps, eta, clip_denoised, spacing, seed of ``generation.generate``. Returns
    (images [n_per_class * K, C, H, W] clamped to [-1, 1] on the CPU, conditioned classes long [same N]).
    """
    labels = class_grid_labels(range(model.n_classes), n_per_class)
    images, _ = generate(model, F.one_hot(labels, model.n_classes).float(), w, chunk_size=chunk_size, **sampling)
    return images.clamp(-1, 1), labels


def sample_or_reuse(cache: str | None, identity: dict, sample) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``sample()``'s (images, labels) and the seconds it took, or what an earlier call saved at ``cache`` with
    the same ``identity`` (checkpoint, weights, sampler settings, seed, count). ``cache`` None: always sample.

    Saving the generated images lets a table be judged again (another judge, another metric) in seconds instead
    of sampling again, and lets an interrupted study lose at most the weight it was sampling.
    """
    if cache is not None and os.path.isfile(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("identity") == identity:
                return saved["images"], saved["labels"], saved["seconds"]
        except Exception:  # a truncated or foreign file is sampled again and replaced
            pass
    started = time.perf_counter()
    images, labels = sample()
    seconds = time.perf_counter() - started
    if cache is not None:
        save_checkpoint({"identity": identity, "images": images, "labels": labels, "seconds": seconds}, cache)
    return images, labels, seconds


def real_row(features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, n_generated: int) -> dict:
    """The table's first row: the judge on the real test images, the noise floor of the Frechet distance."""
    part, rest = noise_floor_split(len(labels), n_generated)
    real_diversity = diversity(features, labels)
    return {"images": "real", "weights": "", "w": "", "sampler": "", "steps": "", "spacing": "", "eta": "", "clip": "",
            "chunk": "", "n": len(labels),
            "accuracy": class_accuracy(predicted, labels), "frechet": frechet_distance(features[part], features[rest]),
            "diversity": real_diversity, "real_diversity": real_diversity, "seconds": ""}


def sampling_settings(weights: str, w: float, sampler: str, steps: int, spacing: str, eta: float,
                      clip_denoised: bool, chunk: int) -> dict:
    """The table's columns that say how images were sampled; ``steps`` counts the sampler's steps (network calls,
    each on the conditional and, for w != 0, the unconditional copy), ``chunk`` the images per call."""
    return {"weights": weights, "w": w, "sampler": sampler, "steps": steps,
            "spacing": spacing if sampler == "dpm++2m" else "", "eta": eta if sampler != "ddpm" else "",
            "clip": "yes" if clip_denoised else "no", "chunk": chunk}


def generated_row(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                  real_diversity: float, settings: dict, seconds: float) -> dict:
    """A row for generated images [N, C, H, W] conditioned on labels [N], sampled as ``settings`` say."""
    features, predicted = classify(classifier, images)
    return {"images": "generated", **settings, "n": len(labels),
            "accuracy": class_accuracy(predicted, labels), "frechet": frechet_distance(features, real_features),
            "diversity": diversity(features, labels), "real_diversity": real_diversity, "seconds": round(seconds, 1)}


def format_table(rows: list[dict]) -> str:
    """Rows as right-aligned text columns; metrics with 4 decimals, seconds with 1, w as short as it goes."""
    def text(field, value):
        return str(value) if value == "" or field not in TABLE_FORMATS else format(value, TABLE_FORMATS[field])
    cells = [list(CSV_FIELDS)] + [[text(field, row[field]) for field in CSV_FIELDS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CSV_FIELDS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)


def write_table(rows: list[dict], path: str) -> None:
    """The metric table as CSV (columns CSV_FIELDS)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    utils.write_rows_csv(rows, path, CSV_FIELDS)


def evaluate_checkpoint(path: str, guidance: list[float], n_per_class: int, sampler: str = "ddpm",
                        steps: int | None = None, weights: str = "ema", clip_denoised: bool = False, seed: int = 0,
                        device: torch.device = torch.device("cpu"), flags: dict | None = None,
                        classifier_path: str | None = None, chunk_size: int | None = None,
                        spacing: str = "logsnr", eta: float = 0.0) -> list[dict]:
    """The metric table of a checkpoint (``weights``: 'ema' when kept, or 'raw'): see ``evaluate_model``."""
    return evaluate_model(load_for_sampling(path, device, weights), f"{path} ({weights} weights)", guidance,
                          n_per_class, sampler, steps, weights, clip_denoised, seed, flags, classifier_path,
                          chunk_size, spacing, eta)


def images_per_weight(guidance: Sequence[float], n_per_class: int | Sequence[int]) -> list[int]:
    """Images per class for each guidance weight: one count for all weights, or one count per weight.

    More images where accuracy is near 1/2 (w = 0) and fewer where it is near 1 buy the same standard error
    sqrt(p (1 - p) / n) for less sampling. Raises ValueError for a count below 2 (diversity needs pairs) or a
    list whose length is neither 1 nor that of ``guidance``.
    """
    counts = [n_per_class] if isinstance(n_per_class, int) else list(n_per_class)
    if len(counts) == 1:
        counts = counts * len(guidance)
    if len(counts) != len(guidance):
        raise ValueError(f"--n-per-class needs one number or one per guidance weight ({len(guidance)}), "
                         f"got {len(counts)}")
    if min(counts) < 2:
        raise ValueError(f"--n-per-class must be at least 2 (diversity needs pairs), got {min(counts)}")
    return counts


def evaluate_model(model: SamplingModel, name: str, guidance: list[float], n_per_class: int | Sequence[int],
                   sampler: str = "ddpm",
                   steps: int | None = None, weights: str = "ema", clip_denoised: bool = False, seed: int = 0,
                   flags: dict | None = None, classifier_path: str | None = None,
                   chunk_size: int | None = None, spacing: str = "logsnr", eta: float = 0.0,
                   sample_cache: str | None = None) -> list[dict]:
    """The metric table of a model: a row for the real test images, then one per guidance weight.

    ``n_per_class``: images per class, one count or one per weight (``images_per_weight``); the real row's noise
    floor is that of the largest generated set. ``flags`` are data settings (TrainConfig fields) that replace the
    run's, e.g. another data root; ``weights`` only labels the rows. ``sample_cache``: a path prefix under which
    each weight's images are saved (``<prefix>_w<w>_n<count>.pt``) and reused by a later call with the same
    settings (``sample_or_reuse``); the table's seconds are then those of the first sampling.
    """
    config = model.config
    counts = images_per_weight(guidance, n_per_class)
    steps = sampler_steps(sampler, steps, model.n_timesteps)
    n_steps = len(few_step.sampling_timesteps(model.ddpm, sampler, steps, spacing)) - 1   # refuses bad settings early
    classifier, classifier_path = judge_for(config, classifier_path)
    classifier.to(model.device)
    _, test_set = load_data(evaluation_data_config(config, flags or {}))
    if len(test_set) < 4:
        raise DataError(f"the test split has {len(test_set)} images; the metrics need at least 4")
    real_features, real_predicted = classify(classifier, to_model_scale(test_set.images))
    rows = [real_row(real_features, real_predicted, test_set.labels, max(counts) * config["n_classes"])]
    generated = "/".join(str(count * config["n_classes"]) for count in sorted(set(counts), reverse=True))
    print(f"judging {name} with {classifier_path}: {len(test_set)} real test images, "
          f"{generated} generated per weight ({sampler}, {n_steps} steps, {model.device})")
    sampling = dict(sampler=sampler, steps=steps, eta=eta, clip_denoised=clip_denoised, spacing=spacing, seed=seed)
    chunk_size = model.images_per_call(chunk_size)
    for w, count in zip(guidance, counts):
        settings = sampling_settings(weights, w, sampler, n_steps, spacing, eta, clip_denoised, chunk_size)
        identity = {"model": name, **settings, "seed": seed, "n_per_class": count}
        cache = None if sample_cache is None else f"{sample_cache}_w{w:g}_n{count}.pt"
        images, labels, seconds = sample_or_reuse(
            cache, identity, lambda: generate_classes(model, count, w, chunk_size, **sampling))
        rows.append(generated_row(classifier, images, labels, real_features, rows[0]["real_diversity"], settings,
                                  seconds))
        tqdm.write(f"w={w:g}: {seconds:.1f} s")
    return rows
