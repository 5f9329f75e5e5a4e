"""Few-step samplers on a trained DDPM's schedule: DDIM (Song et al. 2020) and DPM-Solver++(2M) (Lu et al. 2022).

Beyond the sheets: Algorithm 2 (``DDPM.sample``) takes all T steps; these take 10-50 of them. Both call the
DDPM's own guided noise (S1 eq. 5, ``DDPM.guided_noise``) once per visited timestep and read its schedule, so
guidance, mixtures, clipping and the fast path reach them exactly as they reach Algorithm 2.

With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) and the log signal-to-noise ratio lambda = log(alpha /
sigma), every step goes from a timestep t to an earlier t_prev of the visited subset (``sampling_timesteps``).
lambda is computed in float64 from ``DDPM.ddpm_schedule``'s float64 terms: from the float32 buffers,
1 - alpha_bar loses its digits near t = 1.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from ddpm import DDPM

SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # 'ddpm' is Algorithm 2 itself (DDPM.sample)
FEW_STEP_SAMPLERS = SAMPLERS[1:]
SPACINGS = ("logsnr", "time")           # how dpm++2m spreads its timesteps


def log_snr(ddpm: DDPM) -> torch.Tensor:
    """lambda_t = log(sqrt(alpha_bar_t)) - log(sqrt(1 - alpha_bar_t)) for t = 0..T, float64 [T + 1] on the CPU;
    +inf at t = 0."""
    terms = DDPM.ddpm_schedule(ddpm.beta1, ddpm.beta2, ddpm.n_timesteps, ddpm.schedule)
    return torch.log(terms["sqrt_alpha_bar_t"].double()) - torch.log(terms["sqrt_one_minus_alpha_bar_t"].double())


def sampling_timesteps(ddpm: DDPM, sampler: str, steps: int | None = None, spacing: str = "logsnr") -> list[int]:
    """Visited timesteps T = tau_S > ... > tau_1 > 0 (the trailing 0 is y_0): all of them for 'ddpm';
    ``steps`` of them for 'ddim' (evenly in t) and 'dpm++2m' (evenly in log-SNR lambda by default, or in t)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    n_timesteps = ddpm.n_timesteps
    if sampler == "ddpm":
        if steps not in (None, n_timesteps):
            raise ValueError(f"the DDPM sampler takes all T = {n_timesteps} steps, got steps={steps}; "
                             f"use sampler='ddim' or 'dpm++2m' for fewer")
        return list(range(n_timesteps, -1, -1))
    steps = n_timesteps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_timesteps:
        raise ValueError(f"steps must be an integer in 1..T = {n_timesteps}, got {steps!r}")
    if sampler == "dpm++2m" and spacing == "logsnr":
        return log_snr_timesteps(log_snr(ddpm), steps)
    return torch.linspace(n_timesteps, 0, steps + 1, dtype=torch.float64).round().long().tolist()


def log_snr_timesteps(lambdas: torch.Tensor, steps: int) -> list[int]:
    """``steps`` timesteps from T down to 1, evenly spaced in lambda_t (``lambdas`` [T + 1]) and rounded to the
    nearest trained t, then 0. Rounding can merge neighbours where lambda changes fast per step; each t is
    visited once."""
    n_timesteps = len(lambdas) - 1
    trained = lambdas[1:]
    targets = torch.linspace(trained[-1].item(), trained[0].item(), steps, dtype=torch.float64)
    nearest = (trained.view(1, -1) - targets.view(-1, 1)).abs().argmin(dim=1) + 1
    visited = sorted(set(nearest.tolist()) | {n_timesteps}, reverse=True)
    return visited + [0]


