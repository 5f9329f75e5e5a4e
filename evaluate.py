"""Judge generated samples with the project's own classifier: class accuracy, Frechet distance, diversity.

Two modes:

    python evaluate.py --train-classifier mnist|cifar10 [--data-root DIR] [--image-folder DIR] [--epochs N]
        trains the judge, a small CNN, on the dataset's training split and saves it to classifiers/<dataset>.pt.
    python evaluate.py --checkpoint CKPT --guidance 0 1 3 --n-per-class 50 [--sampler ddpm|ddim --steps S]
                       [--weights ema|raw] [--clip-denoised]
        samples n-per-class images of every class per guidance weight and prints, and writes as CSV, one row per
        weight next to a first row for the real test images:

        accuracy        fraction of images the judge assigns to the class they were conditioned on
        frechet         Frechet distance between the judge's penultimate features of the images and of the real
                        test split (real row: of one part of the test split, as large as the generated set, and
                        the rest, the noise floor of that sample size)
        diversity       mean pairwise feature distance among images of the same class, averaged over classes
        real_diversity  the same for the real test images

Images enter the judge in the diffusion model's scale, [-1, 1] (``training.to_model_scale``).
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils
from checkpoints import WEIGHTS, load_checkpoint, save_checkpoint
from cli import DEVICES, OneLineParser, exit_on_error, resolve_device
from ddpm import DDPM, SAMPLERS
from image_data import DataError, ImageSet
from speed import load_fast_sampler
from train_cifar10 import CIFAR10
from train_mnist import MNIST
from training import TrainConfig, load_data, resolve_config, to_model_scale

ROOT = os.path.dirname(os.path.abspath(__file__))
CLASSIFIER_FOLDER = os.path.join(ROOT, "classifiers")
DATASET_DEFAULTS = {"mnist": MNIST, "cifar10": CIFAR10}
DATASET_BY_CHANNELS = {1: "mnist", 3: "cifar10"}
ARCHITECTURES = {"mnist": dict(widths=(16, 32, 64), convs_per_stage=1),       # widths[-1]: feature dimension
                 "cifar10": dict(widths=(32, 64, 128), convs_per_stage=1)}
AUGMENTATION = {"mnist": dict(shift=2, flip=False), "cifar10": dict(shift=4, flip=True)}
EPOCHS = {"mnist": 3, "cifar10": 4}                             # a few minutes each on 2 CPU cores
ALL_TEST_IMAGES = sys.maxsize                                   # eval_images that keeps the whole test split
CSV_FIELDS = ("images", "weights", "w", "sampler", "steps", "clip", "n", "accuracy", "frechet", "diversity",
              "real_diversity", "seconds")
TABLE_FORMATS = {"w": "g", "accuracy": ".4f", "frechet": ".4f", "diversity": ".4f", "real_diversity": ".4f",
                 "seconds": ".1f"}


class ClassifierError(ValueError):
    """A classifier file that is missing or does not fit the images; the message says how to get one."""


def describe(error: Exception) -> str:
    """'Type: first line of the message' (at most 200 characters of it), for one-line errors."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small VGG-style CNN: per stage ``convs_per_stage`` 3x3 conv-BN-ReLU layers of the stage's width and a 2x2
    max pool, then global average pooling.

    ``features``: images [N, C, H, W] in [-1, 1] -> penultimate features [N, widths[-1]];
    ``forward``: images -> class logits [N, n_classes] (one linear layer on the features).
    """

    def __init__(self, in_channels: int, n_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                 convs_per_stage: int = 1):
        super().__init__()
        self.architecture = {"widths": list(widths), "convs_per_stage": convs_per_stage}
        layers, channels = [], in_channels
        for width in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def default_classifier_path(dataset: str) -> str:
    return os.path.join(CLASSIFIER_FOLDER, f"{dataset}.pt")


def train_command(dataset: str | None) -> str:
    """The command that trains the classifier of ``dataset`` on this project's data (None: of either dataset)."""
    if dataset is None:
        return "python evaluate.py --train-classifier mnist|cifar10"
    data = "--image-folder ../shared/data/cifar10-jpeg/train" if dataset == "cifar10" else "--data-root ../shared/data"
    return f"python evaluate.py --train-classifier {dataset} {data}"


