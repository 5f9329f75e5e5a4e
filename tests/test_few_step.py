"""Beyond the sheets (lab.few_step, lab.generation): DDIM and DPM-Solver++(2M) against their equations and an
ideal noise predictor, clipping of the predicted y_0, guidance towards a mixture of classes, and lambda in float64."""
from __future__ import annotations

import math

import pytest
import torch

from ddpm import DDPM, classifier_free_guidance
from lab import few_step
from lab.generation import SamplingDDPM, generate, sampling_model
from lab.mixtures import composed_guidance
from networks.Conditional_UNet import UNet
from tests.conftest import StubNetwork

CONFIG = dict(in_channels=1, image_size=4, n_features=8, n_classes=10, timesteps=50, beta1=1e-4, beta2=0.02,
              schedule="linear", drop_prob=0.1, loss="l2")


def make(network=None, timesteps=50, **kwargs) -> SamplingDDPM:
    return SamplingDDPM(network if network is not None else StubNetwork(), n_timesteps=timesteps, device="cpu",
                        **kwargs)


# ---- composed guidance ----------------------------------------------------------------------------------------

def test_composed_guidance_towards_a_mixture():
    stub = StubNetwork()
    model = make(stub, timesteps=50)
    y, w = torch.randn(2, 1, 2, 2), 2.0
    three, eight = torch.eye(10)[[3, 3]], torch.eye(10)[[8, 8]]
    guided = model.with_options((0.4, 0.6)).guided_noise(y, 10, torch.stack([three, eight]), w)
    eps_u = stub.expected(y, 10 / 50, torch.zeros(2, 10))
    eps_3, eps_8 = stub.expected(y, 0.2, three), stub.expected(y, 0.2, eight)
    expected = eps_u + (1 + w) * (0.4 * (eps_3 - eps_u) + 0.6 * (eps_8 - eps_u))
    torch.testing.assert_close(guided, expected)
    assert stub.calls == [6]
    torch.testing.assert_close(composed_guidance(torch.stack([eps_3]), eps_u, w, (1.0,)),
                               classifier_free_guidance(eps_3, eps_u, w))



# ---- DDIM -------------------------------------------------------------------------------------------------------------

def test_ddim_step_follows_its_equations():
    stub = StubNetwork()
    model = make(stub, timesteps=100)
    y, eps = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t, t_prev, eta = 60, 40, 0.7
    a, a_prev = model.alpha_bar_t[t].double(), model.alpha_bar_t[t_prev].double()
    torch.manual_seed(5)
    result = few_step.ddim_step(model, y, t, t_prev, eps, eta)
    torch.manual_seed(5)
    z = torch.randn_like(y).double()
    y0_hat = (y.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    expected = a_prev.sqrt() * y0_hat + (1 - a_prev - sigma ** 2).sqrt() * eps.double() + sigma * z
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_ddim_with_all_steps_and_eta_one_is_ancestral_with_posterior_variance():
    model = make(timesteps=100)
    y, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for t in (100, 50, 2):
        beta = 1 - model.alpha_t[t]
        posterior_variance = (1 - model.alpha_bar_t[t - 1]) / (1 - model.alpha_bar_t[t]) * beta   # Ho et al. eq. 7
        torch.manual_seed(t)
        result = few_step.ddim_step(model, y, t, t - 1, eps, eta=1.0)
        torch.manual_seed(t)
        z = torch.randn_like(y)
        mean = (y - beta / torch.sqrt(1 - model.alpha_bar_t[t]) * eps) / torch.sqrt(model.alpha_t[t])
        torch.testing.assert_close(result, mean + posterior_variance.sqrt() * z, atol=1e-5, rtol=1e-4)


def test_ddim_with_eta_zero_is_deterministic_and_visits_strided_steps():
    torch.manual_seed(0)
    stub = StubNetwork()
    model = make(stub, timesteps=400)
    y_T = torch.randn(10, 1, 2, 2)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        y = y_T.clone()
        for t, t_prev in zip(range(400, 0, -8), range(392, -1, -8)):
            y = few_step.ddim_step(model, y, t, t_prev, model.guided_noise(y, t, torch.eye(10), 1.0), 0.0)
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1])
    stub.calls.clear()
    _, frames = few_step.sample(model, torch.eye(10), 1.0, (1, 2, 2), "ddim", 50, keep=range(400))
    assert len(stub.calls) == 50 and frames.shape[0] == 50