def predict_start_from_noise(ddpm: DDPM, y_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """y0^ = (y_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): S1 eq. 3 solved for y_0. [N, C, H, W]."""
    return (y_t - ddpm.sqrt_one_minus_alpha_bar_t[t] * noise) / ddpm.sqrt_alpha_bar_t[t]


def ddim_step(ddpm: DDPM, y_t: torch.Tensor, t: int, t_prev: int, predicted_noise: torch.Tensor,
              eta: float) -> torch.Tensor:
    """DDIM update (Song et al. 2020, eq. 12) from t to an earlier t_prev (0 allowed) of the strided subset.

    y0^ = (y_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
    y_prev = sqrt(alpha_bar_prev) y0^ + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
    With t_prev = t - 1 and eta = 1, sigma^2 is the posterior variance beta~_t (Ho et al. eq. 7).
    """
    alpha_bar, alpha_bar_prev = ddpm.alpha_bar_t[t], ddpm.alpha_bar_t[t_prev]
    predicted_y0 = predict_start_from_noise(ddpm, y_t, t, predicted_noise)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    direction = torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * predicted_noise
    y_prev = torch.sqrt(alpha_bar_prev) * predicted_y0 + direction
    if t_prev == 0 or eta == 0:
        return y_prev
    return y_prev + sigma * torch.randn_like(y_t)


def dpm_solver_step(ddpm: DDPM, lambdas: torch.Tensor, y_t: torch.Tensor, t: int, t_prev: int,
                    predicted_noise: torch.Tensor, previous: tuple[torch.Tensor, float] | None,
                    eta: float = 0.0) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a multistep second-order step on the data prediction.

    With h = lambda_prev - lambda_t (``lambdas`` from ``log_snr``) and the data prediction x0_t = y0^
    (``predict_start_from_noise``):
        y_prev = (sigma_prev / sigma_t) y_t - alpha_prev (exp(-h) - 1) D,
        D = x0_t (first order: the first step, and the last step to t = 0, where it returns x0_t), else
        D = (1 + 1 / (2r)) x0_t - 1 / (2r) x0_last, r = h_last / h  (h_last: the previous step's h).
    ``eta`` > 0 turns the ODE step into the SDE step of SDE-DPM-Solver++(2M) (Lu et al. 2022, appendix; eta = 1
    is diffusers' 'sde-dpmsolver++'), which adds fresh noise like the ancestral sampler; with g = eta h:
        y_prev = (sigma_prev / sigma_t) exp(-g) y_t + alpha_prev (1 - exp(-h - g)) D
                 + sigma_prev sqrt(1 - exp(-2 g)) z,   z ~ N(0, I).
    ``previous`` is (x0_last, lambda_last) of the previous step, or None. Returns (y_prev, (x0_t, lambda_t)).
    The first-order step with eta = 0 is the DDIM step with eta = 0.
    """
    predicted_y0 = predict_start_from_noise(ddpm, y_t, t, predicted_noise)
    lambda_t, lambda_prev = lambdas[t].item(), lambdas[t_prev].item()
    if t_prev == 0:
        return predicted_y0, (predicted_y0, lambda_t)
    h = lambda_prev - lambda_t
    data = predicted_y0
    if previous is not None:
        last_y0, lambda_last = previous
        half_over_r = 0.5 * h / (lambda_t - lambda_last)
        data = (1 + half_over_r) * predicted_y0 - half_over_r * last_y0
    sigma_prev = ddpm.sqrt_one_minus_alpha_bar_t[t_prev]
    g = eta * h
    y_prev = (sigma_prev / ddpm.sqrt_one_minus_alpha_bar_t[t] * math.exp(-g) * y_t
              - ddpm.sqrt_alpha_bar_t[t_prev] * math.expm1(-h - g) * data)
    if eta > 0:
        y_prev = y_prev + sigma_prev * math.sqrt(-math.expm1(-2 * g)) * torch.randn_like(y_t)
    return y_prev, (predicted_y0, lambda_t)


@torch.inference_mode()
def sample(ddpm: DDPM, conditions: torch.Tensor, w: float, size: Sequence[int], sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, spacing: str = "logsnr",
           keep: Iterable[int] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """Sample with DDIM or DPM-Solver++(2M): y_T ~ N(0, I), then one step per visited timestep, each with the
    DDPM's guided noise (eq. 5) at w.

    conditions: the class vectors ``ddpm.guided_noise`` takes ([N, n_classes]); size: (C, H, W); steps, eta,
    spacing as in ``sampling_timesteps`` and the step functions; keep: the states y_s to return, by s.
    Returns (y_0 [N, C, H, W] on the device, frames numpy [len(kept), N, C, H, W] in descending s).
    """
    if sampler not in FEW_STEP_SAMPLERS:
        raise ValueError(f"few-step sampler must be one of {FEW_STEP_SAMPLERS}, got {sampler!r}")
    timesteps = sampling_timesteps(ddpm, sampler, steps, spacing)
    lambdas = log_snr(ddpm) if sampler == "dpm++2m" else None
    keep, n = set(keep), conditions.shape[-2]
    y = torch.randn(n, *size, device=ddpm.device)            # y_T ~ N(0, I)
    frames = [y.float().cpu().numpy()] if ddpm.n_timesteps in keep else []
    previous = None
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        noise = ddpm.guided_noise(y, t, conditions, w)
        if sampler == "ddim":
            y = ddim_step(ddpm, y, t, t_prev, noise, eta)
        else:
            y, previous = dpm_solver_step(ddpm, lambdas, y, t, t_prev, noise, previous, eta)
        if t_prev in keep:
            frames.append(y.float().cpu().numpy())
    return y, np.stack(frames) if frames else np.zeros((0, n, *size), dtype=np.float32)
