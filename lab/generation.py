"""Generating images from a trained model: the one loader and the one ``generate`` that every tool uses
(sample, evaluate, visualize, experiments and the training grids).

The sheet's sampler is Algorithm 2 itself, ``DDPM.sample``. ``SamplingDDPM`` is a DDPM with what goes beyond the
sheets: guidance towards a mixture of classes (composed guidance, lab.mixtures), clipping of the predicted y_0,
and the fast path's shared encoder; the few-step samplers (lab.few_step) run on the same guided noise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ddpm import DDPM, frame_timesteps
from lab import few_step
from lab.checkpoints import load_network
from lab.mixtures import composed_noise
from lab.speed import PLAIN_SAMPLE_CHUNK, FastInference, FastPath, path_for_run

DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20}   # steps of the few-step samplers when none are asked for


class SamplingDDPM(DDPM):
    """A DDPM for sampling with what goes beyond the sheets, each off by default:

    - ``proportions``: conditions [K, N, n_classes] hold K class vectors per image, and the guided noise is
      eq. 5 per class averaged with these K proportions (``composed_guidance``), from one network call on the K
      conditional copies and the unconditional one (``lab.mixtures.composed_noise``). With K = 1 (conditions
      [N, n_classes]) it is the sheet's ``DDPM.guided_noise``.
    - ``clip_denoised``: the guided noise is replaced by the one that explains y_t by the predicted y_0 clipped to
      [-1, 1] (``noise_for_clipped_start``); needed by the cosine schedule.
    - the fast path: a network that offers ``noise_of_copies(x, time, classes, copies)`` (``FastInference``: the
      U-Net's class-blind encoder then runs once for all copies of an image) is called through it.

    ``DDPM.sample`` and ``DDPM.p_sample`` (Algorithm 2) and lab.few_step's samplers all take their noise from
    ``guided_noise``, so each option reaches every sampler. ``with_options`` makes a copy that shares the
    network and the schedule.
    """
    proportions: tuple = (1.0,)
    clip_denoised: bool = False

    def with_options(self, proportions: Sequence[float] = (1.0,), clip_denoised: bool = False) -> "SamplingDDPM":
        other = copy.copy(self)
        other.proportions, other.clip_denoised = tuple(proportions), clip_denoised
        return other

    def noise_of_copies(self, y_t: torch.Tensor, t: int, classes: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.nn_model, "noise_of_copies"):
            return super().noise_of_copies(y_t, t, classes)
        copies = classes.shape[0] // y_t.shape[0]
        return self.nn_model.noise_of_copies(y_t, self.network_time(t, classes.shape[0]), classes, copies)

    def guided_noise(self, y_t: torch.Tensor, t: int, c: torch.Tensor, w: float) -> torch.Tensor:
        if c.dim() == 3 and c.shape[0] == 1 and self.proportions == (1.0,):
            c = c[0]                                       # one class vector per image: the sheet's eq. 5
        noise = composed_noise(self, y_t, t, c, w, self.proportions) if c.dim() == 3 \
            else super().guided_noise(y_t, t, c, w)
        return self.noise_for_clipped_start(y_t, t, noise) if self.clip_denoised else noise

    def noise_for_clipped_start(self, y_t: torch.Tensor, t: int, predicted_noise: torch.Tensor) -> torch.Tensor:
        """The noise that explains y_t by the predicted y_0 clipped to the data range [-1, 1].

        eps' = (y_t - sqrt(alpha_bar_t) clip(y0^, -1, 1)) / sqrt(1 - alpha_bar_t), y0^ from
        ``few_step.predict_start_from_noise``. Algorithm 2's step with eps' is the posterior mean of
        q(y_{t-1} | y_t, y_0) at the clipped y_0 (the 'clip_denoised' of Ho et al.'s and Nichol & Dhariwal's
        code); DDIM uses both. Without it, a schedule whose alpha_bar_T is nearly 0 (cosine: beta_T clipped at
        0.999, 1/sqrt(alpha_T) = 32) amplifies the network's error at the first steps until the samples leave the
        data range. y_t and predicted_noise [N, C, H, W]; returns [N, C, H, W].
        """
        start = few_step.predict_start_from_noise(self, y_t, t, predicted_noise).clamp(-1, 1)
        return (y_t - self.sqrt_alpha_bar_t[t] * start) / self.sqrt_one_minus_alpha_bar_t[t]


@dataclass
class SamplingModel:
    """A trained model ready to sample: its DDPM (around the network to call), the run's training config, and
    the images per sampling call that the machine runs fastest (``FastPath.sample_chunk``; x2 network batch with
    guidance)."""
    ddpm: SamplingDDPM
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
    def n_timesteps(self) -> int:
        return self.ddpm.n_timesteps

    @property
    def device(self) -> torch.device:
        return self.ddpm.device


def sampling_model(network: torch.nn.Module, config: dict, device: torch.device,
                   chunk_size: int = PLAIN_SAMPLE_CHUNK) -> SamplingModel:
    """A SamplingModel around ``network`` (already on ``device``) with the schedule of a training config."""
    return SamplingModel(SamplingDDPM.from_config(config, network, device), config, chunk_size)


def load_for_sampling(path: str, device: torch.device, weights: str = "ema", compile: bool | None = None,
                      sampled_image_steps: int | None = None, fast: bool = True) -> SamplingModel:
    """A checkpoint's network ('ema' weights when kept, or 'raw') on the default fast path of ``device`` for a
    run that samples ``sampled_image_steps`` (images x sampler steps; ``sampling_path``)."""
    network, config = load_network(path, weights)
    return fast_sampling_model(network.to(device), config, device,
                               sampling_path(device, config, fast, compile, sampled_image_steps))


def sampling_path(device: torch.device, config: dict, fast: bool = True, compile: bool | None = None,
                  sampled_image_steps: int | None = None) -> FastPath:
    """The path of a sampling run of ``sampled_image_steps`` with a model of this training config: the machine's
    fast path, compiled where --compile/--no-compile say or, with neither, where the run repays compiling; the
    plain path with --no-fast (``fast``), compiled only with --compile."""
    return path_for_run(device, config["in_channels"], fast, compile, "auto",
                        sampled_image_steps=sampled_image_steps)


def fast_sampling_model(network: torch.nn.Module, config: dict, device: torch.device, path: FastPath) -> SamplingModel:
    """A SamplingModel around ``network`` (on ``device``) run as ``path`` says (``FastInference``)."""
    return sampling_model(FastInference(network, path), config, device, path.sample_chunk)


def sampled_image_steps(sampler: str, steps: int | None, n_timesteps: int, n_images: int) -> int:
    """Images x network-calling steps of sampling ``n_images`` with a sampler (``sampler_steps``)."""
    return n_images * (sampler_steps(sampler, steps, n_timesteps) or n_timesteps)


def sampler_steps(sampler: str, steps: int | None, n_timesteps: int) -> int | None:
    """``steps`` as given; without, T for 'ddpm' and min(DEFAULT_STEPS, T) for the few-step samplers."""
    if steps is None and sampler in DEFAULT_STEPS:
        return min(DEFAULT_STEPS[sampler], n_timesteps)
    return steps


def animation_states(ddpm: DDPM, sampler: str, steps: int | None, spacing: str) -> list[int]:
    """The states y_s a GIF of the reverse process shows: for the DDPM sampler y after the steps t with
    t % 20 == 0, t == T or t < 8 (as ``DDPM.sample`` keeps them), for the few-step samplers y after every step."""
    if sampler == "ddpm":
        return [t - 1 for t in frame_timesteps(ddpm.n_timesteps)]
    steps = sampler_steps(sampler, steps, ddpm.n_timesteps)
    return few_step.sampling_timesteps(ddpm, sampler, steps, spacing)[1:]


def generate(model: SamplingModel, conditions: torch.Tensor, w: float, proportions: Sequence[float] = (1.0,),
             sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, clip_denoised: bool = False,
             spacing: str = "logsnr", seed: int = 0, chunk_size: int | None = None,
             keep: Iterable[int] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """Sample one image per class vector, ``chunk_size`` images per call (default: the model's), from noise fixed
    by ``seed``: Algorithm 2 (``DDPM.sample``) for 'ddpm', else lab.few_step.

    conditions [N, n_classes], or [K, N, n_classes] with K proportions (``SamplingDDPM``); w the guidance
    weight; steps (default: ``sampler_steps``), eta and spacing as in lab.few_step; keep: the states y_s to
    return as frames. The same seed, N and chunk size give the same noise, so images sampled with different
    conditions are directly comparable. Returns (y_0 [N, C, H, W] float on the CPU, frames numpy
    [len(keep), N, C, H, W]).
    """
    chunk_size = model.images_per_call(chunk_size)
    conditions = conditions.to(model.device)
    ddpm = model.ddpm.with_options(proportions, clip_denoised).eval()
    steps = sampler_steps(sampler, steps, ddpm.n_timesteps)
    few_step.sampling_timesteps(ddpm, sampler, steps, spacing)          # refuses bad settings before sampling
    torch.manual_seed(seed)
    images, frames = [], []
    for start in range(0, conditions.shape[-2], chunk_size):
        chunk = conditions[..., start:start + chunk_size, :]
        if sampler == "ddpm":
            y0, chunk_frames = ddpm.sample(size=model.image_shape, g_weight=w, conditions=chunk, keep=keep)
        else:
            y0, chunk_frames = few_step.sample(ddpm, chunk, w, model.image_shape, sampler, steps, eta, spacing, keep)
        images.append(y0.float().cpu())
        frames.append(chunk_frames)
    return torch.cat(images), np.concatenate(frames, axis=1)