def save_classifier(classifier: Classifier, path: str, dataset: str, image_size: int, test_accuracy: float) -> None:
    """Weights, architecture, image geometry and test accuracy, written atomically."""
    save_checkpoint({"state_dict": classifier.state_dict(), "dataset": dataset, "test_accuracy": test_accuracy,
                     "in_channels": classifier.body[0].in_channels, "image_size": image_size,
                     "n_classes": classifier.head.out_features, **classifier.architecture}, path)


def load_classifier(path: str, dataset: str | None = None) -> tuple[Classifier, dict]:
    """The classifier saved at ``path`` in eval mode and its file's other entries; ClassifierError says why not."""
    if not os.path.isfile(path):
        raise ClassifierError(f"classifier {path} does not exist; train it with: {train_command(dataset)}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier = Classifier(saved["in_channels"], saved["n_classes"], tuple(saved["widths"]),
                                saved["convs_per_stage"])
        classifier.load_state_dict(saved["state_dict"])
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise ClassifierError(f"{path} is not a classifier of evaluate.py ({describe(error)}); "
                              f"train one with: {train_command(dataset)}") from None
    info = {key: value for key, value in saved.items() if key != "state_dict"}
    return classifier.eval(), info


def judge_for(config: dict, path: str | None) -> tuple[Classifier, str]:
    """The classifier for a model's images and its path: ``path``, else classifiers/<dataset>.pt, the dataset told by
    the image channels (1: mnist, 3: cifar10). Raises ClassifierError when it is missing or does not fit."""
    dataset = DATASET_BY_CHANNELS.get(config["in_channels"])
    if path is None and dataset is None:
        raise ClassifierError(f"no default classifier for {config['in_channels']}-channel images; pass --classifier")
    path = path or default_classifier_path(dataset)
    classifier, info = load_classifier(path, dataset)
    check_classifier_fits(info, path, config["in_channels"], config["image_size"], config["n_classes"])
    return classifier, path


def check_classifier_fits(info: dict, path: str, in_channels: int, image_size: int, n_classes: int) -> None:
    """Refuse a classifier built for other images than the model's."""
    saved = (info["in_channels"], info["image_size"], info["n_classes"])
    if saved != (in_channels, image_size, n_classes):
        raise ClassifierError(f"classifier {path} is for {saved[0]}x{saved[1]}x{saved[1]} images of {saved[2]} "
                              f"classes, the model makes {in_channels}x{image_size}x{image_size} images of "
                              f"{n_classes} classes (pass --classifier)")


# ----------------------------------------------------------------------------------------------------------------
# Training the judge
# ----------------------------------------------------------------------------------------------------------------

def augment(images: torch.Tensor, shift: int, flip: bool) -> torch.Tensor:
    """Random translations by up to ``shift`` pixels (reflect padding) and, with ``flip``, horizontal flips.

    images [N, C, H, W] -> [N, C, H, W]; every image gets its own shift and flip.
    """
    n, _, height, width = images.shape
    if flip:
        images = torch.where(torch.rand(n, 1, 1, 1) < 0.5, images.flip(3), images)
    if shift == 0:
        return images
    padded = F.pad(images, (shift,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1))
    rows = (dy + torch.arange(height)).view(n, 1, height, 1)
    columns = (dx + torch.arange(width)).view(n, 1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(images.shape[1]).view(1, -1, 1, 1), rows, columns]


