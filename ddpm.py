"""Denoising diffusion probabilistic model (Ho et al. 2020) with classifier-free guidance (Ho & Salimans 2022).

This file is the two exercise sheets' mathematics and nothing else. Equation numbers cite them: "S1 eq. k" is the
MNIST/CIFAR-10 sheet (U-Net, DDPM class, Algorithms 1 and 2), "S2 eq. k" the sheet with q_sample / p_sample /
p_losses and the beta schedules. Note the sheet's misprint: S1 eq. 6 and Algorithm 1, line 6 print
sqrt(alpha_t) y_0, where eqs. 2-3 give sqrt(alpha_bar_t) y_0; ``q_sample`` uses the latter.

    beta schedules      linear (S1), cosine (Nichol & Dhariwal 2021), sigmoid (S2 eq. 10)
    classifier_free_guidance   S1 eq. 5 (S2 eq. 11)
    DDPM                the sheet's class, around any noise-predicting network eps_theta(y_t, t / T, c):
        ddpm_schedule   the pre-computed terms of eqs. 3-5 (S2 eqs. 4 and 8)
        q_sample        y_t ~ q(y_t | y_0) in closed form (S1 eq. 3, S2 eq. 4)
        p_losses        the noise-prediction loss at given timesteps (S1 eq. 6, S2 eq. 9)
        forward         Algorithm 1: the training loss of one batch
        guided_noise    eq. 5 from one network call on the conditional and the unconditional copy
        p_sample        one reverse step t -> t - 1 (eq. 4 with the guided noise of eq. 5)
        sample          Algorithm 2: y_T ~ N(0, I), then p_sample for t = T, ..., 1

Timestep convention: t runs over 1..T. Every schedule tensor has length T + 1 and is indexed by t; entry 0 is
the noise-free state (beta_0 = 0, alpha_bar_0 = 1) and holds finite numbers only.

The training loop (training.py) calls ``ddpm(y0, c)`` for the loss and every grid and tool draws the sheet's
sampler through ``DDPM.sample``; what goes beyond the sheets (DDIM and DPM-Solver++, clipping, mixture guidance,
the fast path, loading checkpoints) lives in lab/ and builds on these methods.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("linear", "cosine", "sigmoid")
LOSS_TYPES = ("l2", "l1")
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


# ----------------------------------------------------------------------------------------------------------------
# Guidance: S1 eq. 5
# ----------------------------------------------------------------------------------------------------------------

def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor | float,
                             w: float) -> torch.Tensor:
    """S1 eq. 5 (S2 eq. 11): eps~ = (1 + w) eps(y_t, t, c) - w eps(y_t, t, 0). Tensors [N, C, H, W].

    ``unconditional`` may be the number 0 when w = 0 (its term vanishes and its network call is skipped).
    """
    # BEGIN SOLUTION sheet2-guidance classifier_free_guidance
    return (1 + w) * conditional - w * unconditional
    # END SOLUTION


def frame_timesteps(n_timesteps: int) -> list[int]:
    """The steps t (descending) after which ``DDPM.sample`` keeps a frame: t % 20 == 0, t == T, or t < 8."""
    return [t for t in range(n_timesteps, 0, -1) if t % 20 == 0 or t == n_timesteps or t < 8]


def class_grid_labels(classes: Sequence[int], n_per_class: int) -> torch.Tensor:
    """The labels of n_per_class images of each class, ordered class-fastest ([0, 1, ..., 9, 0, 1, ...] for
    classes 0..9): long [n_per_class * len(classes)]. Every grid and table of the project uses this order."""
    return torch.tensor(list(classes), dtype=torch.long).repeat(n_per_class)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# The sheet's class
# ----------------------------------------------------------------------------------------------------------------

class DDPM(nn.Module):
    """Training loss (Algorithm 1) and guided sampling (Algorithm 2) around a noise-predicting network.

    Args:
        nn_model: eps_theta(y_t [N, C, H, W], t / T [N, 1, 1, 1], c [N, n_classes]) -> eps [N, C, H, W], e.g.
            ``UNet``: any module with ``forward(x, t, c)``; nothing else is required of it.
        beta1, beta2: beta_1 and beta_T of the linear and sigmoid schedules.
        n_timesteps: T.
        device: where the model lives; default: CUDA, else MPS, else the CPU.
        drop_prob: p_unconditioned, the probability of zeroing a sample's class vector in training.
        schedule: 'linear' (the sheet's), 'cosine' or 'sigmoid'.
        loss_type: 'l2' (eq. 6) or 'l1', the loss ``forward`` returns.

    The terms of ``ddpm_schedule`` are float32 buffers indexed by t (``self.alpha_bar_t[t]``); derived from the
    arguments, they are not part of the state_dict. A DDPM is cheap to build, so the training loop and the tools
    put other networks (DDP, compiled, EMA, fast-path copies of the U-Net) into DDPMs of their own.
    """

    def __init__(self, nn_model: nn.Module, beta1: float = BETA1, beta2: float = BETA2,
                 n_timesteps: int = N_TIMESTEPS, device: torch.device | str | None = None, drop_prob: float = 0.1,
                 schedule: str = "linear", loss_type: str = "l2"):
        super().__init__()
        if not 0 <= drop_prob <= 1:
            raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
        check_loss_type(loss_type)
        self.nn_model = nn_model
        self.beta1, self.beta2, self.n_timesteps, self.schedule = beta1, beta2, n_timesteps, schedule
        self.drop_prob, self.loss_type = drop_prob, loss_type
        for name, values in self.ddpm_schedule(beta1, beta2, n_timesteps, schedule).items():
            self.register_buffer(name, values.float(), persistent=False)
        self.to(device if device is not None else default_device())

    @staticmethod
    def ddpm_schedule(beta1: float, beta2: float, n_timesteps: int,
                      schedule: str = "linear") -> dict[str, torch.Tensor]:
        """Pre-computed terms of S1 eqs. 3-5 (S2 eqs. 4 and 8), each a float64 tensor [T + 1] indexed by t.

        beta1 = beta_1, beta2 = beta_T, n_timesteps = T. Entry 0 is the noise-free state: beta_0 = 0,
        alpha_0 = alpha_bar_0 = 1, and the coefficient of eps in eq. 4, (1 - alpha_0) / sqrt(1 - alpha_bar_0) =
        0/0, is defined as 0. The DDPM keeps them as float32 buffers; lab.few_step reads lambda from these.
        """
        check_schedule_arguments(beta1, beta2, n_timesteps, schedule)
        betas = make_betas(schedule, beta1, beta2, n_timesteps)
        # BEGIN SOLUTION sheet1-schedule ddpm_schedule
        beta_t = torch.cat((torch.zeros(1, dtype=torch.float64), betas))
        alpha_t = 1 - beta_t                                   # alpha_t := 1 - beta_t
        alpha_bar_t = torch.cumprod(alpha_t, dim=0)            # alpha_bar_t := prod_{s<=t} alpha_s
        sqrt_one_minus_alpha_bar_t = torch.sqrt(1 - alpha_bar_t)
        eps_coefficient = torch.zeros_like(beta_t)             # (1 - alpha_t) / sqrt(1 - alpha_bar_t), eq. 4
        eps_coefficient[1:] = (1 - alpha_t[1:]) / sqrt_one_minus_alpha_bar_t[1:]
        return {
            "sqrt_beta_t": torch.sqrt(beta_t),
            "alpha_t": alpha_t,
            "alpha_bar_t": alpha_bar_t,
            "one_over_sqrt_alpha_t": 1 / torch.sqrt(alpha_t),
            "sqrt_alpha_bar_t": torch.sqrt(alpha_bar_t),
            "sqrt_one_minus_alpha_bar_t": sqrt_one_minus_alpha_bar_t,
            "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t": eps_coefficient,
        }
        # END SOLUTION

    @property
    def device(self) -> torch.device:
        return self.alpha_t.device

    def network_time(self, t: int | torch.Tensor, n: int) -> torch.Tensor:
        """The network's time input t / T as [n, 1, 1, 1], from one int t or a tensor t [n]."""
        if isinstance(t, torch.Tensor):
            return (t.float() / self.n_timesteps).view(-1, 1, 1, 1)
        return torch.full((n, 1, 1, 1), t / self.n_timesteps, device=self.device)

    # ------------------------------------------------------------------------------------------------------------
    # Training: the forward process and Algorithm 1
    # ------------------------------------------------------------------------------------------------------------

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """S1 eq. 3 (S2 eq. 4): y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(y_t | y_0).

        y0 [N, C, H, W]; t LongTensor [N] in 1..T; noise eps [N, C, H, W] (default: fresh N(0, I)).
        Returns y_t [N, C, H, W].
        """
        self.check_timesteps(t, y0.shape[0])
        noise = torch.randn_like(y0) if noise is None else noise
        # BEGIN SOLUTION sheet2-q-sample q_sample (eq. 3)
        return extract(self.sqrt_alpha_bar_t, t) * y0 + extract(self.sqrt_one_minus_alpha_bar_t, t) * noise
        # END SOLUTION

    def p_losses(self, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None,
                 loss_type: str = "l2") -> torch.Tensor:
        """S1 eq. 6 (S2 eq. 9) at given timesteps: the mean of ||eps - eps_theta(y_t, t, c)|| with y_t from
        ``q_sample``; 'l2' is the mean squared error (eq. 6 divided by the number of pixels), 'l1' the mean
        absolute error.

        y0 [N, C, H, W]; t LongTensor [N] in 1..T; c [N, n_classes]; noise eps (default: fresh N(0, I)).
        Returns a float32 scalar.
        """
        check_loss_type(loss_type)
        noise = torch.randn_like(y0) if noise is None else noise
        # BEGIN SOLUTION sheet2-p-losses p_losses
        y_t = self.q_sample(y0, t, noise)
        predicted = self.nn_model(y_t, self.network_time(t, len(t)), c).float()
        if loss_type == "l1":
            return F.l1_loss(predicted, noise)
        return F.mse_loss(predicted, noise)
        # END SOLUTION

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, one step's loss: t ~ U{1..T}, eps ~ N(0, I), c <- 0 with probability drop_prob.

        y [N, C, H, W] images in [-1, 1]; c [N, n_classes] one-hot. Returns the scalar loss of ``p_losses``
        (``loss_type``). Draws nothing on the host and, on a GPU, never waits for the device.
        """
        n = y.shape[0]
        # BEGIN SOLUTION sheet1-algorithm1 forward
        t = torch.randint(1, self.n_timesteps + 1, (n,), device=y.device)
        noise = torch.randn_like(y)
        keep = torch.bernoulli(torch.full((n, 1), 1 - self.drop_prob, device=y.device))
        return self.p_losses(y, t, c * keep, noise, self.loss_type)
        # END SOLUTION

    # ------------------------------------------------------------------------------------------------------------
    # Sampling: eq. 5, eq. 4 and Algorithm 2
    # ------------------------------------------------------------------------------------------------------------

    def noise_of_copies(self, y_t: torch.Tensor, t: int, classes: torch.Tensor) -> torch.Tensor:
        """eps_theta(y_t, t, c) of y_t [N, C, H, W] under each row of classes [k N, n_classes] (row j N + i is
        the j-th class vector of image i), in one network call on y_t repeated k times: [k N, C, H, W]."""
        copies = classes.shape[0] // y_t.shape[0]
        return self.nn_model(y_t.repeat(copies, 1, 1, 1), self.network_time(t, classes.shape[0]), classes)

    def guided_noise(self, y_t: torch.Tensor, t: int, c: torch.Tensor, w: float) -> torch.Tensor:
        """S1 eq. 5 (Algorithm 2, line 3): eps~ = (1 + w) eps(y_t, t, c) - w eps(y_t, t, c = 0).

        The conditional and the unconditional (null class c = 0) copies of y_t go through the network in one
        batched call (``noise_of_copies``); with w = 0 the unconditional term has weight 0 and is not computed.
        y_t [N, C, H, W]; t an int in 1..T; c [N, n_classes] (any real vectors). Returns eps~ [N, C, H, W].
        """
        # BEGIN SOLUTION sheet2-guidance guided_noise: the null class in the same batch
        if w == 0:
            return classifier_free_guidance(self.noise_of_copies(y_t, t, c).float(), 0.0, w)
        noise = self.noise_of_copies(y_t, t, torch.cat((c, torch.zeros_like(c)))).float()
        conditional, unconditional = noise.chunk(2)
        return classifier_free_guidance(conditional, unconditional, w)
        # END SOLUTION

    def p_sample(self, y_t: torch.Tensor, t: int, c: torch.Tensor, g_weight: float) -> torch.Tensor:
        """One reverse step t -> t - 1 (Algorithm 2, lines 3-5; S1 eq. 4, S2 eq. 8) with the guided noise of eq. 5:

            y_{t-1} = 1/sqrt(alpha_t) (y_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) eps~) + sqrt(beta_t) z,

        z ~ N(0, I) for t > 1 and z = 0 for t = 1. y_t [N, C, H, W]; t an int in 1..T (the same for the whole
        batch); c [N, n_classes]; g_weight the guidance weight w. Returns y_{t-1} [N, C, H, W].
        """
        self.check_timestep(t)
        # BEGIN SOLUTION sheet2-p-sample p_sample (eq. 4)
        predicted_noise = self.guided_noise(y_t, t, c, g_weight)
        mean = self.one_over_sqrt_alpha_t[t] * (
            y_t - self.one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t[t] * predicted_noise)
        if t == 1:
            return mean
        return mean + self.sqrt_beta_t[t] * torch.randn_like(y_t)
        # END SOLUTION

    @torch.inference_mode()
    def sample(self, n_sample: int = 4, size: Sequence[int] = (1, 28, 28), n_classes: int = 10,
               g_weight: float = 0.0, conditions: torch.Tensor | None = None,
               keep: Iterable[int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Algorithm 2: y_T ~ N(0, I), then ``p_sample`` for t = T, ..., 1, under no gradients in eval mode.

        Args:
            n_sample, n_classes: n_sample images of each of the n_classes classes, ordered class-fastest
                ([0, 1, ..., 9, 0, 1, ...]), unless ``conditions`` is given.
            size: (C, H, W) of one image.
            g_weight: the guidance weight w of eq. 5.
            conditions: [N, n_classes] class vectors (any real numbers) to sample instead of the class grid.
            keep: the states y_s to keep as frames, by s (T the initial noise, 0 the result); default: y after
                the steps t with t % 20 == 0, t == T or t < 8 (``frame_timesteps``: 27 frames for T = 400).
        Returns:
            (y_0 [N, C, H, W] on the model's device, frames numpy [len(kept), N, C, H, W] in descending s).

        The loop of Algorithm 2 fills ``y`` (y_T, then y_{t-1} after each step t) and ``frames``.
        """
        c = self.sampling_conditions(n_sample, n_classes, conditions)
        n = c.shape[-2]
        keep = {t - 1 for t in frame_timesteps(self.n_timesteps)} if keep is None else set(keep)
        was_training = self.training
        self.eval()
        try:
            # BEGIN SOLUTION sheet1-algorithm2 the sampling loop
            y = torch.randn(n, *size, device=self.device)            # y_T ~ N(0, I)
            frames = [y.float().cpu().numpy()] if self.n_timesteps in keep else []
            for t in range(self.n_timesteps, 0, -1):
                y = self.p_sample(y, t, c, g_weight)                  # eqs. 5 and 4; z = 0 at t = 1
                if t - 1 in keep:
                    frames.append(y.float().cpu().numpy())
            # END SOLUTION
        finally:
            self.train(was_training)
        return y, np.stack(frames) if frames else np.zeros((0, n, *size), dtype=np.float32)

    def sampling_conditions(self, n_sample: int, n_classes: int, conditions: torch.Tensor | None) -> torch.Tensor:
        """The class vectors to sample: ``conditions`` on the model's device, else one-hot vectors of n_sample
        images of each class, ordered class-fastest."""
        if conditions is not None:
            return conditions.to(self.device)
        declared = getattr(self.nn_model, "n_classes", n_classes)
        if n_classes != declared:
            raise ValueError(f"n_classes must match the network's {declared}, got {n_classes}")
        labels = class_grid_labels(range(n_classes), n_sample).to(self.device)
        return F.one_hot(labels, n_classes).float()

    # ------------------------------------------------------------------------------------------------------------
    # Building a DDPM from a training run
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict, network: nn.Module | None = None,
                    device: torch.device | str | None = None) -> "DDPM":
        """The DDPM a training config describes (keys beta1, beta2, timesteps, drop_prob, schedule, loss) around
        ``network`` (default: a new U-Net of the config's size, ``lab.checkpoints.network_from_config``), in eval
        mode."""
        if network is None:
            from lab.checkpoints import network_from_config
            network = network_from_config(config)
        model = cls(network, config["beta1"], config["beta2"], config["timesteps"], device=device,
                    drop_prob=config["drop_prob"], schedule=config["schedule"], loss_type=config["loss"])
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str | None = None, weights: str = "ema") -> "DDPM":
        """Rebuild the U-Net and the DDPM from a training checkpoint's config and weights, ready to sample.

        ``weights='ema'`` uses the EMA weights when the run kept them, ``'raw'`` the trained ones. Raises
        ``lab.checkpoints.CheckpointError`` with the reason for a missing, corrupt or incomplete checkpoint.
        """
        from lab.checkpoints import load_network
        network, config = load_network(path, weights)
        return cls.from_config(config, network, device)

    # ------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------

    def check_timestep(self, t: int) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= self.n_timesteps:
            raise ValueError(f"t must be an integer timestep in 1..T = 1..{self.n_timesteps}, got {t!r}")

    def check_timesteps(self, t: torch.Tensor, n: int) -> None:
        """t must be a LongTensor [n] in 1..T. The range is read only from a CPU tensor: reading a GPU tensor
        would make the training step wait for the device (an out-of-range index fails there anyway)."""
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (n,):
            raise ValueError(f"t must be a LongTensor of shape [{n}], got {t.dtype} of shape {list(t.shape)}")
        if t.device.type != "cpu":
            return
        low, high = int(t.min()), int(t.max())
        if low < 1 or high > self.n_timesteps:
            raise ValueError(f"t must lie in 1..T = 1..{self.n_timesteps}, got values in {low}..{high}")


ddpm_schedule = DDPM.ddpm_schedule      # also importable as a function: ``from ddpm import ddpm_schedule``


def extract(schedule_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gather one schedule entry per image: values [T + 1], t [N] (long) -> [N, 1, 1, 1], to broadcast on images."""
    return schedule_values[t].view(-1, 1, 1, 1)


def check_schedule_arguments(beta1: float, beta2: float, n_timesteps: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(n_timesteps, bool) or not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise ValueError(f"n_timesteps must be an integer >= 1, got {n_timesteps!r}")
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"beta1 and beta2 must lie in (0, 1), got beta1={beta1}, beta2={beta2}")
    if not beta1 < beta2:
        raise ValueError(f"beta1 must be smaller than beta2 (an increasing schedule), got beta1={beta1}, beta2={beta2}")


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
