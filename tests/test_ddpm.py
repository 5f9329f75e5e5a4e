"""The DDPM: schedules against their definitions, forward process, reverse step, loss, sampling, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from checkpoints import save_checkpoint
from ddpm import (DDPM, GaussianDiffusion, classifier_free_guidance, composed_guidance, cosine_beta_schedule,
                  ddpm_schedule, frame_timesteps, linear_beta_schedule, sigmoid_beta_schedule)
from networks.Conditional_UNet import UNet
from tests.conftest import StubNetwork

KEYS = {"sqrt_beta_t", "alpha_t", "alpha_bar_t", "one_over_sqrt_alpha_t", "sqrt_alpha_bar_t",
        "sqrt_one_minus_alpha_bar_t", "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"}


def make(network=None, timesteps=50, **kwargs):
    return DDPM(network if network is not None else StubNetwork(), n_timesteps=timesteps, device="cpu", **kwargs)


# ---- schedules -------------------------------------------------------------------------------------------------

def test_linear_schedule_end_points_and_spacing():
    betas = linear_beta_schedule(1e-4, 0.02, 400)
    assert betas.shape == (400,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((399,), (0.02 - 1e-4) / 399, dtype=torch.float64))


def test_cosine_schedule_follows_nichol_dhariwal_with_clip():
    T, s = 400, 0.008
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = [min(1 - (f[t] / f[0]) / (f[t - 1] / f[0]), 0.999) for t in range(1, T + 1)]
    betas = cosine_beta_schedule(T)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-10)
    assert betas.max().item() == pytest.approx(0.999)  # the clip is active at t = T, where alpha_bar(T) = 0


def test_sigmoid_schedule_is_sheet_equation_10():
    T, start, end, s_limit = 400, 1e-4, 0.02, 6.0
    betas = sigmoid_beta_schedule(start, end, T, s_limit)
    for t in (1, 137, 200, 400):
        sigmoid = 1 / (1 + math.exp(-(-s_limit + 2 * t * s_limit / T)))
        assert betas[t - 1].item() == pytest.approx(start + sigmoid * (end - start), rel=1e-12)
    assert (betas.diff() > 0).all()
    assert betas[0].item() == pytest.approx(start, abs=0.01 * (end - start))
    assert betas[-1].item() == pytest.approx(end, abs=0.01 * (end - start))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_schedule_dictionary_terms(schedule):
    terms = ddpm_schedule(1e-4, 0.02, 400, schedule)
    assert set(terms) == KEYS
    assert all(value.shape == (401,) and torch.isfinite(value).all() for value in terms.values())
    beta = terms["sqrt_beta_t"].double() ** 2
    alpha = terms["alpha_t"].double()
    assert beta[0] == 0 and alpha[0] == 1 and terms["alpha_bar_t"][0] == 1
    torch.testing.assert_close(alpha, 1 - beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["alpha_bar_t"].double(), torch.cumprod(alpha, 0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["sqrt_alpha_bar_t"] ** 2, terms["alpha_bar_t"])
    torch.testing.assert_close(terms["sqrt_one_minus_alpha_bar_t"] ** 2, 1 - terms["alpha_bar_t"], atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["one_over_sqrt_alpha_t"], 1 / alpha.sqrt().float())
    coefficient = terms["one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"]
    torch.testing.assert_close(coefficient[1:], ((1 - alpha[1:]) / (1 - terms["alpha_bar_t"].double()[1:]).sqrt()).float())


def test_schedule_terms_are_buffers_of_the_model_and_readable_on_it():
    model = make(timesteps=10)
    buffers = dict(model.named_buffers())
    assert {f"diffusion.{key}" for key in KEYS} <= set(buffers)
    for key in KEYS:
        assert getattr(model, key) is buffers[f"diffusion.{key}"]
    assert not any(key.startswith("diffusion.") for key in model.state_dict())  # derived, not saved


# ---- forward process ---------------------------------------------------------------------------------------------

def test_q_sample_matches_closed_form():
    model = make(timesteps=400)
    terms = ddpm_schedule(1e-4, 0.02, 400)
    y0, noise, t = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4), torch.tensor([1, 2, 100, 399, 400])
    expected = (terms["sqrt_alpha_bar_t"][t].view(-1, 1, 1, 1) * y0
                + terms["sqrt_one_minus_alpha_bar_t"][t].view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(model.q_sample(y0, t, noise), expected)


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_q_sample_has_the_distribution_of_the_iterated_markov_chain(schedule):
    """Eq. 1 applied t times gives the same mean and std as the closed form of eq. 3."""
    torch.manual_seed(0)
    T, t, n = 100, 60, 40_000
    model = make(timesteps=T, beta1=1e-3, beta2=0.05, schedule=schedule)
    betas = model.sqrt_beta_t.double() ** 2
    y0 = torch.tensor([0.9, -0.4, 0.0]).view(1, 3, 1, 1).double()
    chain = y0.expand(n, 3, 1, 1).clone()
    for step in range(1, t + 1):
        chain = torch.sqrt(1 - betas[step]) * chain + torch.sqrt(betas[step]) * torch.randn_like(chain)
    closed = model.q_sample(y0.float().expand(n, 3, 1, 1), torch.full((n,), t)).double()
    torch.testing.assert_close(chain.mean(0), closed.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(chain.std(0), closed.std(0), atol=0.02, rtol=0)
    expected_mean = model.sqrt_alpha_bar_t[t].double() * y0[0]
    torch.testing.assert_close(closed.mean(0), expected_mean, atol=0.02, rtol=0)


# ---- loss -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_p_losses_against_hand_computation(loss_type):
    stub = StubNetwork()
    model = make(stub, timesteps=20)
    y0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t, c = torch.tensor([1, 5, 10, 20]), torch.eye(10)[:4]
    y_t = model.sqrt_alpha_bar_t[t].view(-1, 1, 1, 1) * y0 + model.sqrt_one_minus_alpha_bar_t[t].view(-1, 1, 1, 1) * noise
    error = noise - stub.expected(y_t, (t / 20).view(-1, 1, 1, 1), c)
    expected = error.abs().mean() if loss_type == "l1" else (error ** 2).mean()
    torch.testing.assert_close(model.p_losses(y0, t, c, noise, loss_type=loss_type), expected)


def test_forward_drops_about_ten_percent_of_the_labels():
    torch.manual_seed(0)
    stub = StubNetwork()
    model = make(stub, timesteps=10, drop_prob=0.1)
    n = 20_000
    c = torch.nn.functional.one_hot(torch.randint(0, 10, (n,)), 10).float()
    loss = model(torch.randn(n, 1, 1, 1), c)
    assert loss.dim() == 0 and loss.requires_grad
    seen = stub.seen_classes[-1]
    dropped = (seen.abs().sum(1) == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.01)
    kept = seen.abs().sum(1) > 0
    torch.testing.assert_close(seen[kept], c[kept])  # kept labels pass through unchanged


def test_forward_draws_every_timestep_uniformly():
    torch.manual_seed(0)
    stub = StubNetwork()
    model = make(stub, timesteps=4, drop_prob=0.0)
    seen_t = []
    original = stub.forward
    stub.forward = lambda y, t, c: (seen_t.append(t.flatten().clone()), original(y, t, c))[1]
    model(torch.randn(8000, 1, 1, 1), torch.eye(10)[torch.zeros(8000, dtype=torch.long)])
    counts = torch.bincount((torch.cat(seen_t) * 4).round().long(), minlength=5)
    assert counts[0] == 0  # t = 0 is never drawn
    assert all(abs(count / 8000 - 0.25) < 0.02 for count in counts[1:].tolist())


# ---- reverse step --------------------------------------------------------------------------------------------

def _hand_reverse_step(model, stub, y, t, c, w, z):
    T = model.n_timesteps
    eps_c = stub.expected(y, t / T, c)
    eps_u = stub.expected(y, t / T, torch.zeros_like(c))
    guided = (1 + w) * eps_c - w * eps_u                                   # eq. 5
    beta = 1 - model.alpha_t[t]
    mean = (y - beta / torch.sqrt(1 - model.alpha_bar_t[t]) * guided) / torch.sqrt(model.alpha_t[t])  # eq. 4
    return mean + torch.sqrt(beta) * z


@pytest.mark.parametrize("w", [1.0, 3.0, -0.5, 1e-3])
def test_guided_reverse_step_follows_equations_4_and_5(w):
    stub = StubNetwork()
    model = make(stub, timesteps=50)
    y, c, t = torch.randn(3, 1, 2, 2), torch.eye(10)[[2, 5, 9]], 17
    torch.manual_seed(1)
    result = model.p_sample(y, t, c, w)
    torch.manual_seed(1)
    z = torch.randn_like(y)
    torch.testing.assert_close(result, _hand_reverse_step(model, stub, y, t, c, w, z))
    assert stub.calls == [6]  # conditional and unconditional halves in one doubled call
    assert (stub.seen_classes[0][3:] == 0).all()


def test_without_guidance_the_step_is_the_plain_conditional_step():
    stub = StubNetwork()
    model = make(stub, timesteps=50)
    y, c = torch.randn(2, 1, 2, 2), torch.eye(10)[[1, 4]]
    torch.manual_seed(3)
    result = model.p_sample(y, 30, c, 0.0)
    torch.manual_seed(3)
    z = torch.randn_like(y)
    eps = stub.expected(y, 30 / 50, c)
    mean = model.one_over_sqrt_alpha_t[30] * (y - model.one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t[30] * eps)
    torch.testing.assert_close(result, mean + model.sqrt_beta_t[30] * z)
    assert stub.calls == [2]  # w = 0 gives the unconditional term weight 0: its copy is skipped


def test_last_step_adds_no_noise():
    model = make(timesteps=50)
    y, c = torch.randn(2, 1, 2, 2), torch.eye(10)[:2]
    first, second = model.p_sample(y, 1, c, 2.0), model.p_sample(y, 1, c, 2.0)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, _hand_reverse_step(model, model.nn_model, y, 1, c, 2.0, torch.zeros_like(y)))


def test_equation_5_combines_conditional_and_unconditional_noise():
    conditional, unconditional = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for w in (0.0, 1.0, 3.0, -0.5):
        torch.testing.assert_close(classifier_free_guidance(conditional, unconditional, w),
                                   (1 + w) * conditional - w * unconditional)
    torch.testing.assert_close(classifier_free_guidance(conditional, 0.0, 0.0), conditional)


def test_composed_guidance_towards_a_mixture():
    stub = StubNetwork()
    model = make(stub, timesteps=50)
    y, w = torch.randn(2, 1, 2, 2), 2.0
    three, eight = torch.eye(10)[[3, 3]], torch.eye(10)[[8, 8]]
    guided = model.diffusion.guided_noise(stub, y, 10, torch.stack([three, eight]), w, (0.4, 0.6))
    eps_u = stub.expected(y, 10 / 50, torch.zeros(2, 10))
    eps_3, eps_8 = stub.expected(y, 0.2, three), stub.expected(y, 0.2, eight)
    expected = eps_u + (1 + w) * (0.4 * (eps_3 - eps_u) + 0.6 * (eps_8 - eps_u))
    torch.testing.assert_close(guided, expected)
    assert stub.calls == [6]
    torch.testing.assert_close(composed_guidance(torch.stack([eps_3]), eps_u, w, (1.0,)),
                               classifier_free_guidance(eps_3, eps_u, w))


# ---- sampling -----------------------------------------------------------------------------------------------------

def test_sample_orders_classes_fastest_with_one_doubled_call_per_step():
    stub = StubNetwork()
    model = make(stub, timesteps=400)
    y0, frames = model.sample(n_sample=2, size=(1, 2, 2), n_classes=10, g_weight=1.0)
    assert y0.shape == (20, 1, 2, 2)
    assert frames.shape == (27, 20, 1, 2, 2) and isinstance(frames, np.ndarray)
    assert stub.calls == [40] * 400
    classes = stub.seen_classes[0]
    assert classes[:20].argmax(1).tolist() == list(range(10)) * 2
    assert (classes[20:] == 0).all()
    np.testing.assert_allclose(frames[-1], y0.numpy())
    assert model.training  # the training mode is restored after sampling


def test_frame_rule():
    assert len(frame_timesteps(400)) == 27
    assert frame_timesteps(400)[:2] == [400, 380] and frame_timesteps(400)[-7:] == [7, 6, 5, 4, 3, 2, 1]
    assert frame_timesteps(50) == [50, 40, 20, 7, 6, 5, 4, 3, 2, 1]


def test_sample_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = make(UNet(1, 8, 10, 8), timesteps=20)
    torch.manual_seed(7)
    first, _ = model.sample(1, (1, 8, 8), 10, 2.0)
    torch.manual_seed(7)
    second, _ = model.sample(1, (1, 8, 8), 10, 2.0)
    torch.testing.assert_close(first, second)
    torch.manual_seed(8)
    third, _ = model.sample(1, (1, 8, 8), 10, 2.0)
    assert not torch.allclose(first, third)


# ---- DDIM -------------------------------------------------------------------------------------------------------------

def test_ddim_step_follows_its_equations():
    stub = StubNetwork()
    model = make(stub, timesteps=100)
    y, eps = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t, t_prev, eta = 60, 40, 0.7
    a, a_prev = model.alpha_bar_t[t].double(), model.alpha_bar_t[t_prev].double()
    torch.manual_seed(5)
    result = model.diffusion.ddim_step(y, t, t_prev, eps, eta)
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
        result = model.diffusion.ddim_step(y, t, t - 1, eps, eta=1.0)
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
            y = model.diffusion.ddim_step(y, t, t_prev, model.diffusion.guided_noise(stub, y, t, torch.eye(10), 1.0), 0.0)
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1])
    stub.calls.clear()
    _, frames = model.sample(1, (1, 2, 2), 10, 1.0, sampler="ddim", steps=50)
    assert len(stub.calls) == 50 and frames.shape[0] == 50


# ---- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_clipping_keeps_the_noise_of_an_in_range_start(schedule):
    model = make(schedule=schedule)
    torch.manual_seed(0)
    y0, eps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    for t in (1, 25, 50):
        y_t = model.q_sample(y0, torch.full((4,), t), eps)
        assert torch.allclose(model.diffusion.predict_start_from_noise(y_t, t, eps), y0, atol=1e-3 if t < 50 else 1.0)
        if t < 50:   # at t = T the cosine alpha_bar is ~0 and y_0 is not recoverable in float32
            assert torch.allclose(model.diffusion.noise_for_clipped_start(y_t, t, eps), eps, atol=1e-4)


def test_clipped_step_is_the_posterior_mean_at_the_clipped_start():
    """Algorithm 2 with eps' = posterior mean of q(y_{t-1} | y_t, y_0) (Ho et al. eq. 7) at clip(y0^)."""
    model = make(schedule="cosine")
    torch.manual_seed(1)
    y_t, eps = torch.randn(3, 1, 4, 4) * 3, torch.randn(3, 1, 4, 4)
    for t in (2, 30, 50):
        clipped_noise = model.diffusion.noise_for_clipped_start(y_t, t, eps)
        start = model.diffusion.predict_start_from_noise(y_t, t, eps).clamp(-1, 1)
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
    torch.manual_seed(0)
    plain, _ = model.sample(1, (1, 4, 4), 10, 1.0, sampler=sampler, steps=10 if sampler == "ddim" else None)
    torch.manual_seed(0)
    clipped, _ = model.sample(1, (1, 4, 4), 10, 1.0, sampler=sampler, steps=10 if sampler == "ddim" else None,
                              clip_denoised=True)
    assert plain.abs().max() > 10
    assert clipped.abs().max() <= 1 + 1e-4