def train_classifier(classifier: Classifier, train_set: ImageSet, epochs: int, batch_size: int = 128,
                     lr: float = 0.1, shift: int = 0, flip: bool = False,
                     device: torch.device | str = "cpu") -> Classifier:
    """SGD with Nesterov momentum, a one-cycle learning rate and label smoothing on augmented images in [-1, 1].

    Returns the classifier, on ``device``, in eval mode.
    """
    classifier.to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = math.ceil(len(train_set) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps, pct_start=0.25)
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_set))
        bar = tqdm(range(steps), desc=f"classifier epoch {epoch + 1}/{epochs}", unit="step", mininterval=2.0)
        for step in bar:
            batch = order[step * batch_size:(step + 1) * batch_size]
            images = augment(to_model_scale(train_set.images[batch]), shift, flip).to(device)
            loss = F.cross_entropy(classifier(images), train_set.labels[batch].to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return classifier.eval()


def data_flags(args: argparse.Namespace) -> dict:
    """The data flags given on the command line (--data-root, --image-folder, --cache-dir) as TrainConfig fields."""
    flags = {"data_root": args.data_root, "image_folder": args.image_folder, "cache_dir": args.cache_dir}
    return {name: value for name, value in flags.items() if value is not None}


def dataset_config(dataset: str, flags: dict) -> TrainConfig:
    """The training script's config for ``dataset`` with the data flags given, keeping the whole test split."""
    return resolve_config(DATASET_DEFAULTS[dataset], {**flags, "eval_images": ALL_TEST_IMAGES})


def run_train_classifier(args: argparse.Namespace) -> None:
    """--train-classifier: train, measure test accuracy, save."""
    device = resolve_device(args.device)
    train_set, test_set = load_data(dataset_config(args.train_classifier, data_flags(args)))
    print(f"training the {args.train_classifier} classifier on {len(train_set)} images ({device}), "
          f"testing on {len(test_set)}")
    started, epochs = time.perf_counter(), args.epochs or EPOCHS[args.train_classifier]
    torch.manual_seed(args.seed)
    classifier = Classifier(train_set.images.shape[1], len(train_set.classes), **ARCHITECTURES[args.train_classifier])
    train_classifier(classifier, train_set, epochs, args.batch or 128, device=device,
                     **AUGMENTATION[args.train_classifier])
    _, predicted = classify(classifier, to_model_scale(test_set.images))
    accuracy = class_accuracy(predicted, test_set.labels)
    path = args.classifier or default_classifier_path(args.train_classifier)
    save_classifier(classifier, path, args.train_classifier, test_set.images.shape[-1], accuracy)
    print(f"test accuracy {accuracy:.4f} after {epochs} epochs ({time.perf_counter() - started:.0f} s); "
          f"saved {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and predicted classes in one pass: images [N, C, H, W] in [-1, 1] ->
    (features float64 [N, D] on the CPU, predicted long [N] on the CPU). ``classifier`` needs ``features`` and
    ``head``; it runs on its own device."""
    device = next(classifier.parameters()).device
    features, predicted = [], []
    for start in range(0, len(images), batch_size):
        batch_features = classifier.features(images[start:start + batch_size].to(device))
        features.append(batch_features.double().cpu())
        predicted.append(classifier.head(batch_features).argmax(dim=1).cpu())
    return torch.cat(features), torch.cat(predicted)


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted class [N] equals the class [N] they belong to or were conditioned on."""
    return (predicted == labels).double().mean().item()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix [D, D] by eigen decomposition (negative round-off
    eigenvalues are clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor,
                                     cov_b: torch.Tensor) -> float:
    """Frechet distance of N(mean_a, cov_a) and N(mean_b, cov_b): means [D], covariances [D, D].

    ||mean_a - mean_b||^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)), where tr (cov_a cov_b)^(1/2) is computed as
    tr (S cov_b S)^(1/2) with S = cov_a^(1/2): the same eigenvalues, but of a symmetric matrix.
    """
    mean_a, cov_a, mean_b, cov_b = (x.double() for x in (mean_a, cov_a, mean_b, cov_b))
    root_a = symmetric_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(distance.item(), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (N, M >= 2)."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of distinct rows of features [N, D] (N >= 2)."""
    n = features.shape[0]
    distances = torch.cdist(features.double(), features.double())
    return (distances.sum() / (n * (n - 1))).item()


def diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance among images of the same class, averaged over the classes with >= 2 images.

    features [N, D], labels [N]. 0 when all images of each class have the same features; nan when no class has two.
    """
    per_class = [mean_pairwise_distance(features[labels == label]) for label in labels.unique()
                 if (labels == label).sum() >= 2]
    return float(np.mean(per_class)) if per_class else math.nan


def noise_floor_split(n_real: int, n_generated: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets into the real images: one of min(n_generated, n_real // 2), the rest.

    Their Frechet distance is what a perfect generator would score with as many images as were generated.
    """
    order = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    size = max(2, min(n_generated, n_real // 2))
    return order[:size], order[size:]


# ----------------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint
# ----------------------------------------------------------------------------------------------------------------

def load_model(path: str, device: torch.device, weights: str = "ema") -> tuple[DDPM, dict]:
    """The checkpoint's DDPM (``weights``: 'ema' when kept, or 'raw') on the fast path of ``device``, and its
    training config."""
    return load_fast_sampler(path, device, weights=weights), load_checkpoint(path)["config"]


def evaluation_data_config(saved: dict, flags: dict) -> TrainConfig:
    """The checkpoint's data settings with the data flags given, keeping the whole test split.

    --data-root without --image-folder means the built-in dataset, even when the run trained on an image folder.
    """
    if "data_root" in flags and "image_folder" not in flags:
        flags = {**flags, "image_folder": None}
    known = {key: value for key, value in saved.items() if key in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{**known, **flags, "eval_images": ALL_TEST_IMAGES, "subset": None})


def generate(model: DDPM, config: dict, n_per_class: int, w: float, sampler: str, steps: int | None,
             batch: int, seed: int, clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_class images of every class with guidance w, in chunks of about ``batch`` images.

    Returns (images [n_per_class * K, C, H, W] clamped to [-1, 1] on the CPU, conditioned classes long [same N]),
    class-fastest within each chunk. The noise is fixed by ``seed``, the same for every w.
    """
    size = (config["in_channels"], config["image_size"], config["image_size"])
    per_chunk = max(1, batch // config["n_classes"])
    chunks = [min(per_chunk, n_per_class - start) for start in range(0, n_per_class, per_chunk)]
    torch.manual_seed(seed)
    images = []
    with tqdm(total=n_per_class * config["n_classes"], desc=f"w={w:g}", unit="image", leave=False) as bar:
        for n in chunks:
            y0, _ = model.sample(n, size, config["n_classes"], w, sampler=sampler, steps=steps,
                                 clip_denoised=clip_denoised)
            images.append(y0.clamp(-1, 1).float().cpu())
            bar.update(len(y0))
    labels = torch.cat([torch.arange(config["n_classes"]).repeat(n) for n in chunks])
    return torch.cat(images), labels


def real_row(features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, n_generated: int) -> dict:
    """The table's first row: the judge on the real test images, the noise floor of the Frechet distance."""
    part, rest = noise_floor_split(len(labels), n_generated)
    real_diversity = diversity(features, labels)
    return {"images": "real", "weights": "", "w": "", "sampler": "", "steps": "", "clip": "", "n": len(labels),
            "accuracy": class_accuracy(predicted, labels), "frechet": frechet_distance(features[part], features[rest]),
            "diversity": real_diversity, "real_diversity": real_diversity, "seconds": ""}


def generated_row(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                  real_diversity: float, weights: str, w: float, sampler: str, steps: int, clip_denoised: bool,
                  seconds: float) -> dict:
    """A row for generated images [N, C, H, W] conditioned on labels [N]."""
    features, predicted = classify(classifier, images)
    return {"images": "generated", "weights": weights, "w": w, "sampler": sampler, "steps": steps,
            "clip": "yes" if clip_denoised else "no", "n": len(labels),
            "accuracy": class_accuracy(predicted, labels), "frechet": frechet_distance(features, real_features),
            "diversity": diversity(features, labels), "real_diversity": real_diversity, "seconds": round(seconds, 1)}


def format_table(rows: list[dict]) -> str:
    """Rows as right-aligned text columns; metrics with 4 decimals, seconds with 1, w as short as it goes."""
    def text(field, value):
        return str(value) if value == "" or field not in TABLE_FORMATS else format(value, TABLE_FORMATS[field])
    cells = [list(CSV_FIELDS)] + [[text(field, row[field]) for field in CSV_FIELDS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CSV_FIELDS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    utils.write_rows_csv(rows, path, CSV_FIELDS)


def default_csv_path(checkpoint: str) -> str:
    stem, _ = os.path.splitext(checkpoint)
    return f"{stem}_eval.csv"


def evaluate_checkpoint(path: str, guidance: list[float], n_per_class: int, sampler: str = "ddpm",
                        steps: int | None = None, weights: str = "ema", clip_denoised: bool = False, seed: int = 0,
                        device: torch.device = torch.device("cpu"), flags: dict | None = None,
                        classifier_path: str | None = None, batch: int = 250) -> list[dict]:
    """The metric table of a checkpoint: a row for the real test images, then one per guidance weight.

    ``flags`` are data settings (TrainConfig fields) that replace the checkpoint's, e.g. another data root.
    """
    model, config = load_model(path, device, weights)
    timesteps, _ = model.sampling_plan(sampler, steps)  # refuses a bad sampler or step count before any work
    n_steps = len(timesteps) - 1
    classifier, classifier_path = judge_for(config, classifier_path)
    classifier.to(device)
    _, test_set = load_data(evaluation_data_config(config, flags or {}))
    if len(test_set) < 4:
        raise DataError(f"the test split has {len(test_set)} images; the metrics need at least 4")
    real_features, real_predicted = classify(classifier, to_model_scale(test_set.images))
    n_generated = n_per_class * config["n_classes"]
    rows = [real_row(real_features, real_predicted, test_set.labels, n_generated)]
    print(f"judging {path} ({weights} weights) with {classifier_path}: {len(test_set)} real test images, "
          f"{n_generated} generated per weight ({sampler}, {n_steps} steps, {device})")
    for w in guidance:
        started = time.perf_counter()
        images, labels = generate(model, config, n_per_class, w, sampler, steps, batch, seed, clip_denoised)
        seconds = time.perf_counter() - started
        rows.append(generated_row(classifier, images, labels, real_features, rows[0]["real_diversity"], weights, w,
                                  sampler, n_steps, clip_denoised, seconds))
        tqdm.write(f"w={w:g}: {seconds:.1f} s")
    return rows


def run_evaluation(args: argparse.Namespace) -> list[dict]:
    """--checkpoint: sample for every guidance weight, judge, print the table and write the CSV; returns the rows."""
    rows = evaluate_checkpoint(args.checkpoint, args.guidance, args.n_per_class, args.sampler, args.steps,
                               args.weights, args.clip_denoised, args.seed, resolve_device(args.device),
                               data_flags(args), args.classifier, args.batch or 250)
    csv_path = args.csv or default_csv_path(args.checkpoint)
    write_csv(rows, csv_path)
    print(format_table(rows))
    print(f"wrote {csv_path}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train-classifier", choices=sorted(DATASET_DEFAULTS), help="train the judge of a dataset")
    mode.add_argument("--checkpoint", help="training checkpoint (.pth) whose samples to judge")
    parser.add_argument("--classifier", help="classifier file to write or to judge with "
                                             "(default: classifiers/<dataset>.pt, dataset from the image channels)")
    parser.add_argument("--data-root", help="folder with the dataset in torchvision's layout")
    parser.add_argument("--image-folder",
                        help="class-per-subfolder training images; a 'test' sibling is the test split")
    parser.add_argument("--cache-dir", help="where decoded --image-folder tensors are cached ('' disables the cache; "
                                            "default: the training's)")
    parser.add_argument("--epochs", type=int, help="classifier training epochs (default: mnist 3, cifar10 4)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0], metavar="W",
                        help="guidance weights to judge (default: 0 1 3)")
    parser.add_argument("--n-per-class", type=int, default=50, help="generated images per class (default: 50)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="sampler (default: ddpm, all T steps)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: T)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema",
                        help="the checkpoint's EMA weights (when kept) or its raw trained weights (default: ema)")
    parser.add_argument("--clip-denoised", action="store_true",
                        help="clip the predicted y_0 to [-1, 1] at every sampling step (cosine-schedule models)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    parser.add_argument("--batch", type=int, help="images per sampling chunk (default 250) or training batch (128)")
    parser.add_argument("--csv", help="where to write the table (default: <checkpoint stem>_eval.csv)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse numbers no run can use (ValueError)."""
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    if args.n_per_class < 2:
        raise ValueError(f"--n-per-class must be at least 2 (diversity needs pairs), got {args.n_per_class}")
    if not all(math.isfinite(w) for w in args.guidance):
        raise ValueError(f"--guidance weights must be finite numbers, got {args.guidance}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen mode; errors are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    exit_on_error(run, args)


def run(args: argparse.Namespace) -> None:
    check_arguments(args)
    if args.train_classifier:
        run_train_classifier(args)
    else:
        run_evaluation(args)


if __name__ == "__main__":
    main()
