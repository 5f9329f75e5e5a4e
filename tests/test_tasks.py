"""Graded tests of the diffusion tasks of ddpm.py and training.py (staff/grade.py), one task per test.

Each test grades one task and is independent of every other task's solution: in the handout, where every solution
region raises NotImplementedError, a test stops at the stub of its own task. So a test calls the code it grades
first, builds its expected values from formulas written here, and replaces the other tasks' methods by the
closed forms of this file (``monkeypatch``): the schedule terms of ``DDPM.ddpm_schedule`` come from ``terms_of``
below, ``q_sample``, ``p_losses``, ``guided_noise`` and ``p_sample`` from the ``*_by_hand`` functions.
The DDPM's noise predictor is the stub of tests/conftest.py, eps(y, t, c) = 0.5 y + t + c . k with k = 1..n_classes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import pytest
import torch

import ddpm
import training
from ddpm import DDPM
from lab.generation import sampling_model
from lab.image_data import ImageSet
from lab.train_config import TrainConfig
from tests.conftest import StubNetwork

SCHEDULE_KEYS = {"sqrt_beta_t", "alpha_t", "alpha_bar_t", "one_over_sqrt_alpha_t", "sqrt_alpha_bar_t",
                 "sqrt_one_minus_alpha_bar_t", "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"}


# ----------------------------------------------------------------------------------------------------------------
# Closed forms written here, and the helpers that put them in place of the other tasks' code
# ----------------------------------------------------------------------------------------------------------------

def terms_of(betas: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The schedule terms of S1 eqs. 3-5 for betas [beta_1..beta_T], float32 [T + 1], entry 0 noise-free."""
    beta = torch.cat((torch.zeros(1, dtype=torch.float64), betas.double()))
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    coefficient = torch.zeros_like(beta)
    coefficient[1:] = beta[1:] / torch.sqrt(1 - alpha_bar[1:])
    terms = {"sqrt_beta_t": beta.sqrt(), "alpha_t": alpha, "alpha_bar_t": alpha_bar,
             "one_over_sqrt_alpha_t": 1 / alpha.sqrt(), "sqrt_alpha_bar_t": alpha_bar.sqrt(),
             "sqrt_one_minus_alpha_bar_t": (1 - alpha_bar).sqrt(),
             "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t": coefficient}
    return {name: value.float() for name, value in terms.items()}


def linear_terms(beta1: float, beta2: float, n_timesteps: int, schedule: str = "linear") -> Dict[str, torch.Tensor]:
    """Stands in for ``DDPM.ddpm_schedule``: the terms of the linear schedule beta1..beta2 (T values)."""
    return terms_of(torch.linspace(beta1, beta2, n_timesteps, dtype=torch.float64))


def use_hand_schedule(monkeypatch) -> None:
    """Make every DDPM built from now on take its schedule terms from ``terms_of`` (not the student's
    ddpm_schedule)."""
    monkeypatch.setattr(DDPM, "ddpm_schedule", staticmethod(linear_terms))


def ddpm_with_hand_schedule(monkeypatch, n_timesteps: int, beta1: float = 1e-4, beta2: float = 0.02,
                            network=None, **kwargs) -> DDPM:
    """A DDPM on the CPU around ``network`` (default: the stub) whose schedule terms come from ``terms_of``;
    ``kwargs`` go to DDPM (drop_prob, loss_type)."""
    use_hand_schedule(monkeypatch)
    network = StubNetwork() if network is None else network
    return DDPM(network, beta1, beta2, n_timesteps, device="cpu", **kwargs)


def column(values: torch.Tensor, t) -> torch.Tensor:
    """values[t] as [N, 1, 1, 1] (t a LongTensor [N]) or as a number (t an int)."""
    return values[t].view(-1, 1, 1, 1) if isinstance(t, torch.Tensor) else values[t]


def diffuse_by_hand(terms, y0, t, noise):
    """S1 eq. 3: y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps."""
    return column(terms["sqrt_alpha_bar_t"], t) * y0 + column(terms["sqrt_one_minus_alpha_bar_t"], t) * noise


