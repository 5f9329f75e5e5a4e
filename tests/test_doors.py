"""The sheets' methods are the program's doors: training and sampling really run DDPM.forward, p_losses,
q_sample, sample and p_sample. Each test replaces one method with one that raises, and shows that a tiny
``train_mnist.py`` run (with its grid) or ``tools/sample.py`` reaches it."""
from __future__ import annotations

import pytest
import torch

import training
from ddpm import DDPM
from lab.train_config import MNIST
from tools import sample


class Reached(Exception):
    """Raised by a replaced DDPM method: the program called it."""


def raising(name: str):
    def replacement(*args, **kwargs):
        raise Reached(name)
    return replacement


def tiny_run(image_folder: str, out, epochs: int = 1) -> None:
    """One epoch of 60 images (4 steps of 16), T = 5, a grid at w = 1 after it, no test loss."""
    training.train(training.resolve_config(MNIST, {
        "image_folder": image_folder, "cache_dir": "", "out": str(out), "epochs": epochs, "batch_size": 16,
        "n_features": 8, "timesteps": 5, "guidance": [1.0], "eval_every": 0, "device": "cpu"}))


@pytest.fixture(scope="module")
def checkpoint(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("doors")
    tiny_run(image_folder, out)
    return str(out / "model_ep1.pth")


@pytest.mark.parametrize("method", ["forward", "p_losses", "q_sample"])
def test_a_training_step_goes_through_algorithm_1(method, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(DDPM, method, raising(method))
    with pytest.raises(Reached, match=method):
        tiny_run(image_folder, tmp_path / "run")


@pytest.mark.parametrize("method", ["sample", "p_sample"])
def test_the_training_grid_goes_through_algorithm_2(method, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(DDPM, method, raising(method))
    with pytest.raises(Reached, match=method):
        tiny_run(image_folder, tmp_path / "run")
    assert not (tmp_path / "run" / "image_ep1_w1.0.png").exists()


@pytest.mark.parametrize("method", ["sample", "p_sample"])
def test_the_sampling_tool_goes_through_algorithm_2(method, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(DDPM, method, raising(method))
    with pytest.raises(Reached, match=method):
        sample.main(["--checkpoint", checkpoint, "--classes", "3", "--n", "1", "--device", "cpu",
                     "--out", str(tmp_path / "grid.png")])


def test_the_training_loss_is_the_ddpm_called_on_images_and_classes(image_folder, tmp_path, monkeypatch):
    """training_step's loss is ``ddpm(y0, c)``: DDPM.__call__ with images in [-1, 1] and one-hot classes."""
    seen = []
    original = DDPM.forward

    def recording(self, y, c):
        seen.append((y.min().item(), y.max().item(), c.sum(1).tolist()))
        return original(self, y, c)

    monkeypatch.setattr(DDPM, "forward", recording)
    tiny_run(image_folder, tmp_path / "run")
    assert len(seen) == 4                                       # ceil(60 / 16) steps
    assert all(-1 <= low and high <= 1 and set(sums) == {1.0} for low, high, sums in seen)
