"""Denoising diffusion probabilistic model (Ho et al. 2020) with classifier-free guidance (Ho & Salimans 2022).

Equation numbers cite the two exercise sheets: "S1 eq. k" is the MNIST/CIFAR-10 sheet (U-Net, DDPM class,
Algorithms 1 and 2), "S2 eq. k" the sheet with q_sample / p_sample / p_losses and the beta schedules.

Timestep convention: t runs over 1..T. Every schedule tensor has length T + 1 and is indexed by t; entry 0 is
the noise-free state (beta_0 = 0, alpha_bar_0 = 1) and holds finite numbers only.
"""
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import CheckpointError, load_checkpoint, network_weights
from networks.Conditional_UNet import UNet

SCHEDULES = ("linear", "cosine", "sigmoid")
LOSS_TYPES = ("l2", "l1")
SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------------------------------------------
# Beta schedules: each returns the float64 tensor [beta_1, ..., beta_T] of length T.
# --------------------------------------------------------------------------------------------------------------

def linear_beta_schedule(beta1: float, beta2: float, n_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule: beta_1 = beta1, ..., beta_T = beta2, evenly spaced. Shape [T]."""
    return torch.linspace(beta1, beta2, n_timesteps, dtype=torch.float64)


def cosine_beta_schedule(n_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped to at most ``max_beta`` so that the last steps
    near t = T do not become singular. The schedule has no beta range: beta1/beta2 do not enter it. Shape [T].
    """
    steps = torch.arange(n_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / n_timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_beta_schedule(beta_start: float, beta_end: float, n_timesteps: int, s_limit: float = 6.0) -> torch.Tensor:
    """S2 eq. 10: beta_t = beta_start + sigmoid(-s_limit + 2 t s_limit / T) * (beta_end - beta_start), t = 1..T.

    The sigmoid shapes beta itself, as the sheet defines it (some libraries apply it to alpha_bar instead).
    ``s_limit`` picks the range [-s_limit, s_limit] of the sigmoid that is used; with 6 the schedule starts
    within 0.3 % of the range above beta_start and ends within 0.3 % below beta_end. Shape [T].
    """
    t = torch.arange(1, n_timesteps + 1, dtype=torch.float64)
    return beta_start + torch.sigmoid(-s_limit + 2 * t * s_limit / n_timesteps) * (beta_end - beta_start)


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
    """The steps t (descending) after which ``sample`` keeps a frame: t % 20 == 0, t == T, or t < 8."""
    return [t for t in range(n_timesteps, 0, -1) if t % 20 == 0 or t == n_timesteps or t < 8]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def class_grid_conditions(n_sample: int, n_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One-hot class vectors ordered class-fastest ([0, 1, ..., 9, 0, 1, ...]): [n_sample * n_classes, n_classes]."""
    labels = torch.arange(n_classes, device=device).repeat(n_sample)
    return F.one_hot(labels, n_classes).float()


class DDPM(nn.Module):
    """Training loss (Algorithm 1) and guided sampling (Algorithm 2) around a noise-predicting network.

    Args:
        nn_model: eps_theta(y_t, t / T, c), e.g. ``UNet``; needs attributes ``n_classes``.
        beta1, beta2: beta_1 and beta_T of the linear and sigmoid schedules.
        n_timesteps: T.
        device: where the model lives; default: CUDA, else MPS, else the CPU.
        drop_prob: p_unconditioned, the probability of zeroing a sample's class vector in training.
        schedule: 'linear' (the sheet's), 'cosine' or 'sigmoid'.
        loss_type: 'l2' (eq. 6) or 'l1', the loss ``forward`` returns.
    """

    def __init__(self, nn_model: nn.Module, beta1: float = 1e-4, beta2: float = 0.02, n_timesteps: int = 400,
                 device: torch.device | str | None = None, drop_prob: float = 0.1, schedule: str = "linear",
                 loss_type: str = "l2"):
        super().__init__()
        if not 0 <= drop_prob <= 1:
            raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
        _check_loss_type(loss_type)
        self.nn_model = nn_model
        self.n_classes = nn_model.n_classes
        self.beta1, self.beta2 = beta1, beta2
        self.n_timesteps = n_timesteps
        self.drop_prob = drop_prob
        self.schedule = schedule
        self.loss_type = loss_type
        for name, values in ddpm_schedule(beta1, beta2, n_timesteps, schedule).items():
            self.register_buffer(name, values, persistent=False)  # derived from the arguments, not saved
        self.to(device if device is not None else default_device())

    ddpm_schedule = staticmethod(ddpm_schedule)

    @property
    def device(self) -> torch.device:
        return self.alpha_t.device

    # ----------------------------------------------------------------------------------------------------------
    # Forward process and training loss
    # ----------------------------------------------------------------------------------------------------------

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample y_t ~ q(y_t | y_0) in closed form: y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps.

        S1 eq. 3 (S2 eq. 4). y0 [N, C, H, W], t LongTensor [N] in 1..T, noise [N, C, H, W] (default: fresh N(0, I)).
        """
        self._check_timesteps(t, y0.shape[0])
        return self._diffuse(y0, t, torch.randn_like(y0) if noise is None else noise)

    def _diffuse(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return extract(self.sqrt_alpha_bar_t, t) * y0 + extract(self.sqrt_one_minus_alpha_bar_t, t) * noise

    def p_losses(self, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None,
                 loss_type: str = "l2") -> torch.Tensor:
        """Noise-prediction loss at given timesteps: mean ||eps - eps_theta(y_t, t, c)|| (S1 eq. 6, S2 eq. 9).

        'l2' is the mean squared error (eq. 6 divided by the number of pixels), 'l1' the mean absolute error.
        y0 [N, C, H, W], t LongTensor [N] in 1..T, c [N, n_classes]; returns a scalar.
        """
        _check_loss_type(loss_type)
        self._check_timesteps(t, y0.shape[0])
        return self._noise_loss(y0, t, c, torch.randn_like(y0) if noise is None else noise, loss_type)

    def _noise_loss(self, y0: torch.Tensor, t: torch.Tensor, c: torch.Tensor, noise: torch.Tensor,
                    loss_type: str) -> torch.Tensor:
        y_t = self._diffuse(y0, t, noise)
        predicted = self.nn_model(y_t, (t.float() / self.n_timesteps).view(-1, 1, 1, 1), c)
        if loss_type == "l1":
            return F.l1_loss(predicted.float(), noise)
        return F.mse_loss(predicted.float(), noise)

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, one step's loss: t ~ U{1..T}, eps ~ N(0, I), c <- 0 with probability drop_prob.

        y [N, C, H, W] images in [-1, 1]; c [N, n_classes] one-hot. Returns the scalar loss (``loss_type``).
        Draws nothing on the host and never synchronises with the device.
        """
        n = y.shape[0]
        t = torch.randint(1, self.n_timesteps + 1, (n,), device=y.device)
        noise = torch.randn_like(y)
        keep = torch.bernoulli(torch.full((n, 1), 1 - self.drop_prob, device=y.device))
        return self._noise_loss(y, t, c * keep, noise, self.loss_type)

    # ----------------------------------------------------------------------------------------------------------
    # Reverse process
    # ----------------------------------------------------------------------------------------------------------

    def guided_noise(self, y_t: torch.Tensor, t: int, conditions: torch.Tensor,
                     weights: Sequence[float]) -> torch.Tensor:
        """Guided noise from ONE network call on the batch of K conditional copies and one unconditional copy.

        eps~ = eps(y_t, t, 0) + sum_k w_k (eps(y_t, t, c_k) - eps(y_t, t, 0))
             = (1 - sum_k w_k) eps(y_t, t, 0) + sum_k w_k eps(y_t, t, c_k).
        With K = 1 and w_1 = 1 + w this is S1 eq. 5 (S2 eq. 11): (1 + w) eps(y_t, t, c) - w eps(y_t, t, 0);
        with several c_k it is composed guidance towards a mixture of classes. When the weights sum to exactly 1
        (e.g. w = 0) the unconditional term has weight 0 and its copy is left out of the batch.

        y_t [N, C, H, W]; conditions [K, N, n_classes]; weights: K numbers. Returns [N, C, H, W].
        """
        n_conditions, n = conditions.shape[:2]
        if len(weights) != n_conditions:
            raise ValueError(f"need one guidance weight per condition: {n_conditions} conditions, "
                             f"got {len(weights)} weights")
        if y_t.shape[0] != n:
            raise ValueError(f"conditions must hold one class vector per image: {y_t.shape[0]} images, got "
                             f"conditions of shape {list(conditions.shape)}")
        unconditional_weight = 1.0 - sum(weights)
        classes = conditions.reshape(n_conditions * n, -1)
        if unconditional_weight != 0:
            classes = torch.cat((classes, torch.zeros(n, classes.shape[-1], device=classes.device)))
        copies = classes.shape[0] // n
        batch = y_t.repeat(copies, 1, 1, 1)
        time = torch.full((batch.shape[0], 1, 1, 1), t / self.n_timesteps, device=y_t.device)
        noise = self.nn_model(batch, time, classes).float().view(copies, *y_t.shape)
        weight = torch.as_tensor(weights, dtype=noise.dtype, device=noise.device).view(-1, 1, 1, 1, 1)
        guided = (weight * noise[:n_conditions]).sum(dim=0)
        if unconditional_weight != 0:
            guided = guided + unconditional_weight * noise[n_conditions]
        return guided

    def p_sample(self, y_t: torch.Tensor, t: int, c: torch.Tensor, g_weight: float) -> torch.Tensor:
        """One reverse step t -> t - 1 (Algorithm 2, lines 3-5; S1 eq. 4 with the guided noise of eq. 5).

        y_{t-1} = 1/sqrt(alpha_t) (y_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) eps~) + sqrt(beta_t) z,
        z ~ N(0, I) for t > 1 and z = 0 for t = 1. y_t [N, C, H, W]; t an int in 1..T; c [N, n_classes] (any real
        vectors); g_weight: the guidance weight w, any real number. Returns y_{t-1} [N, C, H, W].
        """
        self._check_timestep(t)
        noise = self.guided_noise(y_t, t, c.unsqueeze(0), (1.0 + g_weight,))
        return self._ancestral_step(y_t, t, noise)

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

    def _ancestral_step(self, y_t: torch.Tensor, t: int, predicted_noise: torch.Tensor) -> torch.Tensor:
        mean = self.one_over_sqrt_alpha_t[t] * (
            y_t - self.one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t[t] * predicted_noise)
        if t == 1:
            return mean
        return mean + self.sqrt_beta_t[t] * torch.randn_like(y_t)

    def _ddim_step(self, y_t: torch.Tensor, t: int, t_prev: int, predicted_noise: torch.Tensor,
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

    def sample(self, n_sample: int = 4, size: Sequence[int] = (1, 28, 28), n_classes: int = 10,
               g_weight: float = 0.0, sampler: str = "ddpm", steps: int | None = None,
               eta: float = 0.0, clip_denoised: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """Algorithm 2 for n_sample images of every class, ordered class-fastest ([0, 1, ..., 9, 0, 1, ...]).

        Args:
            n_sample: images per class; the batch has N = n_sample * n_classes images.
            size: (C, H, W) of one image.
            n_classes: must equal the network's.
            g_weight: guidance weight w of eq. 5.
            sampler: 'ddpm' (the sheet's ancestral sampler, all T steps) or 'ddim' (``steps`` strided steps).
            steps: number of DDIM steps (default T); the DDPM sampler always takes T.
            eta: DDIM stochasticity, 0 = deterministic, 1 = ancestral-like.
            clip_denoised: clip the predicted y_0 to [-1, 1] at every step (``noise_for_clipped_start``); off,
                the DDPM sampler is Algorithm 2 exactly. Needed by the cosine schedule.
        Returns:
            (y_0 [N, C, H, W] on the model's device, y_steps numpy [frames, N, C, H, W]); the DDPM sampler keeps
            y after the steps of ``frame_timesteps`` (27 frames for T = 400), DDIM after every step.
        """
        if n_classes != self.n_classes:
            raise ValueError(f"n_classes must match the network's {self.n_classes}, got {n_classes}")
        conditions = class_grid_conditions(n_sample, n_classes, self.device)
        return self.sample_guided(conditions.unsqueeze(0), (1.0 + g_weight,), size, sampler, steps, eta,
                                  clip_denoised)

    @torch.inference_mode()
    def sample_guided(self, conditions: torch.Tensor, weights: Sequence[float], size: Sequence[int],
                      sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
                      clip_denoised: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """The sampling loop for any guidance (see ``guided_noise``): conditions [K, N, n_classes], K weights.

        Returns (y_0 [N, C, H, W], y_steps numpy [frames, N, C, H, W]) as ``sample`` does.
        """
        timesteps, keep = self.sampling_plan(sampler, steps)
        was_training = self.training
        self.eval()
        try:
            y = torch.randn(conditions.shape[1], *size, device=self.device)   # y_T ~ N(0, I)
            frames = []
            for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
                noise = self.guided_noise(y, t, conditions, weights)
                if clip_denoised:
                    noise = self.noise_for_clipped_start(y, t, noise)
                if sampler == "ddpm":
                    y = self._ancestral_step(y, t, noise)
                else:
                    y = self._ddim_step(y, t, t_prev, noise, eta)
                if t in keep:
                    frames.append(y.float().cpu().numpy())
        finally:
            self.train(was_training)
        return y, np.stack(frames)

    def sampling_plan(self, sampler: str, steps: int | None) -> tuple[list[int], set[int]]:
        """Visited timesteps T = tau_S > ... > tau_1 > 0 (the trailing 0 is y_0) and the steps that keep a frame."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "ddpm":
            if steps not in (None, self.n_timesteps):
                raise ValueError(f"the DDPM sampler takes all T = {self.n_timesteps} steps, got steps={steps}; "
                                 f"use sampler='ddim' for fewer")
            return list(range(self.n_timesteps, -1, -1)), set(frame_timesteps(self.n_timesteps))
        steps = self.n_timesteps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.n_timesteps:
            raise ValueError(f"steps must be an integer in 1..T = {self.n_timesteps}, got {steps!r}")
        timesteps = torch.linspace(self.n_timesteps, 0, steps + 1, dtype=torch.float64).round().long().tolist()
        return timesteps, set(timesteps[:-1])

    # ----------------------------------------------------------------------------------------------------------
    # Checks and loading
    # ----------------------------------------------------------------------------------------------------------

    def _check_timestep(self, t: int) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= self.n_timesteps:
            raise ValueError(f"t must be an integer timestep in 1..T = 1..{self.n_timesteps}, got {t!r}")

    def _check_timesteps(self, t: torch.Tensor, n: int) -> None:
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (n,):
            raise ValueError(f"t must be a LongTensor of shape [{n}], got {t.dtype} of shape {list(t.shape)}")
        low, high = int(t.min()), int(t.max())
        if low < 1 or high > self.n_timesteps:
            raise ValueError(f"t must lie in 1..T = 1..{self.n_timesteps}, got values in {low}..{high}")

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str | None = None, weights: str = "ema") -> "DDPM":
        """Rebuild the U-Net and the DDPM from a training checkpoint's config and weights, ready to sample.

        ``weights='ema'`` uses the EMA weights when the run kept them, ``'raw'`` the trained ones. Raises ``checkpoints.CheckpointError`` with the reason
        for a missing, corrupt or incomplete checkpoint.
        """
        checkpoint = load_checkpoint(path)
        try:
            return cls.from_config(checkpoint["config"], network_weights(checkpoint, weights), device)
        except RuntimeError as error:  # load_state_dict: missing, unexpected or mis-shaped weights
            raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                                  f"({str(error).splitlines()[0][:200]})") from None

    @classmethod
    def from_config(cls, config: dict, weights: dict | None = None,
                    device: torch.device | str | None = None) -> "DDPM":
        """Build the DDPM a training config describes (keys of ``checkpoints.MODEL_KEYS``), with optional weights."""
        network = UNet(config["in_channels"], config["n_features"], config["n_classes"], config["image_size"])
        if weights is not None:
            network.load_state_dict(weights)
        model = cls(network, config["beta1"], config["beta2"], config["timesteps"], device=device,
                    drop_prob=config["drop_prob"], schedule=config["schedule"], loss_type=config["loss"])
        return model.eval()


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
