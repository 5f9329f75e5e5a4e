"""Generating images from a trained model: the one loader and the one ``generate`` that every tool uses
(sample.py, evaluate.py, visualize.py, experiments.py and the training grids)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ddpm import GaussianDiffusion, frame_timesteps, load_network
from speed import PLAIN_SAMPLE_CHUNK, FastInference, FastPath

DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20}   # steps of the few-step samplers when none are asked for


@dataclass
class SamplingModel:
    """A trained model ready to sample: its diffusion, the network to call, the run's training config, and the
    images per sampling call that the machine runs fastest (``FastPath.sample_chunk``; x2 network batch with
    guidance)."""
    diffusion: GaussianDiffusion
    network: nn.Module
    config: dict
    chunk_size: int = PLAIN_SAMPLE_CHUNK

    def images_per_call(self, chunk_size: int | None = None) -> int:
        """``chunk_size`` when given, else the model's own; refuses a size below 1."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return chunk_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self.config["in_channels"], self.config["image_size"], self.config["image_size"]

    @property
    def n_classes(self) -> int:
        return self.config["n_classes"]

    @property
    def device(self) -> torch.device:
        return self.diffusion.device


def load_for_sampling(path: str, device: torch.device, weights: str = "ema",
                      compile_sampler: bool = False) -> SamplingModel:
    """A checkpoint's network ('ema' weights when kept, or 'raw') on the default fast path of ``device``."""
    network, config = load_network(path, weights)
    path_choices = FastPath.for_machine(device, config["in_channels"], compile_sampler)
    return SamplingModel(GaussianDiffusion.from_config(config).to(device),
                         FastInference(network.to(device), path_choices), config, path_choices.sample_chunk)


def sampler_steps(sampler: str, steps: int | None, n_timesteps: int) -> int | None:
    """``steps`` as given; without, T for 'ddpm' and min(DEFAULT_STEPS, T) for the few-step samplers."""
    if steps is None and sampler in DEFAULT_STEPS:
        return min(DEFAULT_STEPS[sampler], n_timesteps)
    return steps


def animation_states(diffusion: GaussianDiffusion, sampler: str, steps: int | None, spacing: str) -> list[int]:
    """The states y_s a GIF of the reverse process shows: for the DDPM sampler y after the steps t with
    t % 20 == 0, t == T or t < 8 (as ``DDPM.sample`` keeps them), for the few-step samplers y after every step."""
    if sampler == "ddpm":
        return [t - 1 for t in frame_timesteps(diffusion.n_timesteps)]
    steps = sampler_steps(sampler, steps, diffusion.n_timesteps)
    return diffusion.sampling_timesteps(sampler, steps, spacing)[1:]


def generate(model: SamplingModel, conditions: torch.Tensor, w: float, proportions: Sequence[float] = (1.0,),
             sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, clip_denoised: bool = False,
             spacing: str = "logsnr", seed: int = 0, chunk_size: int | None = None,
             keep: Iterable[int] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """Sample one image per class vector, ``chunk_size`` images per call (default: the model's), from noise fixed
    by ``seed``.

    conditions [N, n_classes] or [K, N, n_classes] (``GaussianDiffusion.guided_noise``); w, proportions,
    sampler, steps (default: ``sampler_steps``), eta, clip_denoised, spacing and keep as in
    ``GaussianDiffusion.sample``. The same seed, N and chunk size give the same noise, so images sampled with
    different conditions are directly comparable. Returns (y_0 [N, C, H, W] float on the CPU, frames numpy
    [len(keep), N, C, H, W]).
    """
    chunk_size = model.images_per_call(chunk_size)
    conditions = (conditions.unsqueeze(0) if conditions.dim() == 2 else conditions).to(model.device)
    steps = sampler_steps(sampler, steps, model.diffusion.n_timesteps)
    torch.manual_seed(seed)
    images, frames = [], []
    for start in range(0, conditions.shape[1], chunk_size):
        y0, chunk_frames = model.diffusion.sample(
            model.network, conditions[:, start:start + chunk_size], w, model.image_shape, proportions, sampler,
            steps, eta, clip_denoised, spacing, keep)
        images.append(y0.float().cpu())
        frames.append(chunk_frames)
    return torch.cat(images), np.concatenate(frames, axis=1)