def noise_loss_by_hand(predicted, noise, loss_type):
    error = noise - predicted
    return error.abs().mean() if loss_type == "l1" else (error ** 2).mean()


def reverse_step_by_hand(terms, y, t, eps, z):
    """S1 eq. 4: 1 / sqrt(alpha_t) (y_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sqrt(beta_t) z."""
    alpha, alpha_bar = terms["alpha_t"][t].double(), terms["alpha_bar_t"][t].double()
    beta = 1 - alpha
    mean = (y.double() - beta / torch.sqrt(1 - alpha_bar) * eps.double()) / torch.sqrt(alpha)
    return (mean + torch.sqrt(beta) * z.double()).float()


def q_sample_by_hand(self, y0, t, noise=None):
    """Stands in for ``DDPM.q_sample`` (sheet2-q-sample): eq. 3 with the DDPM's schedule terms."""
    noise = torch.randn_like(y0) if noise is None else noise
    return diffuse_by_hand(dict(self.named_buffers()), y0, t, noise)


def use_hand_q_sample(monkeypatch) -> None:
    monkeypatch.setattr(DDPM, "q_sample", q_sample_by_hand)


def use_hand_forward_process(monkeypatch) -> None:
    """Replace ``q_sample`` (sheet2-q-sample) and ``p_losses`` (sheet2-p-losses) by the closed forms."""
    def p_losses(self, y0, t, c, noise=None, loss_type="l2"):
        noise = torch.randn_like(y0) if noise is None else noise
        y_t = diffuse_by_hand(dict(self.named_buffers()), y0, t, noise)
        predicted = self.nn_model(y_t, (t.float() / self.n_timesteps).view(-1, 1, 1, 1), c).float()
        return noise_loss_by_hand(predicted, noise, loss_type)

    use_hand_q_sample(monkeypatch)
    monkeypatch.setattr(DDPM, "p_losses", p_losses)


def use_guided_noise(monkeypatch, guided) -> None:
    """Replace ``guided_noise`` (sheet2-guidance) by ``guided(y_t, t, c, w)``."""
    monkeypatch.setattr(DDPM, "guided_noise", lambda self, y_t, t, c, w: guided(y_t, t, c, w))


class RecordingStub(StubNetwork):
    """The stub network, also recording every call's inputs (y_t, t / T as [N], c)."""

    def __init__(self, n_classes: int = 10):
        super().__init__(n_classes)
        self.inputs: List[tuple] = []

    def forward(self, y, t, c):
        self.inputs.append((y.detach().clone(), t.detach().reshape(-1).clone().expand(y.shape[0]),
                            c.detach().clone()))
        return super().forward(y, t, c)

    def all_inputs(self):
        """(y_t, t / T, c) of every call, concatenated over the calls."""
        return tuple(torch.cat(parts) for parts in zip(*self.inputs))


def recovered_noise(terms, y0, y_t, t):
    """The eps of eq. 3 that gives y_t from y_0 at t (t a LongTensor [N])."""
    return (y_t.double() - column(terms["sqrt_alpha_bar_t"], t).double() * y0.double()) \
        / column(terms["sqrt_one_minus_alpha_bar_t"], t).double()


def stub_noise(stub, y_t, t_fraction, c):
    """What the stub predicts for inputs (y_t, t / T [N], c), in float64."""
    return stub.expected(y_t.double(), t_fraction.double().view(-1, 1, 1, 1), c.double())


