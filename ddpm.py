"""Denoising diffusion probabilistic model (Ho et al. 2020) with classifier-free guidance (Ho & Salimans 2022).

Equation numbers cite the two exercise sheets: "S1 eq. k" is the MNIST/CIFAR-10 sheet (U-Net, DDPM class,
Algorithms 1 and 2), "S2 eq. k" the sheet with q_sample / p_sample / p_losses and the beta schedules.

Timestep convention: t runs over 1..T. Every schedule tensor has length T + 1 and is indexed by t; entry 0 is
the noise-free state (beta_0 = 0, alpha_bar_0 = 1) and holds finite numbers only.

Two classes:
    GaussianDiffusion  the schedule and the equations. It holds no network: every method that needs the noise
                       predictor eps_theta(y_t, t / T, c) takes it as its first argument, so a compiled, DDP-wrapped,
                       EMA or fast-path copy of the U-Net is just another network passed in.
    DDPM               the sheet's class: a thin nn.Module that owns the U-Net (``nn_model``) and a GaussianDiffusion,
                       with the sheet's signatures (forward = Algorithm 1, sample = Algorithm 2).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoints import CheckpointError, load_checkpoint, network_weights
from networks.Conditional_UNet import UNet

SCHEDULES = ("linear", "cosine", "sigmoid")
LOSS_TYPES = ("l2", "l1")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("logsnr", "time")          # how the few-step samplers spread their timesteps
BETA1, BETA2, N_TIMESTEPS = 1e-4, 0.02, 400          # the sheet's schedule: the one owner of these defaults
SCHEDULE_TERMS = ("sqrt_beta_t", "alpha_t", "alpha_bar_t", "one_over_sqrt_alpha_t", "sqrt_alpha_bar_t",
                  "sqrt_one_minus_alpha_bar_t", "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t")


# ----------------------------------------------------------------------------------------------------------------
# Beta schedules: each returns the float64 tensor [beta_1, ..., beta_T] of length T.
# ----------------------------------------------------------------------------------------------------------------

def linear_beta_schedule(beta1: float, beta2: float, n_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule: beta_1 = beta1, ..., beta_T = beta2, evenly spaced. Shape [T]."""
    return torch.linspace(beta1, beta2, n_timesteps, dtype=torch.float64)


