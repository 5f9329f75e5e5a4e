"""Datasets decoded once into uint8 tensors: MNIST and CIFAR-10 through torchvision, any image folder, and the
datasets library's image datasets (sheet 2, 2.5: the Smithsonian butterflies).

Every loader returns an ``ImageSet``: images uint8 [N, C, H, W], labels long [N], class names. Training
then draws batches from these tensors directly (on the device when they fit), so no image is decoded twice.
Photographs of any size and shape (the butterflies: about 2000 x 1328 px) are made square (``make_square``: a
centred crop, or padding) and resized once, with antialiasing, to the run's image size (``square_image``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import datasets, transforms
from tqdm import tqdm

from lab.train_config import SQUARE_MODES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


BUILTIN = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}
NO_CLASSES = ["(no classes)"]       # the one class name of a dataset without labels (every label 0)
DATASETS_REQUIREMENTS = "requirements-butterflies.txt"   # installs the datasets library, on either stack


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


# ----------------------------------------------------------------------------------------------------------------
# Photographs without classes (sheet 2, 2.5): made square, resized once
# ----------------------------------------------------------------------------------------------------------------

def make_square(image, square: str):
    """A PIL image made square: ``'crop'`` keeps the centred square of its shorter side, ``'pad'`` centres the
    whole image on a black square of its longer side. A W x H image gives a side of min(W, H) or max(W, H);
    when the difference is odd, the extra pixel column or row is cut (or padded) on the right or bottom."""
    from PIL import Image
    if square not in SQUARE_MODES:
        raise ValueError(f"--square must be one of {SQUARE_MODES}, got {square!r}")
    width, height = image.size
    if square == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side))                         # black
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def square_image(image, channels: int, size: int, square: str) -> torch.Tensor:
    """A PIL image of any size as uint8 [channels, size, size]: converted to grey (1) or RGB (3), made square
    (``make_square``), then resized once with PIL's bicubic filter, which widens with the reduction factor
    (antialiasing: a 1328 px square shrunk to 64 px averages the ~21 x 21 pixels behind each output pixel
    instead of skipping most of them)."""
    from PIL import Image
    image = make_square(image.convert("L" if channels == 1 else "RGB"), square)
    image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def square_images(pictures, channels: int, size: int, square: str, count: int, what: str) -> ImageSet:
    """``count`` PIL images (an iterable) as an ImageSet without classes, each through ``square_image``."""
    images = torch.empty(count, channels, size, size, dtype=torch.uint8)
    for index, picture in enumerate(tqdm(pictures, total=count, desc=f"decoding {what}", unit="image",
                                         leave=False, mininterval=2.0)):
        images[index] = square_image(picture, channels, size, square)
    return ImageSet(images, torch.zeros(count, dtype=torch.long), list(NO_CLASSES))


def cached(cache_path: str | None, decode) -> ImageSet:
    """The ImageSet ``decode()`` makes, read from ``cache_path`` when an earlier run saved it there (written
    atomically, as the checkpoints are); without a cache path, decoded every time."""
    if cache_path and os.path.isfile(cache_path):
        saved = torch.load(cache_path, weights_only=True)
        return ImageSet(saved["images"], saved["labels"], saved["classes"])
    image_set = decode()
    if cache_path:
        from lab.checkpoints import save_checkpoint
        save_checkpoint({"images": image_set.images, "labels": image_set.labels, "classes": image_set.classes},
                        cache_path)
    return image_set


def load_unlabelled_folder(folder: str, channels: int, size: int, square: str,
                           cache_dir: str | None = None) -> ImageSet:
    """Every image under ``folder`` (subfolders included, in sorted path order) as one class, made square and
    resized (``square_image``); cached like ``load_image_folder``."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder {os.path.abspath(folder)} does not exist (set --image-folder)")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if _is_image(name))
    if not paths:
        raise DataError(f"image folder {os.path.abspath(folder)} holds no images "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    cache_path = _cache_path(folder, channels, size, cache_dir, f"square={square}")

    def decode() -> ImageSet:
        return square_images((_open_image(path, "RGB") for path in paths), channels, size, square, len(paths),
                             folder)
    return cached(cache_path, decode)


# ----------------------------------------------------------------------------------------------------------------
# The datasets library (sheet 2, 2.5): load_dataset(NAME, cache_dir=..., split="train"), or a saved dataset
# ----------------------------------------------------------------------------------------------------------------

def datasets_library():
    """The datasets library, or a DataError that says what to install."""
    try:
        import datasets as library
    except ImportError:
        raise DataError(f"this needs the datasets library: pip install -r {DATASETS_REQUIREMENTS}") from None
    return library


def open_dataset(name: str, cache_dir: str | None):
    """The training split of the datasets library's dataset ``name``: a folder written by ``save_to_disk``
    (``load_from_disk``), or else the sheet's call, ``load_dataset(name, cache_dir=cache_dir, split="train")``,
    which downloads from the Hugging Face hub into ``cache_dir`` (None: the library's own cache)."""
    library = datasets_library()
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, marker))
                                   for marker in ("state.json", "dataset_dict.json")):
        dataset = library.load_from_disk(name)
    else:
        try:
            with quiet_hub_retries():
                dataset = library.load_dataset(name, cache_dir=cache_dir, split="train")
        except Exception as error:   # offline, unknown name, a half-downloaded cache: the library raises many kinds
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise DataError(f"the datasets library could not load {name!r} ({type(error).__name__}: {reason}); "
                            f"without the hub, give --hf-dataset a folder written by Dataset.save_to_disk, or "
                            f"--image-folder a folder of images") from None
    if isinstance(dataset, library.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{name} has no 'train' split (it has {', '.join(dataset)})")
        dataset = dataset["train"]
    return dataset


@contextlib.contextmanager
def quiet_hub_retries():
    """Keeps huggingface_hub's warnings (one per retry of an unreachable hub) off the terminal, so that a failed
    download ends in ``open_dataset``'s one line; its errors still show."""
    hub_logger = logging.getLogger("huggingface_hub")
    previous = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(previous)


def image_column(dataset, name: str) -> str:
    """The first column of ``dataset`` that holds images (the butterflies: 'image')."""
    library = datasets_library()
    for column, feature in dataset.features.items():
        if isinstance(feature, library.Image):
            return column
    raise DataError(f"{name} has no image column (its columns: {', '.join(dataset.column_names)})")


def load_hf_dataset(name: str, channels: int, size: int, square: str, cache_dir: str | None = None) -> ImageSet:
    """The images of the datasets library's dataset ``name`` (``open_dataset``), one class, made square and
    resized (``square_image``). The decoded tensors are cached in ``cache_dir`` under the dataset's fingerprint
    (the library's hash of its content and history) and the decoding settings."""
    dataset = open_dataset(name, cache_dir)
    column = image_column(dataset, name)
    fingerprint = getattr(dataset, "_fingerprint", None)
    cache_path = None
    if cache_dir and fingerprint:
        key = hashlib.sha1(f"{fingerprint}|{len(dataset)}|{column}|{channels}|{size}|{square}".encode())
        cache_path = os.path.join(cache_dir, f"datasets_{key.hexdigest()[:16]}.pt")

    def decode() -> ImageSet:
        pictures = (row[column] for row in dataset.select_columns([column]))
        return square_images(pictures, channels, size, square, len(dataset), name)
    return cached(cache_path, decode)


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


def _cache_path(folder: str, channels: int, size: int, cache_dir: str | None, settings: str = "") -> str | None:
    """A cache file keyed by the folder's absolute path, its file list and sizes, and the decoding settings
    (channels, size and any other ``settings``)."""
    if not cache_dir:
        return None
    digest = hashlib.sha1(f"{os.path.abspath(folder)}|{channels}|{size}{settings and '|' + settings}".encode())
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


def held_out_split(image_set: ImageSet, eval_images: int) -> tuple[ImageSet, ImageSet]:
    """(train, test): a fixed random slice of min(eval_images, N // 10) images held out as the test split, the
    rest (in their order) for training."""
    order = torch.randperm(len(image_set), generator=torch.Generator().manual_seed(1234))
    held_out = min(eval_images, len(image_set) // 10)
    return image_set.select(order[held_out:].sort().values), image_set.select(order[:held_out])


def load_data(config) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets of a run (``train_config.TrainConfig``) as uint8 tensors.

    The data: the built-in dataset under --data-root, --image-folder, or for the butterflies the datasets
    library's --hf-dataset. The test split is the dataset's own, the 'test' sibling of --image-folder, or else a
    fixed held-out slice of the training images (then left out of training). The test set keeps
    config.eval_images images.
    """
    cache = os.path.expanduser(config.cache_dir) if config.cache_dir else None
    if config.dataset == "butterflies":
        shape = (config.in_channels, config.image_size, config.square)
        if config.image_folder:
            train_set = load_unlabelled_folder(config.image_folder, *shape, cache)
            test_folder = test_folder_for(config.image_folder)
            test_set = load_unlabelled_folder(test_folder, *shape, cache) if test_folder else None
        else:
            train_set, test_set = load_hf_dataset(config.hf_dataset, *shape, cache), None
        if test_set is None:
            train_set, test_set = held_out_split(train_set, config.eval_images)
    elif config.image_folder:
        train_set = load_image_folder(config.image_folder, config.in_channels, config.image_size, cache)
        test_folder = test_folder_for(config.image_folder)
        if test_folder:
            test_set = load_image_folder(test_folder, config.in_channels, config.image_size, cache)
        else:
            train_set, test_set = held_out_split(train_set, config.eval_images)
    else:
        train_set = load_builtin(config.dataset, config.data_root, train=True)
        test_set = load_builtin(config.dataset, config.data_root, train=False)
    expected = (config.in_channels, config.image_size, config.image_size)
    if tuple(train_set.images.shape[1:]) != expected:
        raise DataError(f"images have shape {list(train_set.images.shape[1:])}, expected {list(expected)}")
    if len(train_set.classes) != config.n_classes:
        raise DataError(f"found {len(train_set.classes)} classes, the model is built for {config.n_classes}")
    return train_set.first(config.subset), test_set.first(config.eval_images)
