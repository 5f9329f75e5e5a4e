"""Public tests of ddpm.py and the test loop: properties that follow from the sheets (shapes, statistics, the closed
form against the iterated chain, determinism). They hold no solution; the grade comes from the tutors' checks.

The network is tests/conftest.py's StubNetwork, eps(y, t, c) = 0.5 y + t + c . k: the tests call it themselves
where they need its prediction. Select one task's tests with --task TASK_ID.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ddpm
import training
from ddpm import DDPM
from lab.generation import sampling_model
from lab.image_data import ImageSet
from lab.train_config import TrainConfig
from tests.conftest import StubNetwork

KEYS = {"sqrt_beta_t", "alpha_t", "alpha_bar_t", "one_over_sqrt_alpha_t", "sqrt_alpha_bar_t",
        "sqrt_one_minus_alpha_bar_t", "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"}


def small_ddpm(T=20, beta1=0.01, beta2=0.2, **kwargs) -> DDPM:
    return DDPM(StubNetwork(), beta1, beta2, T, device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet1-schedule")
def test_schedule_has_the_keys_of_the_file_indexed_by_t():
    terms = ddpm.ddpm_schedule(1e-4, 0.02, 400)
    assert KEYS <= set(terms)
    assert all(terms[key].shape == (401,) and torch.isfinite(terms[key]).all() for key in KEYS)
    assert terms["alpha_bar_t"][0] == 1 and terms["sqrt_beta_t"][0] == 0      # t = 0: no noise
    assert terms["sqrt_beta_t"][1] ** 2 == pytest.approx(1e-4) and terms["sqrt_beta_t"][400] ** 2 == pytest.approx(0.02)


@pytest.mark.task("sheet1-schedule")
def test_schedule_terms_agree_with_each_other():
    """alpha_bar_t / alpha_bar_(t-1) = alpha_t, the products of the sheet's notation, and 1 - alpha_t = beta_t."""
    terms = {key: value.double() for key, value in ddpm.ddpm_schedule(1e-4, 0.02, 50).items()}
    ratio = terms["alpha_bar_t"][1:] / terms["alpha_bar_t"][:-1]
    torch.testing.assert_close(ratio, terms["alpha_t"][1:], rtol=1e-6, atol=0)
    torch.testing.assert_close(1 - terms["alpha_t"], terms["sqrt_beta_t"] ** 2, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(terms["sqrt_alpha_bar_t"] ** 2 + terms["sqrt_one_minus_alpha_bar_t"] ** 2,
                               torch.ones(51, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (terms["alpha_bar_t"].diff() < 0).all()


@pytest.mark.task("sheet2-cosine-schedule")
def test_cosine_schedule_rises_to_its_clip():
    betas = ddpm.cosine_beta_schedule(400)
    assert betas.shape == (400,) and (betas > 0).all() and (betas <= 0.999).all()
    assert (betas.diff() >= 0).all() and betas[-1].item() == pytest.approx(0.999)
    assert betas[0].item() < 1e-3


@pytest.mark.task("sheet2-sigmoid-schedule")
def test_sigmoid_schedule_rises_from_start_to_end_through_the_middle():
    betas = ddpm.sigmoid_beta_schedule(1e-4, 0.02, 400)
    assert betas.shape == (400,) and (betas.diff() > 0).all()
    assert 1e-4 < betas[0] < 0.001 and 0.019 < betas[-1] < 0.02
    assert betas[199].item() == pytest.approx((1e-4 + 0.02) / 2, rel=1e-6)     # t = T/2: sigmoid(0) = 1/2


# --------------------------------------------------------------------------------------------------------------
# The forward process and the losses
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-q-sample")
def test_closed_form_matches_the_iterated_chain():
    """q_sample at t has the mean and spread of t steps of sheet 2's eq. 3, x_t = sqrt(1 - beta_t) x_(t-1) +
    sqrt(beta_t) eps, started at the same y_0."""
    model = small_ddpm(T=20)
    torch.manual_seed(0)
    n, t = 20000, 13
    y0 = torch.full((n, 1, 1, 1), 0.8)
    closed = model.q_sample(y0, torch.full((n,), t, dtype=torch.long))
    chain = y0.clone()
    for step in range(1, t + 1):
        beta = model.sqrt_beta_t[step] ** 2
        chain = torch.sqrt(1 - beta) * chain + torch.sqrt(beta) * torch.randn_like(chain)
    assert closed.mean().item() == pytest.approx(chain.mean().item(), abs=0.03)
    assert closed.std().item() == pytest.approx(chain.std().item(), rel=0.03)


@pytest.mark.task("sheet2-q-sample")
def test_q_sample_is_deterministic_given_the_noise_and_keeps_the_shape():
    model = small_ddpm()
    y0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([1, 5, 10, 20])
    first = model.q_sample(y0, t, noise)
    assert first.shape == y0.shape and torch.equal(first, model.q_sample(y0, t, noise))
    assert (model.q_sample(y0, t[[0]].repeat(4), noise) - y0).abs().max() < (first - y0).abs().max()


@pytest.mark.task("sheet2-p-losses")
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_p_losses_is_a_trainable_scalar(loss_type):
    model = small_ddpm()
    loss = model.p_losses(torch.randn(4, 1, 3, 3), torch.tensor([1, 5, 10, 20]), torch.eye(10)[:4],
                          loss_type=loss_type)
    assert loss.dim() == 0 and loss.item() >= 0 and loss.requires_grad


@pytest.mark.task("sheet2-p-losses")
def test_a_perfect_noise_prediction_has_zero_loss():
    noise = torch.randn(3, 1, 2, 2)
    model = DDPM(lambda y, t, c: noise.clone(), 0.01, 0.2, 10, device="cpu")
    for loss_type in ("l2", "l1"):
        loss = model.p_losses(torch.randn(3, 1, 2, 2), torch.tensor([1, 4, 10]), torch.eye(10)[:3], noise, loss_type)
        assert loss.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.task("sheet1-algorithm1")
def test_training_loss_is_a_trainable_scalar_that_varies_with_the_draws():
    model = small_ddpm()
    y, c = torch.rand(16, 1, 4, 4) * 2 - 1, torch.eye(10)[torch.arange(16) % 10]
    torch.manual_seed(0)
    first = model(y, c)
    assert first.dim() == 0 and torch.isfinite(first) and first.requires_grad
    torch.manual_seed(1)
    assert model(y, c).item() != first.item()


@pytest.mark.task("sheet1-algorithm1")
def test_dropping_every_class_vector_shows_the_network_only_the_null_class():
    seen = []

    def network(y, t, c):
        seen.append(c.clone())
        return torch.zeros_like(y)

    DDPM(network, 0.01, 0.2, 10, device="cpu", drop_prob=1.0)(torch.randn(8, 1, 2, 2), torch.eye(10)[:8])
    assert seen and all((c == 0).all() for c in seen)


# --------------------------------------------------------------------------------------------------------------
# Guidance, the reverse step and sampling
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-guidance")
def test_guidance_weight_0_is_the_conditional_and_minus_1_the_unconditional_prediction():
    stub = StubNetwork()
    model = DDPM(stub, 1e-4, 0.02, 50, device="cpu")
    y, c = torch.randn(3, 1, 2, 2), torch.eye(10)[[2, 5, 9]]
    t_input = torch.full((3, 1, 1, 1), 17 / 50)
    with torch.no_grad():
        conditional, unconditional = stub(y, t_input, c), stub(y, t_input, torch.zeros_like(c))
        torch.testing.assert_close(model.guided_noise(y, 17, c, 0.0), conditional)
        torch.testing.assert_close(model.guided_noise(y, 17, c, -1.0), unconditional)
        steps = [model.guided_noise(y, 17, c, w) for w in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(steps[1] - steps[0], steps[2] - steps[1])       # linear in w


@pytest.mark.task("sheet2-p-sample")
def test_the_last_reverse_step_is_deterministic_and_the_others_are_not():
    model = small_ddpm(T=20)
    y, c = torch.randn(8, 1, 2, 2), torch.eye(10)[torch.arange(8)]
    with torch.no_grad():
        assert torch.equal(model.p_sample(y, 1, c, 1.0), model.p_sample(y, 1, c, 1.0))
        first, second = model.p_sample(y, 7, c, 1.0), model.p_sample(y, 7, c, 1.0)
    assert first.shape == y.shape and not torch.equal(first, second)


@pytest.mark.task("sheet1-algorithm2")
def test_sampling_returns_images_and_frames_and_repeats_under_a_seed():
    model = small_ddpm(T=12)
    torch.manual_seed(3)
    y0, frames = model.sample(n_sample=2, size=(1, 4, 4), g_weight=1.0)
    assert y0.shape == (20, 1, 4, 4) and torch.isfinite(y0).all()
    assert frames.shape == (len(ddpm.frame_timesteps(12)), 20, 1, 4, 4)
    torch.testing.assert_close(torch.from_numpy(frames[-1]), y0)               # the last frame is y_0
    torch.manual_seed(3)
    again, _ = model.sample(n_sample=2, size=(1, 4, 4), g_weight=1.0)
    torch.testing.assert_close(again, y0)


# --------------------------------------------------------------------------------------------------------------
# The test loop (sheet 2, 2.2 e)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-test-loop")
def test_test_loss_is_a_repeatable_number():
    config = TrainConfig.for_dataset("mnist", timesteps=20, eval_timesteps=5, image_size=4, beta1=0.01, beta2=0.2)
    model = sampling_model(StubNetwork(), dataclasses.asdict(config), torch.device("cpu"))
    images = torch.randint(0, 256, (10, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    test_set = ImageSet(images, torch.arange(10), [str(k) for k in range(10)])
    torch.manual_seed(1)
    first = training.test_loss(model, test_set, config)
    torch.manual_seed(2)
    second = training.test_loss(model, test_set, config)
    assert first["test_loss"] == second["test_loss"] and first["test_loss"] > 0
