"""The judge: a small CNN classifier per dataset, trained on the real images, whose predictions and penultimate
features score generated images (lab/metrics.py). Trained by ``python -m tools.evaluate train-classifier``, saved in
classifiers/<dataset>.pt."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lab.checkpoints import save_checkpoint
from lab.image_data import ImageSet, to_model_scale
from lab.speed import FastPath, autocast, network_to_channels_last, to_channels_last

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER_FOLDER = os.path.join(ROOT, "classifiers")
DATASET_BY_CHANNELS = {1: "mnist", 3: "cifar10"}
# widths[-1] is the feature dimension of the Frechet distance and the diversity. The CIFAR-10 judge has two
# convolutions per stage at twice the widths: the one-convolution (32, 64, 128) network of 4 epochs recognised
# only 70.9 % of the real test images, too weak to tell samplers apart (docs/results.md, "The judge").
ARCHITECTURES = {"mnist": dict(widths=(16, 32, 64), convs_per_stage=1),
                 "cifar10": dict(widths=(64, 128, 256), convs_per_stage=2)}
AUGMENTATION = {"mnist": dict(shift=2, flip=False), "cifar10": dict(shift=4, flip=True)}
EPOCHS = {"mnist": 3, "cifar10": 16}    # MNIST: minutes on 2 CPU cores; CIFAR-10: docs/results.md gives the time


class ClassifierError(ValueError):
    """A classifier file that is missing or does not fit the images; the message says how to get one."""


def describe(error: Exception) -> str:
    """'Type: first line of the message' (at most 200 characters of it), for one-line errors."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


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
        return "python -m tools.evaluate train-classifier mnist|cifar10"
    data = "--image-folder /path/to/data/cifar10-jpeg/train" if dataset == "cifar10" else "--data-root /path/to/data"
    return f"python -m tools.evaluate train-classifier {dataset} {data}"


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
        raise ClassifierError(f"{path} is not a classifier of tools/evaluate.py ({describe(error)}); "
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
                     device: torch.device | str = "cpu", path: FastPath = FastPath()) -> Classifier:
    """SGD with Nesterov momentum, a one-cycle learning rate and label smoothing on augmented images in [-1, 1].

    ``path`` sets the memory format and the precision of the forward pass (lab/speed.py: channels_last, bf16
    autocast where the machine computes bf16 natively); the weights and the optimizer stay fp32. Returns the
    classifier, on ``device``, in eval mode and in the default memory format.
    """
    device = torch.device(device)
    network_to_channels_last(classifier.to(device), path.train_channels_last)
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
            with autocast(device, path):
                logits = classifier(to_channels_last(images, path.train_channels_last))
            loss = F.cross_entropy(logits.float(), train_set.labels[batch].to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return classifier.to(memory_format=torch.contiguous_format).eval()


@torch.inference_mode()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and predicted classes in one pass: images [N, C, H, W] in [-1, 1] ->
    (features float64 [N, D] on the CPU, predicted long [N] on the CPU). ``classifier`` needs ``features`` and
    ``head``; it runs on its own device, in float32 (float64 only on the CPU: MPS has none)."""
    device = next(classifier.parameters()).device
    features, predicted = [], []
    for start in range(0, len(images), batch_size):
        batch_features = classifier.features(images[start:start + batch_size].to(device))
        features.append(batch_features.cpu().double())
        predicted.append(classifier.head(batch_features).argmax(dim=1).cpu())
    return torch.cat(features), torch.cat(predicted)
