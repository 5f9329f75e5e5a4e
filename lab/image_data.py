"""Datasets decoded once into uint8 tensors: MNIST and CIFAR-10 through torchvision, or any image folder.

Every loader returns an ``ImageSet``: images uint8 [N, C, H, W], labels long [N], class names. Training
then draws batches from these tensors directly (on the device when they fit), so no image is decoded twice.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import datasets, transforms

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


BUILTIN = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}


class DataError(ValueError):
    """A dataset that cannot be found or read; the message names the path and the flag to fix it."""


@dataclass
class ImageSet:
    images: torch.Tensor       # uint8 [N, C, H, W]
    labels: torch.Tensor       # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def first(self, n: int | None) -> "ImageSet":
        """The first n images (all when n is None)."""
        if n is None:
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.classes)

    def select(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.classes)


def load_builtin(name: str, root: str, train: bool) -> ImageSet:
    """MNIST ('mnist') or CIFAR-10 ('cifar10') in torchvision's layout under ``root``; downloads only when missing."""
    dataset_class = BUILTIN[name]
    try:
        dataset = dataset_class(root, train=train, download=False)
    except RuntimeError:
        try:
            dataset = dataset_class(root, train=train, download=True)
        except Exception as error:
            raise DataError(f"{name} not found in {os.path.abspath(root)} and the download failed "
                            f"({type(error).__name__}); point --data-root at a folder holding it, "
                            f"or --image-folder at class subfolders of images") from None
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # [N, C, H, W]
    return ImageSet(images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes))


def load_image_folder(folder: str, channels: int, size: int, cache_dir: str | None = None) -> ImageSet:
    """A class-per-subfolder image set (torchvision ImageFolder, classes in sorted folder order), decoded once.

    Images are converted to ``channels`` (1: grey, 3: RGB), resized to size x size, and listed in a fixed
    shuffled order, so that the first N images (--subset N) hold every class. When ``cache_dir`` is given,
    the decoded tensors are kept there (never inside the data folder, which may be read-only).
    """
    if not os.path.isdir(folder):
        raise DataError(f"image folder {os.path.abspath(folder)} does not exist (set --image-folder)")
    subfolders = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not subfolders:
        raise DataError(f"image folder {os.path.abspath(folder)} has no class subfolders "
                        f"(expected {folder}/<class>/<image>)")
    cache_path = _cache_path(folder, channels, size, cache_dir)
    if cache_path and os.path.isfile(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        return _interleaved(ImageSet(cached["images"], cached["labels"], cached["classes"]))
    mode = "L" if channels == 1 else "RGB"
    to_tensor = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    try:
        dataset = datasets.ImageFolder(folder, loader=lambda path: _open_image(path, mode),
                                       transform=to_tensor, is_valid_file=_is_image)
    except FileNotFoundError:
        raise DataError(f"image folder {os.path.abspath(folder)} holds no images in its class subfolders "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)})") from None
    images = torch.stack([image for image, _ in dataset])
    image_set = ImageSet(images, torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes))
    if cache_path:
        from lab.checkpoints import save_checkpoint  # the same atomic write as the checkpoints
        save_checkpoint({"images": image_set.images, "labels": image_set.labels, "classes": image_set.classes},
                        cache_path)
    return _interleaved(image_set)


def _interleaved(image_set: ImageSet) -> ImageSet:
    """The images in a fixed shuffled order: ImageFolder lists them class by class, and --subset N takes the
    first N, which then would all be of the first class."""
    return image_set.select(torch.randperm(len(image_set), generator=torch.Generator().manual_seed(0)))


def _open_image(path: str, mode: str):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert(mode)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _cache_path(folder: str, channels: int, size: int, cache_dir: str | None) -> str | None:
    """A cache file keyed by the folder's absolute path, its file list and sizes, and the decoding settings."""
    if not cache_dir:
        return None
    digest = hashlib.sha1(f"{os.path.abspath(folder)}|{channels}|{size}".encode())
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{path}|{os.path.getsize(path)}|{os.path.getmtime(path)}".encode())
    return os.path.join(cache_dir, f"imagefolder_{digest.hexdigest()[:16]}.pt")


def test_folder_for(image_folder: str) -> str | None:
    """The held-out ``test/`` sibling of an image folder (e.g. .../train -> .../test), when it exists."""
    sibling = os.path.join(os.path.dirname(os.path.abspath(image_folder)), "test")
    if os.path.abspath(image_folder) != sibling and os.path.isdir(sibling):
        return sibling
    return None


def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in 0..255 -> float [N, C, H, W] in [-1, 1], the scale the model trains on."""
    return images.float() / 127.5 - 1


def load_data(config) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets of a run (``train_config.TrainConfig``) as uint8 tensors.

    The test split is the dataset's own, the 'test' sibling of --image-folder, or else a fixed held-out slice
    of the training images (then left out of training). The test set keeps config.eval_images images.
    """
    if config.image_folder:
        cache = os.path.expanduser(config.cache_dir) if config.cache_dir else None
        train_set = load_image_folder(config.image_folder, config.in_channels, config.image_size, cache)
        test_folder = test_folder_for(config.image_folder)
        if test_folder:
            test_set = load_image_folder(test_folder, config.in_channels, config.image_size, cache)
        else:
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1234))
            held_out = min(config.eval_images, len(train_set) // 10)
            test_set, train_set = train_set.select(order[:held_out]), train_set.select(order[held_out:].sort().values)
    else:
        train_set = load_builtin(config.dataset, config.data_root, train=True)
        test_set = load_builtin(config.dataset, config.data_root, train=False)
    expected = (config.in_channels, config.image_size, config.image_size)
    if tuple(train_set.images.shape[1:]) != expected:
        raise DataError(f"images have shape {list(train_set.images.shape[1:])}, expected {list(expected)}")
    if len(train_set.classes) != config.n_classes:
        raise DataError(f"found {len(train_set.classes)} classes, the model is built for {config.n_classes}")
    return train_set.first(config.subset), test_set.first(config.eval_images)
