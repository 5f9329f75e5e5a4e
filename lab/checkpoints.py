"""Training checkpoints: the format, atomic writing, and loading that refuses bad files with a reason.

A checkpoint is a dict saved by ``torch.save`` with these keys:

    model       state_dict of the U-Net (the raw, trained weights)
    ema         state_dict of the U-Net's exponential moving average, or None when the run keeps none
    optimizer   state_dict of the optimizer
    epoch       number of completed epochs (1-based epoch of the file name)
    step        steps done inside the next epoch (0 unless the run was interrupted mid-epoch)
    config      the training configuration as a dict (``training.TrainConfig``); MODEL_KEYS rebuild the model
    losses      list of per-epoch records (dicts: epoch, train_loss, ...) so far
    rng         random generator states, so that a resumed run continues the same random stream
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from networks.Conditional_UNet import UNet

REQUIRED_KEYS = ("model", "optimizer", "epoch", "config", "losses")
MODEL_KEYS = ("in_channels", "image_size", "n_features", "n_classes", "timesteps", "beta1", "beta2", "schedule",
              "drop_prob", "loss")


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why."""


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A process killed at any moment leaves either the complete old file, the complete new one, or none.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; raise ``CheckpointError`` naming the path and the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    missing_config = [key for key in MODEL_KEYS if key not in checkpoint["config"]]
    if missing_config:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing_config)}")
    return checkpoint


WEIGHTS = ("ema", "raw")  # which U-Net weights of a checkpoint to use: the moving average or the trained ones


def network_weights(checkpoint: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """The U-Net weights to sample with: for 'ema', the EMA weights when the run kept them, else the trained ones;
    for 'raw', always the trained ones (the optimizer's weights, as if the run had no EMA)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "raw":
        return checkpoint["model"]
    return checkpoint.get("ema") or checkpoint["model"]


def config_differences(saved: dict[str, Any], current: dict[str, Any], keys=MODEL_KEYS) -> list[str]:
    """Human-readable 'name: saved X, now Y' for every model setting that differs."""
    return [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
            for key in keys if saved.get(key) != current.get(key)]


def network_from_config(config: dict[str, Any]) -> UNet:
    """A new U-Net of the size a training config describes (in_channels, n_features, n_classes, image_size)."""
    return UNet(config["in_channels"], config["n_features"], config["n_classes"], config["image_size"])


def load_network(path: str, weights: str = "ema") -> tuple[UNet, dict[str, Any]]:
    """The U-Net of a training checkpoint with its weights ('ema' when kept, or 'raw'), and the run's config.

    Reads the file once; raises ``CheckpointError`` naming the path and the reason.
    """
    checkpoint = load_checkpoint(path)
    network = network_from_config(checkpoint["config"])
    try:
        network.load_state_dict(network_weights(checkpoint, weights))
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({str(error).splitlines()[0][:200]})") from None
    return network, checkpoint["config"]
