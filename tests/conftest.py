"""Shared test helpers: make the project importable, keep torch on few threads, tiny stub networks.

Also the grading options (tests/grading/plugin.py): the ``task`` marker, ``--task TASK_ID`` and ``--grade-json``;
and the ``gpu`` marker of the GPU tier.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.grading import plugin as grading  # noqa: E402 (needs the project on sys.path)

# The tests use tiny tensors: one thread is fastest for them, and immune to a busy machine's other processes.
torch.set_num_threads(1)


class StubNetwork(nn.Module):
    """eps(y, t, c) = 0.5 y + t + c . k, with k = 1..n_classes: conditional and unconditional outputs differ.

    Records the batch size of every call in ``calls`` and the class vectors it saw in ``seen_classes``.
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.n_classes = n_classes
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls: list[int] = []
        self.seen_classes: list[torch.Tensor] = []

    def forward(self, y, t, c):
        self.calls.append(y.shape[0])
        self.seen_classes.append(c.detach().clone())
        class_term = c @ torch.arange(1, self.n_classes + 1, dtype=c.dtype, device=c.device)
        return self.scale * y + t.view(-1, 1, 1, 1) + class_term.view(-1, 1, 1, 1)

    def expected(self, y, t_fraction, c):
        class_term = c @ torch.arange(1, self.n_classes + 1, dtype=c.dtype)
        return 0.5 * y + t_fraction + class_term.view(-1, 1, 1, 1)


@pytest.fixture
def stub():
    return StubNetwork()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """10 class folders of 6 random 20x20 grey PNGs (resized to 28x28 on loading)."""
    root = tmp_path_factory.mktemp("digits") / "train"
    generator = torch.Generator().manual_seed(0)
    for label in range(10):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(6):
            pixels = (torch.rand(20, 20, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return str(root)


def pytest_addoption(parser):
    """--task TASK_ID and --grade-json PATH (tests/grading/plugin.py)."""
    grading.add_options(parser)


def pytest_configure(config):
    """Registers the ``task`` marker of graded tests, and the grading plugin when asked for; registers the ``gpu``
    marker of the GPU tier (``pytest -m gpu``), whose tests are skipped, with the reason, without a CUDA device."""
    grading.configure(config)
    config.addinivalue_line("markers", "gpu: needs a CUDA device; the GPU tier, run with pytest -m gpu, skipped "
                                       "with the reason where there is none")
    if "gpu" in (config.option.markexpr or "") and "s" not in config.option.reportchars:
        config.option.reportchars += "s"          # pytest -m gpu says why its tests were skipped