def cosine_beta_schedule(n_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped to at most ``max_beta`` so that the last steps
    near t = T do not become singular. The schedule has no beta range: beta1/beta2 do not enter it. Shape [T].
    """
    # BEGIN SOLUTION sheet2-cosine-schedule cosine_beta_schedule
    steps = torch.arange(n_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / n_timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)
    # END SOLUTION


def sigmoid_beta_schedule(beta_start: float, beta_end: float, n_timesteps: int, s_limit: float = 6.0) -> torch.Tensor:
    """S2 eq. 10: beta_t = beta_start + sigmoid(-s_limit + 2 t s_limit / T) * (beta_end - beta_start), t = 1..T.

    The sigmoid shapes beta itself, as the sheet defines it (some libraries apply it to alpha_bar instead).
    ``s_limit`` picks the range [-s_limit, s_limit] of the sigmoid that is used; with 6 the schedule starts
    within 0.3 % of the range above beta_start and ends within 0.3 % below beta_end. Shape [T].
    """
    # BEGIN SOLUTION sheet2-sigmoid-schedule sigmoid_beta_schedule
    t = torch.arange(1, n_timesteps + 1, dtype=torch.float64)
    return beta_start + torch.sigmoid(-s_limit + 2 * t * s_limit / n_timesteps) * (beta_end - beta_start)
    # END SOLUTION


def make_betas(schedule: str, beta1: float, beta2: float, n_timesteps: int) -> torch.Tensor:
    """The betas [beta_1..beta_T] of the named schedule (the cosine schedule ignores beta1 and beta2)."""
    if schedule == "linear":
        return linear_beta_schedule(beta1, beta2, n_timesteps)
    if schedule == "cosine":
        return cosine_beta_schedule(n_timesteps)
    if schedule == "sigmoid":
        return sigmoid_beta_schedule(beta1, beta2, n_timesteps)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def ddpm_schedule(beta1: float, beta2: float, n_timesteps: int, schedule: str = "linear") -> dict[str, torch.Tensor]:
    """Pre-computed terms of S1 eqs. 3-5 (S2 eqs. 4 and 8), each a float32 tensor [T + 1] indexed by t.

    Entry 0 is the noise-free state: beta_0 = 0, alpha_0 = alpha_bar_0 = 1, and the coefficient of eps in
    eq. 4, (1 - alpha_0) / sqrt(1 - alpha_bar_0) = 0/0, is defined as 0.
    """
    _check_schedule_arguments(beta1, beta2, n_timesteps, schedule)
    betas = make_betas(schedule, beta1, beta2, n_timesteps)
    # BEGIN SOLUTION sheet1-schedule ddpm_schedule
    beta_t = torch.cat((torch.zeros(1, dtype=torch.float64), betas))
    alpha_t = 1 - beta_t                                   # alpha_t := 1 - beta_t
    alpha_bar_t = torch.cumprod(alpha_t, dim=0)            # alpha_bar_t := prod_{s<=t} alpha_s
    sqrt_one_minus_alpha_bar_t = torch.sqrt(1 - alpha_bar_t)
    eps_coefficient = torch.zeros_like(beta_t)             # (1 - alpha_t) / sqrt(1 - alpha_bar_t), eq. 4
    eps_coefficient[1:] = (1 - alpha_t[1:]) / sqrt_one_minus_alpha_bar_t[1:]
    terms = {
        "sqrt_beta_t": torch.sqrt(beta_t),
        "alpha_t": alpha_t,
        "alpha_bar_t": alpha_bar_t,
        "one_over_sqrt_alpha_t": 1 / torch.sqrt(alpha_t),
        "sqrt_alpha_bar_t": torch.sqrt(alpha_bar_t),
        "sqrt_one_minus_alpha_bar_t": sqrt_one_minus_alpha_bar_t,
        "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t": eps_coefficient,
    }
    # END SOLUTION
    return {name: value.float() for name, value in terms.items()}


def _check_schedule_arguments(beta1: float, beta2: float, n_timesteps: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(n_timesteps, bool) or not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise ValueError(f"n_timesteps must be an integer >= 1, got {n_timesteps!r}")
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"beta1 and beta2 must lie in (0, 1), got beta1={beta1}, beta2={beta2}")
    if not beta1 < beta2:
        raise ValueError(f"beta1 must be smaller than beta2 (an increasing schedule), got beta1={beta1}, beta2={beta2}")


def extract(schedule_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gather one schedule entry per image: values [T + 1], t [N] (long) -> [N, 1, 1, 1], to broadcast on images."""
    return schedule_values[t].view(-1, 1, 1, 1)


def frame_timesteps(n_timesteps: int) -> list[int]:
    """The steps t (descending) after which ``DDPM.sample`` keeps a frame: t % 20 == 0, t == T, or t < 8."""
    return [t for t in range(n_timesteps, 0, -1) if t % 20 == 0 or t == n_timesteps or t < 8]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def class_grid_labels(classes: Sequence[int], n_per_class: int) -> torch.Tensor:
    """The labels of n_per_class images of each class, ordered class-fastest ([0, 1, ..., 9, 0, 1, ...] for
    classes 0..9): long [n_per_class * len(classes)]. Every grid and table of the project uses this order."""
    return torch.tensor(list(classes), dtype=torch.long).repeat(n_per_class)


# ----------------------------------------------------------------------------------------------------------------
# Guidance: S1 eq. 5, and composed guidance built on it
# ----------------------------------------------------------------------------------------------------------------

def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor | float,
                             w: float) -> torch.Tensor:
    """S1 eq. 5 (S2 eq. 11): eps~ = (1 + w) eps(y_t, t, c) - w eps(y_t, t, 0). Tensors [N, C, H, W].

    ``unconditional`` may be the number 0 when w = 0 (its term vanishes and its network call is skipped).
    """
    # BEGIN SOLUTION sheet2-guidance classifier_free_guidance
    return (1 + w) * conditional - w * unconditional
    # END SOLUTION


