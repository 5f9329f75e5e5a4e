"""The DDPM: schedules against their definitions, forward process, reverse step, loss, sampling, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lab.checkpoints import network_from_config, save_checkpoint
from ddpm import (DDPM, classifier_free_guidance, cosine_beta_schedule,
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
    torch.testing.assert_close(terms["one_over_sqrt_alpha_t"].double(), 1 / alpha.sqrt())
    coefficient = terms["one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"]
    torch.testing.assert_close(coefficient[1:].double(), (1 - alpha[1:]) / (1 - terms["alpha_bar_t"].double()[1:]).sqrt())


def test_schedule_terms_are_buffers_of_the_model_and_readable_on_it():
    model = make(timesteps=10)
    buffers = dict(model.named_buffers())
    assert KEYS <= set(buffers)
    for key in KEYS:
        assert getattr(model, key) is buffers[key] and buffers[key].dtype == torch.float32
    assert not KEYS & set(model.state_dict())  # derived, not saved


def test_ddpm_schedule_is_a_method_of_the_class_with_the_sheets_signature():
    terms = DDPM.ddpm_schedule(1e-4, 0.02, 400)
    assert set(terms) == KEYS and make().ddpm_schedule(1e-4, 0.02, 400).keys() == terms.keys()
    torch.testing.assert_close(terms["sqrt_beta_t"][1:] ** 2, torch.linspace(1e-4, 0.02, 400, dtype=torch.float64))


# ---- forward process ---------------------------------------------------------------------------------------------

def test_q_sample_matches_closed_form():
    model = make(timesteps=400)
    terms = ddpm_schedule(1e-4, 0.02, 400)
    y0, noise, t = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4), torch.tensor([1, 2, 100, 399, 400])
    expected = (terms["sqrt_alpha_bar_t"][t].view(-1, 1, 1, 1) * y0
                + terms["sqrt_one_minus_alpha_bar_t"][t].view(-1, 1, 1, 1) * noise).float()
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


# ---- loading ------------------------------------------------------------------------------------------------------

def test_from_checkpoint_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    config = dict(in_channels=1, image_size=8, n_features=8, n_classes=10, timesteps=30, beta1=1e-4, beta2=0.02,
                  schedule="cosine", drop_prob=0.1, loss="l1")
    original = DDPM.from_config(config, network_from_config(config), device="cpu")
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


def test_bad_sample_arguments():
    model = make(timesteps=50)
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
    y0, frames = model.sample(2, (1, 3, 3), 10, 1.0)
    assert y0.shape == (20, 1, 3, 3) and frames.shape == (len(frame_timesteps(20)), 20, 1, 3, 3)