def test_from_checkpoint_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    config = dict(in_channels=1, image_size=8, n_features=8, n_classes=10, timesteps=30, beta1=1e-4, beta2=0.02,
                  schedule="cosine", drop_prob=0.1, loss="l1")
    original = DDPM.from_config(config, device="cpu")
    path = tmp_path / "model_ep1.pth"
    save_checkpoint(dict(model=original.nn_model.state_dict(), ema=None, optimizer={}, epoch=1, config=config,
                         losses=[]), str(path))
    loaded = DDPM.from_checkpoint(str(path), device="cpu")
    assert (loaded.n_timesteps, loaded.schedule, loaded.loss_type) == (30, "cosine", "l1")
    x, t, c = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 1, 1), torch.eye(10)[:2]
    torch.testing.assert_close(loaded.nn_model(x, t, c), original.eval().nn_model(x, t, c))


# ---- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    (dict(schedule="quadratic"), "linear.*cosine.*sigmoid"),
    (dict(beta1=0.0), "beta1 and beta2"),
    (dict(beta2=1.5), "beta1 and beta2"),
    (dict(beta1=0.02, beta2=1e-4), "increasing"),
    (dict(timesteps=0), "n_timesteps"),
    (dict(loss_type="huber"), "l2.*l1"),
    (dict(drop_prob=1.5), "drop_prob"),
])
def test_bad_model_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make(**kwargs)