# ---- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_clipping_keeps_the_noise_of_an_in_range_start(schedule):
    model = make(schedule=schedule)
    torch.manual_seed(0)
    y0, eps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    for t in (1, 25, 50):
        y_t = model.q_sample(y0, torch.full((4,), t), eps)
        assert torch.allclose(few_step.predict_start_from_noise(model, y_t, t, eps), y0, atol=1e-3 if t < 50 else 1.0)
        if t < 50:   # at t = T the cosine alpha_bar is ~0 and y_0 is not recoverable in float32
            assert torch.allclose(model.with_options(clip_denoised=True).noise_for_clipped_start(y_t, t, eps), eps, atol=1e-4)


def test_clipped_step_is_the_posterior_mean_at_the_clipped_start():
    """Algorithm 2 with eps' = posterior mean of q(y_{t-1} | y_t, y_0) (Ho et al. eq. 7) at clip(y0^)."""
    model = make(schedule="cosine")
    torch.manual_seed(1)
    y_t, eps = torch.randn(3, 1, 4, 4) * 3, torch.randn(3, 1, 4, 4)
    for t in (2, 30, 50):
        clipped_noise = model.with_options(clip_denoised=True).noise_for_clipped_start(y_t, t, eps)
        start = few_step.predict_start_from_noise(model, y_t, t, eps).clamp(-1, 1)
        alpha_bar, alpha_bar_prev = model.alpha_bar_t[t].double(), model.alpha_bar_t[t - 1].double()
        beta = 1 - alpha_bar / alpha_bar_prev
        posterior_mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * start.double()
                          + (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * y_t.double())
        algorithm_2_mean = model.one_over_sqrt_alpha_t[t] * (
            y_t - model.one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t[t] * clipped_noise)
        assert torch.allclose(algorithm_2_mean.double(), posterior_mean, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clipped_sampling_stays_in_the_data_range_where_plain_sampling_diverges(sampler):
    model = make(StubNetwork(), schedule="cosine")   # the stub's noise is far from any data's
    sampling = sampling_model(model.nn_model, dict(CONFIG, schedule="cosine"), torch.device("cpu"))
    conditions = torch.eye(10)
    plain, _ = generate(sampling, conditions, 1.0, sampler=sampler, steps=10 if sampler == "ddim" else None)
    clipped, _ = generate(sampling, conditions, 1.0, sampler=sampler, steps=10 if sampler == "ddim" else None,
                          clip_denoised=True)
    assert plain.abs().max() > 10
    assert clipped.abs().max() <= 1 + 1e-4



# ---- DPM-Solver++(2M) -----------------------------------------------------------------------------------------------

class GaussianDataNoise(torch.nn.Module):
    """The exact eps of y_t for data y_0 ~ N(mu, s^2): E[eps | y_t] = sigma_t (y_t - a_t mu) / (a_t^2 s^2 + sigma_t^2),
    with a_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t): the ideal noise predictor."""

    def __init__(self, diffusion, mu=0.3, s=0.5):
        super().__init__()
        self.diffusion, self.mu, self.s = diffusion, mu, s

    def forward(self, y, t_fraction, c):
        t = (t_fraction.view(-1) * self.diffusion.n_timesteps).round().long()
        alpha_bar = self.diffusion.alpha_bar_t[t].double().view(-1, 1, 1, 1)
        a, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return (sigma * (y.double() - a * self.mu) / (a ** 2 * self.s ** 2 + sigma ** 2)).float()


def solver_errors(sampler, spacing, step_counts, reference_steps=1000):
    """Max error at y_0 of ``sampler`` with each step count, against dpm++2m with every timestep, same y_T."""
    diffusion = make(timesteps=1000)
    diffusion.nn_model = GaussianDataNoise(diffusion)
    conditions = torch.zeros(64, 10)

    def solve(name, steps, how):
        torch.manual_seed(0)
        return few_step.sample(diffusion, conditions, 0.0, (1, 1, 1), name, steps, spacing=how)[0]

    reference = solve("dpm++2m", reference_steps, "logsnr")
    return [(solve(sampler, steps, spacing) - reference).abs().max().item() for steps in step_counts]


def test_dpm_solver_is_second_order_and_ddim_first_order_with_an_ideal_noise_predictor():
    dpm = solver_errors("dpm++2m", "logsnr", (20, 40, 80))
    ddim = solver_errors("ddim", "time", (20, 40, 80))
    for coarse, fine in zip(dpm, dpm[1:]):
        assert 3.0 < coarse / fine < 6.0, dpm       # doubling the steps: error / 4
    for coarse, fine in zip(ddim, ddim[1:]):
        assert 1.6 < coarse / fine < 2.5, ddim      # error / 2
    assert dpm[0] < ddim[0] / 5                     # at 20 steps: 0.025 against 0.23


def test_dpm_solver_first_step_is_a_ddim_step():
    model = make(StubNetwork(), timesteps=100)
    y, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for t, t_prev in ((100, 80), (50, 13)):
        first, (predicted_y0, _) = few_step.dpm_solver_step(model, few_step.log_snr(model), y, t, t_prev, eps, previous=None)
        torch.testing.assert_close(first, few_step.ddim_step(model, y, t, t_prev, eps, eta=0.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predicted_y0, few_step.predict_start_from_noise(model, y, t, eps))
    last, _ = few_step.dpm_solver_step(model, few_step.log_snr(model), y, 7, 0, eps, previous=(torch.zeros_like(y), 0.0))
    torch.testing.assert_close(last, few_step.predict_start_from_noise(model, y, 7, eps))   # first order at t = 0


def test_dpm_solver_second_step_uses_the_previous_data_prediction():
    diffusion = make(timesteps=100)
    lambdas = few_step.log_snr(diffusion)
    y, eps, last_y0 = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t_last, t, t_prev = 90, 60, 30
    result, _ = few_step.dpm_solver_step(diffusion, lambdas, y, t, t_prev, eps, previous=(last_y0, lambdas[t_last].item()))
    lam = {s: lambdas[s].item() for s in (t_last, t, t_prev)}
    h, h_last = lam[t_prev] - lam[t], lam[t] - lam[t_last]
    r = h_last / h
    y0 = few_step.predict_start_from_noise(diffusion, y, t, eps).double()
    data = (1 + 1 / (2 * r)) * y0 - 1 / (2 * r) * last_y0.double()
    sigma = lambda s: (1 - diffusion.alpha_bar_t[s].double()).sqrt()  # noqa: E731
    alpha = lambda s: diffusion.alpha_bar_t[s].double().sqrt()        # noqa: E731
    expected = sigma(t_prev) / sigma(t) * y.double() - alpha(t_prev) * (math.exp(-h) - 1) * data
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_sde_dpm_solver_step_adds_fresh_noise_to_a_contracted_ode_step():
    diffusion = make(timesteps=100)
    lambdas = few_step.log_snr(diffusion)
    y, eps, last_y0 = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t_last, t, t_prev, eta = 90, 60, 30, 1.0
    previous = (last_y0, lambdas[t_last].item())
    torch.manual_seed(5)
    result, _ = few_step.dpm_solver_step(diffusion, lambdas, y, t, t_prev, eps, previous, eta)
    torch.manual_seed(5)
    z = torch.randn_like(y)
    lam = {s: lambdas[s].item() for s in (t_last, t, t_prev)}
    h, r = lam[t_prev] - lam[t], (lam[t] - lam[t_last]) / (lam[t_prev] - lam[t])
    y0 = few_step.predict_start_from_noise(diffusion, y, t, eps).double()
    data = (1 + 1 / (2 * r)) * y0 - 1 / (2 * r) * last_y0.double()
    sigma = lambda s: (1 - diffusion.alpha_bar_t[s].double()).sqrt()  # noqa: E731
    alpha = lambda s: diffusion.alpha_bar_t[s].double().sqrt()        # noqa: E731
    expected = (sigma(t_prev) / sigma(t) * math.exp(-h) * y.double() + alpha(t_prev) * (1 - math.exp(-2 * h)) * data
                + sigma(t_prev) * math.sqrt(1 - math.exp(-2 * h)) * z.double())
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)
    deterministic, _ = few_step.dpm_solver_step(diffusion, lambdas, y, t, t_prev, eps, previous, eta=0.0)
    ode, _ = few_step.dpm_solver_step(diffusion, lambdas, y, t, t_prev, eps, previous)
    torch.testing.assert_close(deterministic, ode)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_samples_the_data_distribution_with_an_ideal_noise_predictor(eta):
    """With the exact eps of y_0 ~ N(0.3, 0.5^2), 20 steps of the ODE and of the SDE solver draw from it."""
    diffusion = make(timesteps=400)
    diffusion.nn_model = GaussianDataNoise(diffusion)
    torch.manual_seed(6)
    samples = few_step.sample(diffusion, torch.zeros(20000, 10), 0.0, (1, 1, 1), "dpm++2m", 20, eta)[0].double()
    assert samples.mean().item() == pytest.approx(0.3, abs=0.02)
    assert samples.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_log_snr_timesteps_descend_from_T_to_zero_without_repeats(schedule):
    diffusion = make(timesteps=400, schedule=schedule)
    for steps in (5, 10, 20, 25):
        timesteps = few_step.sampling_timesteps(diffusion, "dpm++2m", steps)
        assert timesteps[0] == 400 and timesteps[-1] == 0 and timesteps[-2] == 1
        assert timesteps == sorted(set(timesteps), reverse=True) and len(timesteps) - 1 <= steps
    assert few_step.sampling_timesteps(diffusion, "dpm++2m", 10, "time") == list(range(400, -1, -40))


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_samples_are_deterministic_with_composed_guidance(clip):
    stub = StubNetwork()
    diffusion = make(stub, timesteps=50, schedule="cosine").with_options((0.5, 0.5), clip_denoised=clip)
    conditions = torch.stack([torch.eye(10)[[3, 3]], torch.eye(10)[[8, 8]]])
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        runs.append(few_step.sample(diffusion, conditions, 2.0, (1, 2, 2), "dpm++2m", 8, keep=[0])[0])
    torch.testing.assert_close(runs[0], runs[1])
    assert runs[0].shape == (2, 1, 2, 2) and torch.isfinite(runs[0]).all()
    assert set(stub.calls) == {6}                                     # 2 conditional copies + 1 unconditional
    if clip:
        assert runs[0].abs().max() <= 1 + 1e-4


# ---- lambda in float64 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_log_snr_is_computed_in_float64(schedule):
    """lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) from the schedule's float64 terms, to 1e-9."""
    diffusion = make(timesteps=400, schedule=schedule)
    lambdas = few_step.log_snr(diffusion)
    betas = {"linear": torch.linspace(1e-4, 0.02, 400, dtype=torch.float64)}.get(schedule)
    if betas is None:
        betas = DDPM.ddpm_schedule(1e-4, 0.02, 400, schedule)["sqrt_beta_t"][1:].double() ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = [0.5 * math.log(a / (1 - a)) for a in alpha_bar.tolist()]
    assert lambdas.dtype == torch.float64 and math.isinf(lambdas[0].item())
    for t in (1, 2, 200, 400):
        assert lambdas[t].item() == pytest.approx(expected[t - 1], rel=1e-9)


# ---- samplers on the U-Net -------------------------------------------------------------------------------------

def test_few_step_samplers_refuse_bad_settings():
    diffusion = make(timesteps=50)
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpm"):
        few_step.sampling_timesteps(diffusion, "euler", 5)
    with pytest.raises(ValueError, match="logsnr.*time"):
        few_step.sampling_timesteps(diffusion, "dpm++2m", 5, "karras")
    with pytest.raises(ValueError, match="steps"):
        few_step.sampling_timesteps(diffusion, "ddim", 51)
    with pytest.raises(ValueError, match="all T = 50"):
        few_step.sampling_timesteps(diffusion, "ddpm", 10)
    with pytest.raises(ValueError, match="few-step"):
        few_step.sample(diffusion, torch.eye(10), 1.0, (1, 2, 2), "ddpm")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_few_step_samplers_run_the_unet_and_keep_every_step(sampler):
    torch.manual_seed(0)
    diffusion = make(UNet(1, 8, 10, 8), timesteps=20).eval()
    y0, frames = few_step.sample(diffusion, torch.eye(10)[:3], 1.0, (1, 8, 8), sampler, 5,
                                 keep=few_step.sampling_timesteps(diffusion, sampler, 5)[1:])
    assert y0.shape == (3, 1, 8, 8) and frames.shape[1:] == (3, 1, 8, 8) and torch.isfinite(y0).all()