def composed_guidance(conditionals: torch.Tensor, unconditional: torch.Tensor | float, w: float,
                      proportions: Sequence[float]) -> torch.Tensor:
    """Guidance towards a mixture sum_k p_k c_k: eq. 5 per class, averaged with the proportions p_k (sum 1).

    sum_k p_k ((1 + w) eps(c_k) - w eps(0)) = eps(0) + (1 + w) sum_k p_k (eps(c_k) - eps(0)), the composed
    guidance of Liu et al. (2022). conditionals [K, N, C, H, W]; returns [N, C, H, W]. K = 1, p = (1,) is eq. 5.
    """
    return sum(p * classifier_free_guidance(conditional, unconditional, w)
               for p, conditional in zip(proportions, conditionals))


# ----------------------------------------------------------------------------------------------------------------
# The diffusion: schedule and equations, no network
# ----------------------------------------------------------------------------------------------------------------

class GaussianDiffusion(nn.Module):
    """The forward process, the training loss and the samplers of a DDPM for one beta schedule.

    The schedule terms of ``ddpm_schedule`` are buffers (derived from the arguments, so not saved in a
    state_dict). Methods that evaluate eps_theta take the network first: ``network(y_t [N, C, H, W],
    t / T [N, 1, 1, 1], c [N, n_classes]) -> eps [N, C, H, W]``; nothing else is required of it.
    """

    def __init__(self, beta1: float = BETA1, beta2: float = BETA2, n_timesteps: int = N_TIMESTEPS,
                 schedule: str = "linear"):
        super().__init__()
        self.beta1, self.beta2, self.n_timesteps, self.schedule = beta1, beta2, n_timesteps, schedule
        for name, values in ddpm_schedule(beta1, beta2, n_timesteps, schedule).items():
            self.register_buffer(name, values, persistent=False)

    @classmethod
    def from_config(cls, config: dict) -> "GaussianDiffusion":
        """The diffusion a training config describes (keys timesteps, beta1, beta2, schedule)."""
        return cls(config["beta1"], config["beta2"], config["timesteps"], config["schedule"])

    @property
    def device(self) -> torch.device:
        return self.alpha_t.device

    def network_time(self, t: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """The network's time input t / T as [n, 1, 1, 1], from one int t or a tensor t [n]."""
        if isinstance(t, torch.Tensor):
            return (t.float() / self.n_timesteps).view(-1, 1, 1, 1)
        return torch.full((n, 1, 1, 1), t / self.n_timesteps, device=device)

    # ------------------------------------------------------------------------------------------------------------
    # Forward process and training loss
    # ------------------------------------------------------------------------------------------------------------

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample y_t ~ q(y_t | y_0) in closed form (S1 eq. 3, S2 eq. 4; ``diffuse``), checking t.

        y0 [N, C, H, W], t LongTensor [N] in 1..T, noise [N, C, H, W] (default: fresh N(0, I)).
        """
        self.check_timesteps(t, y0.shape[0])
        return self.diffuse(y0, t, torch.randn_like(y0) if noise is None else noise)

    def diffuse(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """S1 eq. 3: y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps. y0, noise [N, C, H, W]; t long [N]."""
        # BEGIN SOLUTION sheet2-q-sample diffuse (eq. 3)
        return extract(self.sqrt_alpha_bar_t, t) * y0 + extract(self.sqrt_one_minus_alpha_bar_t, t) * noise
        # END SOLUTION

    def p_losses(self, network: nn.Module, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                 noise: torch.Tensor | None = None, loss_type: str = "l2") -> torch.Tensor:
        """Noise-prediction loss at given timesteps (``noise_prediction_loss``), checking t and the loss type.

        y0 [N, C, H, W], t LongTensor [N] in 1..T, c [N, n_classes], noise (default: fresh N(0, I)); a scalar.
        """
        check_loss_type(loss_type)
        self.check_timesteps(t, y0.shape[0])
        return self.noise_prediction_loss(network, y0, t, c, torch.randn_like(y0) if noise is None else noise,
                                          loss_type)

    def noise_prediction_loss(self, network: nn.Module, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                              noise: torch.Tensor, loss_type: str) -> torch.Tensor:
        """mean ||eps - eps_theta(y_t, t, c)|| with y_t from eq. 3 (S1 eq. 6, S2 eq. 9); a float32 scalar.

        'l2' is the mean squared error (eq. 6 divided by the number of pixels), 'l1' the mean absolute error.
        Checks nothing, so that a training step never waits for the device.
        """
        # BEGIN SOLUTION sheet2-p-losses noise_prediction_loss
        y_t = self.diffuse(y0, t, noise)
        predicted = network(y_t, self.network_time(t, len(t), y0.device), c).float()
        if loss_type == "l1":
            return F.l1_loss(predicted, noise)
        return F.mse_loss(predicted, noise)
        # END SOLUTION

    def training_loss(self, network: nn.Module, y0: torch.Tensor, c: torch.Tensor, drop_prob: float,
                      loss_type: str = "l2") -> torch.Tensor:
        """Algorithm 1, one step's loss: t ~ U{1..T}, eps ~ N(0, I), c <- 0 with probability drop_prob.

        y0 [N, C, H, W] images in [-1, 1]; c [N, n_classes] one-hot. Returns the scalar loss of ``p_losses``.
        Draws nothing on the host and never synchronises with the device.
        """
        n = y0.shape[0]
        # BEGIN SOLUTION sheet1-algorithm1 training_loss
        t = torch.randint(1, self.n_timesteps + 1, (n,), device=y0.device)
        noise = torch.randn_like(y0)
        keep = torch.bernoulli(torch.full((n, 1), 1 - drop_prob, device=y0.device))
        return self.noise_prediction_loss(network, y0, t, c * keep, noise, loss_type)
        # END SOLUTION

    # ------------------------------------------------------------------------------------------------------------
    # Reverse process: guided noise, one step, the sampling loop
    # ------------------------------------------------------------------------------------------------------------

    def guided_noise(self, network: nn.Module, y_t: torch.Tensor, t: int, conditions: torch.Tensor, w: float,
                     proportions: Sequence[float] = (1.0,)) -> torch.Tensor:
        """Guided noise from ONE network call on K conditional copies of y_t and one unconditional copy.

        conditions [K, N, n_classes] (or [N, n_classes] for K = 1): class vectors, any real numbers; proportions:
        K numbers summing to 1 (``composed_guidance``); K = 1 is S1 eq. 5. With w = 0 the unconditional term
        has weight 0 and its copy is left out of the batch. y_t [N, C, H, W]; returns [N, C, H, W].
        """
        conditions = conditions.unsqueeze(0) if conditions.dim() == 2 else conditions
        n_conditions, n = conditions.shape[:2]
        if len(proportions) != n_conditions:
            raise ValueError(f"need one proportion per condition: {n_conditions} conditions, "
                             f"got {len(proportions)} proportions")
        if y_t.shape[0] != n:
            raise ValueError(f"conditions must hold one class vector per image: {y_t.shape[0]} images, got "
                             f"conditions of shape {list(conditions.shape)}")
        # BEGIN SOLUTION sheet2-guidance guided_noise: the null class in the same batch
        classes = conditions.reshape(n_conditions * n, -1)
        if w != 0:
            classes = torch.cat((classes, torch.zeros(n, classes.shape[-1], device=classes.device)))
        copies = classes.shape[0] // n
        noise = self.noise_of_copies(network, y_t, t, classes).float()
        noise = noise.view(copies, *y_t.shape)
        unconditional = noise[n_conditions] if w != 0 else 0.0
        # END SOLUTION
        return composed_guidance(noise[:n_conditions], unconditional, w, proportions)

    def noise_of_copies(self, network: nn.Module, y_t: torch.Tensor, t: int, classes: torch.Tensor) -> torch.Tensor:
        """eps_theta(y_t, t, c) of y_t [N, C, H, W] under each of classes [copies * N, n_classes] (row k * N + i is
        the k-th class vector of image i) in one network call; returns [copies * N, C, H, W].

        The batch is y_t repeated once per copy, unless the network offers ``noise_of_copies(y_t, time, classes,
        copies)`` (the fast path's ``speed.FastInference``: the U-Net's encoder, which sees neither t nor c, then
        runs once for all copies).
        """
        copies = classes.shape[0] // y_t.shape[0]
        time = self.network_time(t, classes.shape[0], y_t.device)
        if hasattr(network, "noise_of_copies"):
            return network.noise_of_copies(y_t, time, classes, copies)
        return network(y_t.repeat(copies, 1, 1, 1), time, classes)

    def p_sample(self, network: nn.Module, y_t: torch.Tensor, t: int, c: torch.Tensor, w: float) -> torch.Tensor:
        """One reverse step t -> t - 1 (Algorithm 2, lines 3-5; S1 eq. 4 with the guided noise of eq. 5).

        y_t [N, C, H, W]; t an int in 1..T; c [N, n_classes] (any real vectors); w: the guidance weight.
        Returns y_{t-1} [N, C, H, W].
        """
        self.check_timestep(t)
        return self.ancestral_step(y_t, t, self.guided_noise(network, y_t, t, c, w))

    def ancestral_step(self, y_t: torch.Tensor, t: int, predicted_noise: torch.Tensor) -> torch.Tensor:
        """S1 eq. 4: y_{t-1} = 1/sqrt(alpha_t) (y_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) eps~) + sqrt(beta_t) z,

        z ~ N(0, I) for t > 1 and z = 0 for t = 1. y_t and predicted_noise [N, C, H, W] -> y_{t-1} [N, C, H, W].
        """
        # BEGIN SOLUTION sheet2-p-sample ancestral_step (eq. 4)
        mean = self.one_over_sqrt_alpha_t[t] * (
            y_t - self.one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t[t] * predicted_noise)
        if t == 1:
            return mean
        return mean + self.sqrt_beta_t[t] * torch.randn_like(y_t)
        # END SOLUTION

    def predict_start_from_noise(self, y_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """y0^ = (y_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): S1 eq. 3 solved for y_0. [N, C, H, W]."""
        return (y_t - self.sqrt_one_minus_alpha_bar_t[t] * noise) / self.sqrt_alpha_bar_t[t]

    def noise_for_clipped_start(self, y_t: torch.Tensor, t: int, predicted_noise: torch.Tensor) -> torch.Tensor:
        """The noise that explains y_t by the predicted y_0 clipped to the data range [-1, 1].

        eps' = (y_t - sqrt(alpha_bar_t) clip(y0^, -1, 1)) / sqrt(1 - alpha_bar_t), y0^ from
        ``predict_start_from_noise``. Algorithm 2's step with eps' is the posterior mean of q(y_{t-1} | y_t, y_0)
        at the clipped y_0 (the 'clip_denoised' of Ho et al.'s and Nichol & Dhariwal's code); DDIM uses both.
        Without it, a schedule whose alpha_bar_T is nearly 0 (cosine: beta_T clipped at 0.999, 1/sqrt(alpha_T)
        = 32) amplifies the network's error at the first steps until the samples leave the data range.
        y_t and predicted_noise [N, C, H, W]; returns [N, C, H, W].
        """
        start = self.predict_start_from_noise(y_t, t, predicted_noise).clamp(-1, 1)
        return (y_t - self.sqrt_alpha_bar_t[t] * start) / self.sqrt_one_minus_alpha_bar_t[t]

    def ddim_step(self, y_t: torch.Tensor, t: int, t_prev: int, predicted_noise: torch.Tensor,
                  eta: float) -> torch.Tensor:
        """DDIM update (Song et al. 2020, eq. 12) from t to an earlier t_prev (0 allowed) of the strided subset.

        y0^ = (y_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
        y_prev = sqrt(alpha_bar_prev) y0^ + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
        With t_prev = t - 1 and eta = 1, sigma^2 is the posterior variance beta~_t (Ho et al. eq. 7).
        """
        alpha_bar, alpha_bar_prev = self.alpha_bar_t[t], self.alpha_bar_t[t_prev]
        predicted_y0 = self.predict_start_from_noise(y_t, t, predicted_noise)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        direction = torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * predicted_noise
        y_prev = torch.sqrt(alpha_bar_prev) * predicted_y0 + direction
        if t_prev == 0 or eta == 0:
            return y_prev
        return y_prev + sigma * torch.randn_like(y_t)

    def log_snr(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t) = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)); +inf at t = 0."""
        alpha_bar = self.alpha_bar_t[t].double().item()
        return math.inf if alpha_bar >= 1 else 0.5 * math.log(alpha_bar / (1 - alpha_bar))

    def dpm_solver_step(self, y_t: torch.Tensor, t: int, t_prev: int, predicted_noise: torch.Tensor,
                        previous: tuple[torch.Tensor, float] | None,
                        eta: float = 0.0) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a multistep second-order step on the data prediction.

        With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), h = lambda_prev -
        lambda_t and the data prediction x0_t = y0^ (``predict_start_from_noise``):
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
        predicted_y0 = self.predict_start_from_noise(y_t, t, predicted_noise)
        lambda_t, lambda_prev = self.log_snr(t), self.log_snr(t_prev)
        if t_prev == 0:
            return predicted_y0, (predicted_y0, lambda_t)
        h = lambda_prev - lambda_t
        data = predicted_y0
        if previous is not None:
            last_y0, lambda_last = previous
            half_over_r = 0.5 * h / (lambda_t - lambda_last)
            data = (1 + half_over_r) * predicted_y0 - half_over_r * last_y0
        sigma_prev = self.sqrt_one_minus_alpha_bar_t[t_prev]
        g = eta * h
        y_prev = (sigma_prev / self.sqrt_one_minus_alpha_bar_t[t] * math.exp(-g) * y_t
                  - self.sqrt_alpha_bar_t[t_prev] * math.expm1(-h - g) * data)
        if eta > 0:
            y_prev = y_prev + sigma_prev * math.sqrt(-math.expm1(-2 * g)) * torch.randn_like(y_t)
        return y_prev, (predicted_y0, lambda_t)

    def sampling_timesteps(self, sampler: str, steps: int | None = None, spacing: str = "logsnr") -> list[int]:
        """Visited timesteps T = tau_S > ... > tau_1 > 0 (the trailing 0 is y_0): all of them for 'ddpm';
        ``steps`` of them for 'ddim' (evenly in t) and 'dpm++2m' (evenly in log-SNR lambda by default, or in t)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if sampler == "ddpm":
            if steps not in (None, self.n_timesteps):
                raise ValueError(f"the DDPM sampler takes all T = {self.n_timesteps} steps, got steps={steps}; "
                                 f"use sampler='ddim' or 'dpm++2m' for fewer")
            return list(range(self.n_timesteps, -1, -1))
        steps = self.n_timesteps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.n_timesteps:
            raise ValueError(f"steps must be an integer in 1..T = {self.n_timesteps}, got {steps!r}")
        if sampler == "dpm++2m" and spacing == "logsnr":
            return self.log_snr_timesteps(steps)
        return torch.linspace(self.n_timesteps, 0, steps + 1, dtype=torch.float64).round().long().tolist()

    def log_snr_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T down to 1, evenly spaced in lambda_t and rounded to the nearest trained t,
        then 0. Rounding can merge neighbours where lambda changes fast per step; each t is visited once."""
        lambdas = torch.tensor([self.log_snr(t) for t in range(1, self.n_timesteps + 1)], dtype=torch.float64)
        targets = torch.linspace(lambdas[-1].item(), lambdas[0].item(), steps, dtype=torch.float64)
        nearest = (lambdas.view(1, -1) - targets.view(-1, 1)).abs().argmin(dim=1) + 1
        visited = sorted(set(nearest.tolist()) | {self.n_timesteps}, reverse=True)
        return visited + [0]

    @torch.inference_mode()
    def sample(self, network: nn.Module, conditions: torch.Tensor, w: float, size: Sequence[int],
               proportions: Sequence[float] = (1.0,), sampler: str = "ddpm", steps: int | None = None,
               eta: float = 0.0, clip_denoised: bool = False, spacing: str = "logsnr",
               keep: Iterable[int] = (), progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
        """Algorithm 2 for any sampler and guidance: y_T ~ N(0, I), then one guided step per visited timestep.

        Args:
            network: eps_theta, called once per step on the conditional and unconditional copies together.
            conditions: [N, n_classes] or [K, N, n_classes] class vectors (see ``guided_noise``), on the device.
            w: guidance weight of eq. 5; proportions: K mixture proportions (``composed_guidance``).
            size: (C, H, W) of one image.
            sampler: 'ddpm' (the sheet's ancestral sampler, all T steps), 'ddim' or 'dpm++2m' (``steps`` steps).
            eta: stochasticity of ddim and dpm++2m, 0 = deterministic (ODE); 1 = DDIM's ancestral variance, or
                SDE-DPM-Solver++(2M).
            clip_denoised: clip the predicted y_0 to [-1, 1] at every step (``noise_for_clipped_start``); off,
                the DDPM sampler is Algorithm 2 exactly. Needed by the cosine schedule.
            spacing: dpm++2m's timesteps, 'logsnr' or 'time' (``sampling_timesteps``).
            keep: the states y_s to return as frames, by index s (T is the initial noise, 0 the result).
            progress: a tqdm bar over the steps on a terminal (silent when stderr is not one).
        Returns:
            (y_0 [N, C, H, W] on the device, frames numpy [len(kept), N, C, H, W] in descending s).
        """
        timesteps = self.sampling_timesteps(sampler, steps, spacing)
        keep = set(keep)
        n = conditions.shape[-2]
        # BEGIN SOLUTION sheet1-algorithm2 the sampling loop
        y = torch.randn(n, *size, device=self.device)            # y_T ~ N(0, I)
        frames = [y.float().cpu().numpy()] if self.n_timesteps in keep else []
        previous = None
        bar = tqdm(list(zip(timesteps[:-1], timesteps[1:])), desc=f"{sampler} sampling", unit="step",
                   leave=False, disable=None if progress else True, mininterval=1.0)
        for t, t_prev in bar:
            noise = self.guided_noise(network, y, t, conditions, w, proportions)
            if clip_denoised:
                noise = self.noise_for_clipped_start(y, t, noise)
            if sampler == "ddpm":
                y = self.ancestral_step(y, t, noise)
            elif sampler == "ddim":
                y = self.ddim_step(y, t, t_prev, noise, eta)
            else:
                y, previous = self.dpm_solver_step(y, t, t_prev, noise, previous, eta)
            if t_prev in keep:
                frames.append(y.float().cpu().numpy())
        # END SOLUTION
        empty = np.zeros((0, n, *size), dtype=np.float32)
        return y, np.stack(frames) if frames else empty

    # ------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------

    def check_timestep(self, t: int) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= self.n_timesteps:
            raise ValueError(f"t must be an integer timestep in 1..T = 1..{self.n_timesteps}, got {t!r}")

    def check_timesteps(self, t: torch.Tensor, n: int) -> None:
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (n,):
            raise ValueError(f"t must be a LongTensor of shape [{n}], got {t.dtype} of shape {list(t.shape)}")
        low, high = int(t.min()), int(t.max())
        if low < 1 or high > self.n_timesteps:
            raise ValueError(f"t must lie in 1..T = 1..{self.n_timesteps}, got values in {low}..{high}")


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


# ----------------------------------------------------------------------------------------------------------------
# The sheet's class
# ----------------------------------------------------------------------------------------------------------------

class DDPM(nn.Module):
    """Training loss (Algorithm 1) and guided sampling (Algorithm 2) around a noise-predicting network.

    Args:
        nn_model: eps_theta(y_t, t / T, c), e.g. ``UNet``: any module with ``forward(x, t, c)``.
        beta1, beta2: beta_1 and beta_T of the linear and sigmoid schedules.
        n_timesteps: T.
        device: where the model lives; default: CUDA, else MPS, else the CPU.
        drop_prob: p_unconditioned, the probability of zeroing a sample's class vector in training.
        schedule: 'linear' (the sheet's), 'cosine' or 'sigmoid'.
        loss_type: 'l2' (eq. 6) or 'l1', the loss ``forward`` returns.

    The schedule terms of ``ddpm_schedule`` are buffers of ``diffusion`` and readable here, e.g. ``alpha_bar_t``.
    """

    def __init__(self, nn_model: nn.Module, beta1: float = BETA1, beta2: float = BETA2,
                 n_timesteps: int = N_TIMESTEPS, device: torch.device | str | None = None, drop_prob: float = 0.1,
                 schedule: str = "linear", loss_type: str = "l2"):
        super().__init__()
        if not 0 <= drop_prob <= 1:
            raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
        check_loss_type(loss_type)
        self.nn_model = nn_model
        self.diffusion = GaussianDiffusion(beta1, beta2, n_timesteps, schedule)
        self.drop_prob = drop_prob
        self.loss_type = loss_type
        self.to(device if device is not None else default_device())

    def __getattr__(self, name: str):
        if name in SCHEDULE_TERMS or name in ("n_timesteps", "schedule", "beta1", "beta2"):
            return getattr(self.diffusion, name)
        return super().__getattr__(name)

    @property
    def device(self) -> torch.device:
        return self.diffusion.device

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """S1 eq. 3: y_t ~ q(y_t | y_0) in closed form (``GaussianDiffusion.q_sample``)."""
        return self.diffusion.q_sample(y0, t, noise)

    def p_losses(self, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None,
                 loss_type: str = "l2") -> torch.Tensor:
        """S1 eq. 6 at given timesteps t [N] (``GaussianDiffusion.p_losses`` with this model's network)."""
        return self.diffusion.p_losses(self.nn_model, y0, t, c, noise, loss_type)

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Algorithm 1's loss for images y [N, C, H, W] in [-1, 1] and one-hot c [N, n_classes]: a scalar."""
        return self.diffusion.training_loss(self.nn_model, y, c, self.drop_prob, self.loss_type)

    def p_sample(self, y_t: torch.Tensor, t: int, c: torch.Tensor, g_weight: float) -> torch.Tensor:
        """One guided reverse step t -> t - 1 (S1 eqs. 4 and 5) with guidance weight w = g_weight."""
        return self.diffusion.p_sample(self.nn_model, y_t, t, c, g_weight)

    def sample(self, n_sample: int = 4, size: Sequence[int] = (1, 28, 28), n_classes: int = 10,
               g_weight: float = 0.0, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               clip_denoised: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """Algorithm 2 for n_sample images of every class, ordered class-fastest ([0, 1, ..., 9, 0, 1, ...]).

        g_weight is the guidance weight w of eq. 5; sampler, steps, eta, clip_denoised as in
        ``GaussianDiffusion.sample``. The network runs in eval mode (its mode is restored afterwards).
        Returns (y_0 [N, C, H, W] on the model's device, y_steps numpy [frames, N, C, H, W]); the DDPM sampler
        keeps y after the steps of ``frame_timesteps`` (27 frames for T = 400), the others after every step.
        """
        declared = getattr(self.nn_model, "n_classes", n_classes)
        if n_classes != declared:
            raise ValueError(f"n_classes must match the network's {declared}, got {n_classes}")
        labels = class_grid_labels(range(n_classes), n_sample).to(self.device)
        conditions = F.one_hot(labels, n_classes).float()
        if sampler == "ddpm":
            kept = [t - 1 for t in frame_timesteps(self.n_timesteps)]      # y after the steps t of the rule
        else:
            kept = self.diffusion.sampling_timesteps(sampler, steps)[1:]   # y after every step
        was_training = self.training
        self.eval()
        try:
            return self.diffusion.sample(self.nn_model, conditions, g_weight, size, sampler=sampler, steps=steps,
                                         eta=eta, clip_denoised=clip_denoised, keep=kept)
        finally:
            self.train(was_training)

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str | None = None, weights: str = "ema") -> "DDPM":
        """Rebuild the U-Net and the DDPM from a training checkpoint's config and weights, ready to sample.

        ``weights='ema'`` uses the EMA weights when the run kept them, ``'raw'`` the trained ones. Raises
        ``checkpoints.CheckpointError`` with the reason for a missing, corrupt or incomplete checkpoint.
        """
        network, config = load_network(path, weights)
        return cls.from_config(config, network=network, device=device)

    @classmethod
    def from_config(cls, config: dict, network: nn.Module | None = None,
                    device: torch.device | str | None = None) -> "DDPM":
        """The DDPM a training config describes (keys of ``checkpoints.MODEL_KEYS``), around ``network``
        (default: a new U-Net of the config's size), in eval mode."""
        network = network_from_config(config) if network is None else network
        model = cls(network, config["beta1"], config["beta2"], config["timesteps"], device=device,
                    drop_prob=config["drop_prob"], schedule=config["schedule"], loss_type=config["loss"])
        return model.eval()


def network_from_config(config: dict) -> UNet:
    """A new U-Net of the size a training config describes (in_channels, n_features, n_classes, image_size)."""
    return UNet(config["in_channels"], config["n_features"], config["n_classes"], config["image_size"])


def load_network(path: str, weights: str = "ema") -> tuple[UNet, dict]:
    """The U-Net of a training checkpoint with its weights ('ema' when kept, or 'raw'), and the run's config.

    Reads the file once; raises ``checkpoints.CheckpointError`` naming the path and the reason.
    """
    checkpoint = load_checkpoint(path)
    network = network_from_config(checkpoint["config"])
    try:
        network.load_state_dict(network_weights(checkpoint, weights))
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({str(error).splitlines()[0][:200]})") from None
    return network, checkpoint["config"]