def test_timesteps_outside_range_are_refused():
    model = make(timesteps=50)
    y, c = torch.randn(2, 1, 2, 2), torch.eye(10)[:2]
    with pytest.raises(ValueError, match="1..50"):
        model.q_sample(y, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="1..50"):
        model.p_losses(y, torch.tensor([5, 51]), c)
    for t in (0, 51, 2.5):
        with pytest.raises(ValueError, match="1..T"):
            model.p_sample(y, t, c, 1.0)
    with pytest.raises(ValueError, match="l2.*l1"):
        model.p_losses(y, torch.tensor([1, 2]), c, loss_type="l3")


def test_bad_sampler_arguments():
    model = make(timesteps=50)
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpm"):
        model.sample(1, (1, 2, 2), 10, sampler="euler")
    with pytest.raises(ValueError, match="logsnr.*time"):
        model.diffusion.sample(model.nn_model, torch.eye(10), 1.0, (1, 2, 2), sampler="dpm++2m", steps=5,
                               spacing="karras")
    with pytest.raises(ValueError, match="steps"):
        model.sample(1, (1, 2, 2), 10, sampler="ddim", steps=51)
    with pytest.raises(ValueError, match="n_classes"):
        model.sample(1, (1, 2, 2), 7)


# ---- a network that is only forward(x, t, c) -------------------------------------------------------------------