# ----------------------------------------------------------------------------------------------------------------
# sheet2-cosine-schedule, sheet2-sigmoid-schedule
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-cosine-schedule")
@pytest.mark.parametrize("n_timesteps", [400, 10])
def test_cosine_schedule_is_nichol_dhariwal_with_the_clip(n_timesteps):
    betas = ddpm.cosine_beta_schedule(n_timesteps)
    T, s = n_timesteps, 0.008
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    alpha_bar = [value / f[0] for value in f]
    expected = [min(1 - alpha_bar[t] / alpha_bar[t - 1], 0.999) for t in range(1, T + 1)]
    assert tuple(betas.shape) == (T,)
    torch.testing.assert_close(betas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert betas[-1].item() == pytest.approx(0.999)     # alpha_bar(T) = 0: beta_T is clipped
    assert (betas > 0).all() and (betas <= 0.999).all()


@pytest.mark.task("sheet2-cosine-schedule")
def test_cosine_schedule_takes_its_offset_and_clip():
    betas = ddpm.cosine_beta_schedule(50, s=0.05, max_beta=0.5)
    T, s = 50, 0.05
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = [min(1 - f[t] / f[t - 1], 0.5) for t in range(1, T + 1)]
    torch.testing.assert_close(betas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.task("sheet2-sigmoid-schedule")
@pytest.mark.parametrize("beta_start, beta_end, n_timesteps, s_limit",
                         [(1e-4, 0.02, 400, None), (1e-3, 0.05, 37, 3.0)])
def test_sigmoid_schedule_is_sheet_equation_10(beta_start, beta_end, n_timesteps, s_limit):
    if s_limit is None:
        betas, s_limit = ddpm.sigmoid_beta_schedule(beta_start, beta_end, n_timesteps), 6.0   # the default
    else:
        betas = ddpm.sigmoid_beta_schedule(beta_start, beta_end, n_timesteps, s_limit)
    T = n_timesteps
    expected = [beta_start + (beta_end - beta_start) / (1 + math.exp(-(-s_limit + 2 * t * s_limit / T)))
                for t in range(1, T + 1)]
    assert tuple(betas.shape) == (T,)
    torch.testing.assert_close(betas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert (betas.diff() > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# sheet1-schedule
# ----------------------------------------------------------------------------------------------------------------

def assert_terms_equal(terms, expected):
    assert set(terms) == SCHEDULE_KEYS
    for name in SCHEDULE_KEYS:
        assert terms[name].shape == expected[name].shape, name
        assert torch.isfinite(terms[name]).all(), name
        torch.testing.assert_close(terms[name].double(), expected[name].double(), rtol=1e-5, atol=1e-7,
                                   msg=lambda message: f"{name}: {message}")


@pytest.mark.task("sheet1-schedule")
def test_linear_schedule_terms_with_a_noise_free_entry_0():
    terms = ddpm.ddpm_schedule(1e-4, 0.02, 400)
    assert_terms_equal(terms, terms_of(torch.linspace(1e-4, 0.02, 400, dtype=torch.float64)))
    assert terms["sqrt_beta_t"][0] == 0 and terms["alpha_t"][0] == 1 and terms["alpha_bar_t"][0] == 1
    assert terms["one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t"][0] == 0
    assert terms["sqrt_beta_t"][1].item() == pytest.approx(math.sqrt(1e-4))       # beta_1 = beta1
    assert terms["sqrt_beta_t"][400].item() == pytest.approx(math.sqrt(0.02))     # beta_T = beta2


@pytest.mark.task("sheet1-schedule")
def test_schedule_terms_follow_any_betas(monkeypatch):
    """The terms are computed from the betas of the chosen schedule (here made-up betas for 'sigmoid')."""
    betas = torch.tensor([0.05, 0.1, 0.3, 0.2, 0.6], dtype=torch.float64)
    monkeypatch.setattr(ddpm, "make_betas", lambda schedule, beta1, beta2, n_timesteps: betas.clone())
    terms = ddpm.ddpm_schedule(1e-4, 0.02, 5, "sigmoid")
    assert_terms_equal(terms, terms_of(betas))
    torch.testing.assert_close(terms["alpha_bar_t"][5].double(), torch.prod(1 - betas), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# sheet2-q-sample
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-q-sample")
def test_q_sample_is_the_closed_form_of_eq_3(monkeypatch):
    model = ddpm_with_hand_schedule(monkeypatch, 400)
    torch.manual_seed(0)
    y0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 2, 100, 399, 400])
    result = model.q_sample(y0, t, noise)
    torch.testing.assert_close(result, diffuse_by_hand(linear_terms(1e-4, 0.02, 400), y0, t, noise))


@pytest.mark.task("sheet2-q-sample")
def test_q_sample_noise_level_grows_with_t(monkeypatch):
    """With few steps and large betas: y_1 is nearly y_0, y_T is dominated by the noise, one timestep per image."""
    model = ddpm_with_hand_schedule(monkeypatch, 4, beta1=0.1, beta2=0.9)
    y0, noise = torch.full((4, 1, 2, 2), 2.0), torch.full((4, 1, 2, 2), -1.0)
    t = torch.tensor([4, 1, 3, 2])
    result = model.q_sample(y0, t, noise)
    terms = linear_terms(0.1, 0.9, 4)
    for row, step in enumerate(t.tolist()):
        a = terms["alpha_bar_t"][step].double()
        expected = math.sqrt(a) * 2.0 - math.sqrt(1 - a)
        torch.testing.assert_close(result[row].double(), torch.full((1, 2, 2), expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# sheet2-p-losses
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-p-losses")
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_p_losses_against_hand_computation(monkeypatch, loss_type):
    stub = StubNetwork()
    model = ddpm_with_hand_schedule(monkeypatch, 20, beta1=0.01, beta2=0.2, network=stub)
    use_hand_q_sample(monkeypatch)
    torch.manual_seed(0)
    y0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t, c = torch.tensor([1, 5, 10, 20]), torch.eye(10)[[3, 0, 9, 4]]
    loss = model.p_losses(y0, t, c, noise, loss_type=loss_type)
    y_t = diffuse_by_hand(linear_terms(0.01, 0.2, 20), y0, t, noise)
    expected = noise_loss_by_hand(stub.expected(y_t, (t / 20).view(-1, 1, 1, 1), c), noise, loss_type)
    assert loss.dim() == 0 and loss.requires_grad      # a scalar that trains the network
    torch.testing.assert_close(loss, expected)


@pytest.mark.task("sheet2-p-losses")
def test_a_perfect_noise_prediction_has_zero_loss(monkeypatch):
    torch.manual_seed(1)
    y0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    oracle = lambda y_t, t, c: noise.clone()        # noqa: E731 (predicts exactly the noise that was added)
    model = ddpm_with_hand_schedule(monkeypatch, 10, beta1=0.01, beta2=0.2, network=oracle)
    use_hand_q_sample(monkeypatch)
    for loss_type in ("l2", "l1"):
        loss = model.p_losses(y0, torch.tensor([1, 4, 10]), torch.eye(10)[:3], noise, loss_type)
        assert loss.item() == pytest.approx(0.0, abs=1e-7), loss_type


# ----------------------------------------------------------------------------------------------------------------
# sheet1-algorithm1
# ----------------------------------------------------------------------------------------------------------------

def algorithm1_setup(monkeypatch, n_timesteps, drop_prob=0.1, loss_type="l2", beta1=0.01, beta2=0.2):
    """A DDPM around the recording stub, with the closed forms of q_sample and p_losses."""
    stub = RecordingStub()
    model = ddpm_with_hand_schedule(monkeypatch, n_timesteps, beta1, beta2, network=stub, drop_prob=drop_prob,
                                    loss_type=loss_type)
    use_hand_forward_process(monkeypatch)
    return model, stub


@pytest.mark.task("sheet1-algorithm1")
def test_training_draws_t_uniformly_from_1_to_T_never_0(monkeypatch):
    model, stub = algorithm1_setup(monkeypatch, 4, drop_prob=0.0)
    torch.manual_seed(0)
    n = 8000
    model(torch.randn(n, 1, 1, 1), torch.eye(10)[torch.zeros(n, dtype=torch.long)])
    _, t_fraction, _ = stub.all_inputs()
    assert t_fraction.shape == (n,)
    counts = torch.bincount((t_fraction * 4).round().long(), minlength=5)
    assert counts[0] == 0, "t = 0 is the noise-free state: Algorithm 1 draws t from 1..T"
    assert counts.sum() == n and all(abs(count / n - 0.25) < 0.025 for count in counts[1:].tolist()), counts


@pytest.mark.task("sheet1-algorithm1")
def test_training_zeroes_about_drop_prob_of_the_class_vectors_and_keeps_the_others(monkeypatch):
    model, stub = algorithm1_setup(monkeypatch, 10, drop_prob=0.1)
    torch.manual_seed(0)
    n = 20_000
    c = torch.rand(n, 10) + 0.1          # real-valued class vectors: every entry non-zero
    model(torch.randn(n, 1, 1, 1), c)
    _, _, seen = stub.all_inputs()
    assert seen.shape == c.shape
    dropped = (seen == 0).all(dim=1)
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    torch.testing.assert_close(seen[~dropped], c[~dropped], rtol=0, atol=0)     # whole vectors kept unchanged


@pytest.mark.task("sheet1-algorithm1")
@pytest.mark.parametrize("drop_prob, dropped", [(0.0, 0), (1.0, 200)])
def test_training_drop_probability_0_keeps_and_1_drops_every_class_vector(monkeypatch, drop_prob, dropped):
    model, stub = algorithm1_setup(monkeypatch, 10, drop_prob=drop_prob)
    torch.manual_seed(0)
    c = torch.eye(10)[torch.arange(200) % 10]
    model(torch.randn(200, 1, 1, 1), c)
    _, _, seen = stub.all_inputs()
    assert int((seen == 0).all(dim=1).sum()) == dropped


@pytest.mark.task("sheet1-algorithm1")
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_training_loss_is_the_noise_loss_of_its_draws(monkeypatch, loss_type):
    """The loss is p_losses' for the drawn t, eps ~ N(0, I) and (possibly zeroed) c, all read off the network's
    inputs: eps = (y_t - sqrt(alpha_bar_t) y_0) / sqrt(1 - alpha_bar_t)."""
    model, stub = algorithm1_setup(monkeypatch, 10, drop_prob=0.3, loss_type=loss_type)
    torch.manual_seed(3)
    n = 128
    y0 = torch.rand(n, 1, 4, 4) * 2 - 1
    c = torch.eye(10)[torch.arange(n) % 10]
    loss = model(y0, c)
    assert loss.dim() == 0 and loss.requires_grad
    assert len(stub.inputs) == 1, "Algorithm 1 evaluates the network once, on the whole batch"
    y_t, t_fraction, seen = stub.all_inputs()
    t = (t_fraction * 10).round().long()
    eps = recovered_noise(linear_terms(0.01, 0.2, 10), y0, y_t, t)
    assert abs(eps.mean().item()) < 0.1 and 0.9 < eps.std().item() < 1.1, "eps ~ N(0, I)"
    expected = noise_loss_by_hand(stub_noise(stub, y_t, t_fraction, seen), eps, loss_type)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# sheet2-guidance
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-guidance")
def test_classifier_free_guidance_is_equation_5():
    torch.manual_seed(0)
    conditional, unconditional = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for w in (1.0, 3.0, -0.5, 0.0):
        torch.testing.assert_close(ddpm.classifier_free_guidance(conditional, unconditional, w),
                                   (1 + w) * conditional - w * unconditional)
    torch.testing.assert_close(ddpm.classifier_free_guidance(conditional, 0.0, 0.0), conditional)


@pytest.mark.task("sheet2-guidance")
@pytest.mark.parametrize("w", [2.0, 0.5])
def test_guided_noise_puts_the_null_class_in_one_doubled_network_call(monkeypatch, w):
    stub = StubNetwork()
    model = ddpm_with_hand_schedule(monkeypatch, 50, network=stub)
    torch.manual_seed(0)
    y, c = torch.randn(3, 1, 2, 2), torch.eye(10)[[2, 5, 9]]
    guided = model.guided_noise(y, 17, c, w)
    expected = (1 + w) * stub.expected(y, 17 / 50, c) - w * stub.expected(y, 17 / 50, torch.zeros_like(c))
    torch.testing.assert_close(guided, expected)
    assert stub.calls == [6], "conditional and unconditional copies in one call of twice the batch"
    seen = stub.seen_classes[0]
    null = (seen == 0).all(dim=1)
    assert int(null.sum()) == 3, "the unconditional copies get the null class c = 0"
    torch.testing.assert_close(seen[~null], c)


@pytest.mark.task("sheet2-guidance")
def test_guided_noise_without_guidance_skips_the_unconditional_copy(monkeypatch):
    stub = StubNetwork()
    model = ddpm_with_hand_schedule(monkeypatch, 50, network=stub)
    torch.manual_seed(0)
    y, c = torch.randn(2, 1, 2, 2), torch.eye(10)[[1, 4]]
    guided = model.guided_noise(y, 30, c, 0.0)
    torch.testing.assert_close(guided, stub.expected(y, 30 / 50, c))
    assert stub.calls == [2], "with w = 0 the unconditional term has weight 0: its copy is left out"


# ----------------------------------------------------------------------------------------------------------------
# sheet2-p-sample
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.task("sheet2-p-sample")
@pytest.mark.parametrize("t", [2, 17, 50])
def test_reverse_step_is_equation_4(monkeypatch, t):
    """p_sample is eq. 4 with the guided noise (here a given eps standing in for guided_noise)."""
    model = ddpm_with_hand_schedule(monkeypatch, 50)
    torch.manual_seed(0)
    y, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    use_guided_noise(monkeypatch, lambda y_t, step, c, w: eps.clone())
    torch.manual_seed(1)
    result = model.p_sample(y, t, torch.eye(10)[[2, 5, 9]], 1.0)
    torch.manual_seed(1)
    z = torch.randn_like(y)
    torch.testing.assert_close(result, reverse_step_by_hand(linear_terms(1e-4, 0.02, 50), y, t, eps, z))


@pytest.mark.task("sheet2-p-sample")
def test_last_reverse_step_adds_no_noise(monkeypatch):
    model = ddpm_with_hand_schedule(monkeypatch, 50)
    torch.manual_seed(0)
    y, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    use_guided_noise(monkeypatch, lambda y_t, step, c, w: eps.clone())
    c = torch.eye(10)[[2, 5, 9]]
    first = model.p_sample(y, 1, c, 1.0)
    second = model.p_sample(y, 1, c, 1.0)
    torch.testing.assert_close(first, second)
    expected = reverse_step_by_hand(linear_terms(1e-4, 0.02, 50), y, 1, eps, torch.zeros_like(y))
    torch.testing.assert_close(first, expected)


@pytest.mark.task("sheet2-p-sample")
def test_p_sample_steps_with_the_guided_noise(monkeypatch):
    """p_sample: eq. 4 with the guided noise of eq. 5 (here a closed form standing in for guided_noise)."""
    model = ddpm_with_hand_schedule(monkeypatch, 50)
    use_guided_noise(monkeypatch, lambda y_t, t, c, w: (1 + w) * y_t - w * t)
    torch.manual_seed(0)
    y, c = torch.randn(3, 1, 2, 2), torch.eye(10)[[2, 5, 9]]
    torch.manual_seed(4)
    result = model.p_sample(y, 23, c, 1.5)
    torch.manual_seed(4)
    z = torch.randn_like(y)
    expected = reverse_step_by_hand(linear_terms(1e-4, 0.02, 50), y, 23, 2.5 * y - 1.5 * 23, z)
    torch.testing.assert_close(result, expected)


# ----------------------------------------------------------------------------------------------------------------
# sheet1-algorithm2
# ----------------------------------------------------------------------------------------------------------------

class LoopRecorder:
    """Stands in for p_sample: one network call for the noise (1 + w) eps(y_t, t, c), then eq. 4 by hand with
    z ~ N(0, I) for t > 1; records the timesteps and states it is called with."""

    def __init__(self, terms):
        self.terms = terms
        self.steps: List[int] = []
        self.states: List[torch.Tensor] = []

    def install(self, monkeypatch) -> None:
        recorder = self

        def p_sample(self, y_t, t, c, g_weight):
            recorder.steps.append(t)
            recorder.states.append(y_t.clone())
            eps = (1 + g_weight) * self.nn_model(y_t, torch.full((len(y_t), 1, 1, 1), t / self.n_timesteps), c)
            z = torch.randn_like(y_t) if t > 1 else torch.zeros_like(y_t)
            return reverse_step_by_hand(recorder.terms, y_t, t, eps, z)

        monkeypatch.setattr(DDPM, "p_sample", p_sample)


def algorithm2_by_hand(terms, stub, n_timesteps, conditions, w, size, seed) -> Dict[int, torch.Tensor]:
    """Algorithm 2 written out: the states y_s for s = T..0, from y_T ~ N(0, I) under ``seed``."""
    torch.manual_seed(seed)
    y = torch.randn(len(conditions), *size)
    states = {n_timesteps: y}
    for t in range(n_timesteps, 0, -1):
        eps = (1 + w) * stub.expected(y, t / n_timesteps, conditions)
        z = torch.randn_like(y) if t > 1 else torch.zeros_like(y)
        y = reverse_step_by_hand(terms, y, t, eps, z)
        states[t - 1] = y
    return states


@pytest.mark.task("sheet1-algorithm2")
def test_sampling_loop_is_algorithm_2(monkeypatch):
    T, size, w = 12, (1, 2, 2), 1.5
    stub = StubNetwork()
    model = ddpm_with_hand_schedule(monkeypatch, T, beta1=0.01, beta2=0.2, network=stub)
    terms = linear_terms(0.01, 0.2, T)
    recorder = LoopRecorder(terms)
    recorder.install(monkeypatch)
    conditions = torch.eye(10)[[1, 4, 7]]
    torch.manual_seed(5)
    y0, _ = model.sample(size=size, g_weight=w, conditions=conditions)
    expected = algorithm2_by_hand(terms, stub, T, conditions, w, size, seed=5)
    assert recorder.steps == list(range(T, 0, -1)), "one reverse step (p_sample) per step t = T, ..., 1"
    assert stub.calls == [3] * T, "one network call per step"
    torch.testing.assert_close(recorder.states[0], expected[T])     # y_T ~ N(0, I) under the seed
    assert tuple(y0.shape) == (3,) + size
    torch.testing.assert_close(y0, expected[0])


@pytest.mark.task("sheet1-algorithm2")
@pytest.mark.parametrize("keep", [(12, 5, 0), (), tuple(range(12, -1, -1))])
def test_sampling_loop_returns_the_frames_asked_for(monkeypatch, keep):
    T, size, w = 12, (1, 2, 2), 0.5
    stub = StubNetwork()
    model = ddpm_with_hand_schedule(monkeypatch, T, beta1=0.01, beta2=0.2, network=stub)
    terms = linear_terms(0.01, 0.2, T)
    LoopRecorder(terms).install(monkeypatch)
    conditions = torch.eye(10)[[0, 9]]
    torch.manual_seed(11)
    y0, frames = model.sample(size=size, g_weight=w, conditions=conditions, keep=keep)
    expected = algorithm2_by_hand(terms, stub, T, conditions, w, size, seed=11)
    assert frames.shape == (len(keep), 2) + size
    for frame, s in zip(frames, sorted(keep, reverse=True)):
        torch.testing.assert_close(torch.from_numpy(frame), expected[s], msg=lambda m: f"frame y_{s}: {m}")
    torch.testing.assert_close(y0, expected[0])


# ----------------------------------------------------------------------------------------------------------------
# sheet2-test-loop
# ----------------------------------------------------------------------------------------------------------------

TEST_LOOP_T = 20


def make_test_loop(monkeypatch, loss_type="l2", eval_timesteps=5):
    """A SamplingModel around the recording stub, 10 test images (labels 0..9, one each) and the config."""
    use_hand_schedule(monkeypatch)
    use_hand_forward_process(monkeypatch)
    stub = RecordingStub()
    config = TrainConfig.for_dataset("mnist", timesteps=TEST_LOOP_T, eval_timesteps=eval_timesteps,
                                     loss=loss_type, image_size=4, beta1=0.01, beta2=0.2)
    model = sampling_model(stub, dataclasses.asdict(config), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 1, 4, 4), generator=generator, dtype=torch.uint8)
    test_set = ImageSet(images, torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7]), [str(k) for k in range(10)])
    return model, stub, test_set, config


def run_test_loop(model, test_set, config, seed: Optional[int] = None) -> dict:
    if seed is not None:
        torch.manual_seed(seed)
    return training.test_loss(model, test_set, config)


@pytest.mark.task("sheet2-test-loop")
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_test_loss_is_the_mean_noise_loss_over_fixed_timesteps(monkeypatch, loss_type):
    """Every test image once at each of eval_timesteps timesteps in 1..T; per timestep the mean of the noise loss
    over the images (read off the network's inputs), and test_loss the mean over the timesteps."""
    model, stub, test_set, config = make_test_loop(monkeypatch, loss_type)
    result = run_test_loop(model, test_set, config, seed=0)
    y_t, t_fraction, c = stub.all_inputs()
    t = (t_fraction * TEST_LOOP_T).round().long()
    label = c.argmax(dim=1)
    assert torch.equal(c, torch.eye(10)[label]), "the test images are evaluated with their one-hot labels"
    index_of_label = torch.argsort(test_set.labels)            # each label belongs to one test image
    y0 = (test_set.images.float() / 127.5 - 1)[index_of_label[label]]
    eps = recovered_noise(linear_terms(0.01, 0.2, TEST_LOOP_T), y0, y_t, t)
    assert abs(eps.mean().item()) < 0.2 and 0.8 < eps.std().item() < 1.2, "eps ~ N(0, I)"
    per_pixel = stub_noise(stub, y_t, t_fraction, c) - eps
    per_image = (per_pixel.abs() if loss_type == "l1" else per_pixel ** 2).mean(dim=(1, 2, 3))
    timesteps = sorted(set(t.tolist()))
    assert len(timesteps) == 5 and 1 <= timesteps[0] and timesteps[-1] <= TEST_LOOP_T
    assert timesteps[-1] - timesteps[0] >= TEST_LOOP_T // 2, "the timesteps are spread over 1..T"
    assert set(result) == {"test_loss"} | {f"test_loss_t{step}" for step in timesteps}
    for step in timesteps:
        rows = t == step
        assert sorted(label[rows].tolist()) == list(range(10)), f"every test image once at t = {step}"
        assert result[f"test_loss_t{step}"] == pytest.approx(per_image[rows].mean().item(), rel=1e-4, abs=1e-6)
    mean = sum(result[f"test_loss_t{step}"] for step in timesteps) / len(timesteps)
    assert result["test_loss"] == pytest.approx(mean, rel=1e-6)


@pytest.mark.task("sheet2-test-loop")
def test_test_loss_uses_fixed_noise_and_timesteps(monkeypatch):
    """Comparable across epochs: the same numbers whatever the global random state."""
    model, stub, test_set, config = make_test_loop(monkeypatch)
    first = run_test_loop(model, test_set, config, seed=1)
    inputs_first = stub.all_inputs()
    stub.inputs.clear()
    second = run_test_loop(model, test_set, config, seed=2)
    assert first == second
    for a, b in zip(inputs_first, stub.all_inputs()):
        assert torch.equal(a, b), "the test loss sees the same noisy images and timesteps every time"