class BareNetwork(torch.nn.Module):
    """Nothing but forward(x, t, c): no n_classes, in_channels or any other attribute."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, c):
        return self.scale * x + t.view(-1, 1, 1, 1) + c.sum(1).view(-1, 1, 1, 1)


def test_a_bare_network_trains_and_samples_inside_the_ddpm():
    model = make(BareNetwork(), timesteps=20)
    y, c = torch.rand(4, 1, 3, 3) * 2 - 1, torch.eye(10)[:4]
    loss = model(y, c)
    loss.backward()
    assert loss.dim() == 0 and model.nn_model.scale.grad is not None
    assert model.p_sample(torch.randn(4, 1, 3, 3), 5, c, 2.0).shape == (4, 1, 3, 3)
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        y0, frames = model.sample(2, (1, 3, 3), 10, 1.0, sampler=sampler, steps=None if sampler == "ddpm" else 5)
        assert y0.shape == (20, 1, 3, 3) and frames.shape[1:] == (20, 1, 3, 3)


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
    diffusion = GaussianDiffusion(1e-4, 0.02, 1000)
    network, conditions = GaussianDataNoise(diffusion), torch.zeros(64, 10)

    def solve(name, steps, how):
        torch.manual_seed(0)
        return diffusion.sample(network, conditions, 0.0, (1, 1, 1), sampler=name, steps=steps, spacing=how)[0]

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
        first, (predicted_y0, _) = model.diffusion.dpm_solver_step(y, t, t_prev, eps, previous=None)
        torch.testing.assert_close(first, model.diffusion.ddim_step(y, t, t_prev, eps, eta=0.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predicted_y0, model.diffusion.predict_start_from_noise(y, t, eps))
    last, _ = model.diffusion.dpm_solver_step(y, 7, 0, eps, previous=(torch.zeros_like(y), 0.0))
    torch.testing.assert_close(last, model.diffusion.predict_start_from_noise(y, 7, eps))   # first order at t = 0


def test_dpm_solver_second_step_uses_the_previous_data_prediction():
    diffusion = make(timesteps=100).diffusion
    y, eps, last_y0 = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t_last, t, t_prev = 90, 60, 30
    result, _ = diffusion.dpm_solver_step(y, t, t_prev, eps, previous=(last_y0, diffusion.log_snr(t_last)))
    lam = {s: diffusion.log_snr(s) for s in (t_last, t, t_prev)}
    h, h_last = lam[t_prev] - lam[t], lam[t] - lam[t_last]
    r = h_last / h
    y0 = diffusion.predict_start_from_noise(y, t, eps).double()
    data = (1 + 1 / (2 * r)) * y0 - 1 / (2 * r) * last_y0.double()
    sigma = lambda s: (1 - diffusion.alpha_bar_t[s].double()).sqrt()  # noqa: E731
    alpha = lambda s: diffusion.alpha_bar_t[s].double().sqrt()        # noqa: E731
    expected = sigma(t_prev) / sigma(t) * y.double() - alpha(t_prev) * (math.exp(-h) - 1) * data
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_sde_dpm_solver_step_adds_fresh_noise_to_a_contracted_ode_step():
    diffusion = make(timesteps=100).diffusion
    y, eps, last_y0 = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t_last, t, t_prev, eta = 90, 60, 30, 1.0
    previous = (last_y0, diffusion.log_snr(t_last))
    torch.manual_seed(5)
    result, _ = diffusion.dpm_solver_step(y, t, t_prev, eps, previous, eta)
    torch.manual_seed(5)
    z = torch.randn_like(y)
    lam = {s: diffusion.log_snr(s) for s in (t_last, t, t_prev)}
    h, r = lam[t_prev] - lam[t], (lam[t] - lam[t_last]) / (lam[t_prev] - lam[t])
    y0 = diffusion.predict_start_from_noise(y, t, eps).double()
    data = (1 + 1 / (2 * r)) * y0 - 1 / (2 * r) * last_y0.double()
    sigma = lambda s: (1 - diffusion.alpha_bar_t[s].double()).sqrt()  # noqa: E731
    alpha = lambda s: diffusion.alpha_bar_t[s].double().sqrt()        # noqa: E731
    expected = (sigma(t_prev) / sigma(t) * math.exp(-h) * y.double() + alpha(t_prev) * (1 - math.exp(-2 * h)) * data
                + sigma(t_prev) * math.sqrt(1 - math.exp(-2 * h)) * z.double())
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)
    deterministic, _ = diffusion.dpm_solver_step(y, t, t_prev, eps, previous, eta=0.0)
    ode, _ = diffusion.dpm_solver_step(y, t, t_prev, eps, previous)
    torch.testing.assert_close(deterministic, ode)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_samples_the_data_distribution_with_an_ideal_noise_predictor(eta):
    """With the exact eps of y_0 ~ N(0.3, 0.5^2), 20 steps of the ODE and of the SDE solver draw from it."""
    diffusion = GaussianDiffusion(1e-4, 0.02, 400)
    torch.manual_seed(6)
    samples = diffusion.sample(GaussianDataNoise(diffusion), torch.zeros(20000, 10), 0.0, (1, 1, 1),
                               sampler="dpm++2m", steps=20, eta=eta)[0].double()
    assert samples.mean().item() == pytest.approx(0.3, abs=0.02)
    assert samples.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_log_snr_timesteps_descend_from_T_to_zero_without_repeats(schedule):
    diffusion = GaussianDiffusion(1e-4, 0.02, 400, schedule)
    for steps in (5, 10, 20, 25):
        timesteps = diffusion.sampling_timesteps("dpm++2m", steps)
        assert timesteps[0] == 400 and timesteps[-1] == 0 and timesteps[-2] == 1
        assert timesteps == sorted(set(timesteps), reverse=True) and len(timesteps) - 1 <= steps
    assert diffusion.sampling_timesteps("dpm++2m", 10, "time") == list(range(400, -1, -40))


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_samples_are_deterministic_with_composed_guidance(clip):
    stub = StubNetwork()
    diffusion = make(stub, timesteps=50, schedule="cosine").diffusion
    conditions = torch.stack([torch.eye(10)[[3, 3]], torch.eye(10)[[8, 8]]])
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        runs.append(diffusion.sample(stub, conditions, 2.0, (1, 2, 2), (0.5, 0.5), "dpm++2m", 8, clip_denoised=clip,
                                     keep=[0])[0])
    torch.testing.assert_close(runs[0], runs[1])
    assert runs[0].shape == (2, 1, 2, 2) and torch.isfinite(runs[0]).all()
    assert set(stub.calls) == {6}                                     # 2 conditional copies + 1 unconditional
    if clip:
        assert runs[0].abs().max() <= 1 + 1e-4
