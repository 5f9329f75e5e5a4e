"""sample.py and visualize.py: mixture guidance against its formulas, both command lines end to end, bad input."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tools import sample
from tools import visualize
from lab.checkpoints import save_checkpoint
from ddpm import DDPM
from lab.generation import SamplingDDPM, generate, load_for_sampling
from tests.conftest import StubNetwork
from lab.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, SIZE = 4, 8          # the tiny checkpoint: T = 4 steps, 8x8 grey images, U-Net width 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is faster, above all on a machine that is busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """10 class folders of one random 8x8 grey PNG each."""
    root = tmp_path_factory.mktemp("digits") / "train"
    generator = torch.Generator().manual_seed(0)
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        pixels = (torch.rand(SIZE, SIZE, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / str(label) / "0.png")
    return str(root)


def write_checkpoint(path, config: dict, weights_config: dict | None = None) -> str:
    """A checkpoint of an untrained DDPM (weights built from ``weights_config``, default ``config``)."""
    torch.manual_seed(0)
    model = DDPM.from_config(weights_config or config, device="cpu")
    save_checkpoint({"model": model.nn_model.state_dict(), "ema": None, "optimizer": {}, "epoch": 1,
                     "config": config, "losses": []}, str(path))
    return str(path)


def tiny_config(image_folder: str, **overrides) -> dict:
    settings = dict(image_folder=image_folder, cache_dir="", n_features=8, timesteps=T, image_size=SIZE)
    return dataclasses.asdict(TrainConfig(**{**settings, **overrides}))


@pytest.fixture(scope="module")
def checkpoint(image_folder, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("run") / "model_ep1.pth", tiny_config(image_folder))


def stub_diffusion(network, proportions=(1.0,)) -> SamplingDDPM:
    return SamplingDDPM(network, n_timesteps=10, device="cpu").with_options(proportions)


# ---- conditions and weights against the guidance formulas (S1 eq. 5 and composed guidance) ----------------------

Y = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
STEP, W = 6, 2.0


def eps(network, c_vector):
    """The stub's eps(Y, STEP / T, c) for the same class vector c [n_classes] on every image."""
    return network.expected(Y, STEP / 10, c_vector.expand(len(Y), -1))


def guided(network, conditions, proportions):
    """SamplingDDPM.guided_noise of the stub network with guidance weight W."""
    return stub_diffusion(network, proportions).guided_noise(Y, STEP, conditions, W)


def test_class_conditions_are_one_hot_class_fastest_and_follow_equation_5():
    conditions, proportions = sample.class_conditions([3, 7], 3, 10)
    assert conditions.shape == (1, 6, 10) and proportions == (1.0,)
    assert conditions[0].argmax(1).tolist() == [3, 7, 3, 7, 3, 7]
    assert (conditions.sum(-1) == 1).all()
    network = StubNetwork()
    e3, zero = torch.eye(10)[3], torch.zeros(10)
    torch.testing.assert_close(guided(network, *sample.class_conditions([3], 3, 10)),
                               (1 + W) * eps(network, e3) - W * eps(network, zero))   # eq. 5


def test_convex_mixture_is_one_mixed_class_vector():
    network = StubNetwork()
    conditions, proportions = sample.convex_mixture_conditions({3: 1.0, 8: 3.0}, 3, 10)
    mixed = 0.25 * torch.eye(10)[3] + 0.75 * torch.eye(10)[8]
    assert conditions.shape == (1, 3, 10) and proportions == (1.0,)
    torch.testing.assert_close(conditions[0], mixed.expand(3, -1))
    torch.testing.assert_close(guided(network, conditions, proportions),
                               (1 + W) * eps(network, mixed) - W * eps(network, torch.zeros(10)))
    assert network.calls == [6]      # one call: the mixed copy and the unconditional copy


def test_composed_mixture_is_one_conditional_copy_per_class():
    network = StubNetwork()
    conditions, proportions = sample.composed_mixture_conditions({3: 1.0, 8: 3.0}, 3, 10)
    assert conditions.shape == (2, 3, 10)
    assert proportions == pytest.approx((0.25, 0.75))
    assert conditions[0].argmax(1).tolist() == [3] * 3 and conditions[1].argmax(1).tolist() == [8] * 3
    unconditional = eps(network, torch.zeros(10))
    expected = unconditional + sum((1 + W) * p * (eps(network, torch.eye(10)[c]) - unconditional)
                                   for p, c in zip(proportions, (3, 8)))
    torch.testing.assert_close(guided(network, conditions, proportions), expected)
    assert network.calls == [9]      # one call: two conditional copies and the unconditional one


class SquaredClassNetwork(StubNetwork):
    """eps = 0.5 y + t + (c . k)^2: not affine in c, so a mixed class vector is not a mix of predictions."""

    def forward(self, y, t, c):
        class_term = c @ torch.arange(1, self.n_classes + 1, dtype=c.dtype)
        return self.scale * y + t.view(-1, 1, 1, 1) + class_term.view(-1, 1, 1, 1) ** 2


def test_convex_and_composed_agree_only_for_a_network_affine_in_c():
    mixture = {3: 0.5, 8: 0.5}
    for network, agree in ((StubNetwork(), True), (SquaredClassNetwork(), False)):
        convex = guided(network, *sample.convex_mixture_conditions(mixture, 3, 10))
        composed = guided(network, *sample.composed_mixture_conditions(mixture, 3, 10))
        assert torch.allclose(convex, composed) == agree


def test_a_one_class_mixture_is_plain_guidance():
    network = StubNetwork()
    plain = guided(network, *sample.class_conditions([5], 3, 10))
    for build in (sample.convex_mixture_conditions, sample.composed_mixture_conditions):
        torch.testing.assert_close(guided(network, *build({5: 2.0}, 3, 10)), plain)


@pytest.mark.parametrize("text, fragment", [("3:", "CLASS:WEIGHT"), ("a:0.5", "CLASS:WEIGHT"), ("3", "CLASS:WEIGHT"),
                                            ("3:0.5,", "CLASS:WEIGHT"), ("3:0.5,3:0.5", "twice")])
def test_malformed_mixtures_are_refused(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        sample.parse_mixture(text)


@pytest.mark.parametrize("mixture, fragment", [
    ({3: 0.0, 8: 0.0}, "sum to a positive"), ({3: -0.5, 8: 1.5}, "negative"), ({3: float("nan")}, "finite"),
    ({10: 1.0}, "outside 0..9"), ({}, "at least"),
])
def test_bad_mixture_weights_and_classes_are_refused(mixture, fragment):
    for build in (sample.convex_mixture_conditions, sample.composed_mixture_conditions):
        with pytest.raises(ValueError, match=fragment):
            build(mixture, 2, 10)


# ---- sample.py end to end ---------------------------------------------------------------------------------------

def grid_size(columns: int, rows: int) -> tuple[int, int]:
    """Pixel size of a torchvision grid of SIZE x SIZE images with padding 2."""
    return columns * (SIZE + 2) + 2, rows * (SIZE + 2) + 2


def test_sample_writes_a_class_grid_and_a_gif(checkpoint, tmp_path, capsys):
    out, gif = tmp_path / "grid" / "classes.png", tmp_path / "classes.gif"
    sample.main(["--checkpoint", checkpoint, "--classes", "3", "7", "--n", "2", "--device", "cpu",
                 "--out", str(out), "--gif", str(gif)])
    assert Image.open(out).size == grid_size(2, 2)                 # one column per class, --n rows
    assert Image.open(gif).n_frames == T                             # frames after t = T and every t < 8
    printed = capsys.readouterr().out
    assert str(out) in printed and str(gif) in printed and printed.strip().endswith(" s")
    first = printed.splitlines()[0]                 # the path chosen and the flag that turns it off, first
    assert first.startswith("sampling 4 images on cpu; fast path: ") and "--no-fast: plain fp32 eager" in first


def test_sample_on_the_plain_path_says_so_and_draws_the_same_images_within_rounding(checkpoint, tmp_path, capsys):
    """--no-fast samples with the plain network (fp32, eager, no folding or sharing): the same grid up to the
    fast path's rounding (bf16 where the CPU computes it natively, folded BatchNorm)."""
    outs = {name: tmp_path / f"{name}.png" for name in ("fast", "plain")}
    for name, out in outs.items():
        sample.main(["--checkpoint", checkpoint, "--n", "1", "--device", "cpu", "--out", str(out), "--no-compile",
                     *(["--no-fast"] if name == "plain" else [])])
    first = capsys.readouterr().out.splitlines()
    assert first[2].startswith("sampling 10 images on cpu; plain path: 250 images per sampling call")
    images = {name: torch.from_numpy(np.asarray(Image.open(out), dtype=np.float32)) for name, out in outs.items()}
    assert (images["fast"] - images["plain"]).abs().mean() < 2        # of 255: the same pictures


@pytest.mark.parametrize("extra", [[], ["--compose"], ["--compose", "--sampler", "ddim", "--steps", "2"]])
def test_sample_writes_a_mixture_grid(checkpoint, tmp_path, extra):
    out = tmp_path / "mix.png"
    sample.main(["--checkpoint", checkpoint, "--mix", "3:0.5,8:0.5", "--n", "10", "--device", "cpu",
                 "--out", str(out), *extra])
    assert Image.open(out).size == grid_size(8, 2)                 # 10 images, row-major, 8 per row


def test_sample_defaults_to_all_classes_and_repeats_under_a_seed(checkpoint, tmp_path):
    outs = [tmp_path / "first.png", tmp_path / "second.png"]
    for out in outs:
        sample.main(["--checkpoint", checkpoint, "--n", "1", "--seed", "3", "--device", "cpu", "--out", str(out)])
    assert Image.open(outs[0]).size == grid_size(10, 1)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def run_and_expect_error(main, argv, capsys) -> str:
    """Call main(argv); it must exit with code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


@pytest.mark.parametrize("extra, fragment", [
    (["--classes", "3", "10"], "class 10 is outside 0..9"),
    (["--classes", "-1"], "class -1 is outside"),
    (["--mix", "3:"], "CLASS:WEIGHT"),
    (["--mix", "a:0.5"], "CLASS:WEIGHT"),
    (["--mix", "3:0.5,3:0.5"], "class 3 twice"),
    (["--mix", "3:0,8:0"], "sum to a positive"),
    (["--mix", "3:-0.5,8:1.5"], "negative"),
    (["--mix", "3:0.5,12:0.5"], "class 12 is outside"),
    (["--compose"], "--compose needs --mix"),
    (["--classes", "3", "--mix", "3:1"], "not allowed with"),
    (["--n", "0"], "--n must be positive"),
    (["--guidance", "nan"], "--guidance"),
    (["--sampler", "ddpm", "--steps", "2"], "DDPM sampler takes all T"),
])
def test_bad_sample_arguments_give_one_line(checkpoint, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out.png"
    error = run_and_expect_error(sample.main, ["--checkpoint", checkpoint, "--device", "cpu", "--out", str(out),
                                               *extra], capsys)
    assert fragment in error
    assert not out.exists()


def test_bad_checkpoints_give_one_line(checkpoint, image_folder, tmp_path, capsys):
    def error_for(path):
        return run_and_expect_error(sample.main, ["--checkpoint", str(path), "--out", str(tmp_path / "o.png")], capsys)

    assert "does not exist" in error_for(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(open(checkpoint, "rb").read()[:1000])
    assert "corrupt" in error_for(corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": 1}, foreign)
    assert "not a training checkpoint" in error_for(foreign)
    mismatched = write_checkpoint(tmp_path / "mismatched.pth", tiny_config(image_folder, n_features=16),
                                  weights_config=tiny_config(image_folder))
    assert "do not fit" in error_for(mismatched)


def test_sample_script_as_a_process_fails_without_traceback(checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.sample", "--checkpoint", checkpoint, "--mix", "3:0.5,3:0.5",
                             "--out", str(tmp_path / "o.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --mix names class 3 twice in '3:0.5,3:0.5'"]


# ---- visualize.py -----------------------------------------------------------------------------------------------

def test_strip_timesteps():
    assert visualize.strip_timesteps(400) == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    assert visualize.strip_timesteps(4) == [0, 1, 2, 3, 4]


def test_schedules_plot_is_written(tmp_path, capsys):
    out = tmp_path / "plots" / "schedules.png"
    visualize.main(["schedules", "--timesteps", "50", "--out", str(out)])
    assert Image.open(out).size[0] > 500 and "wrote" in capsys.readouterr().out
    error = run_and_expect_error(visualize.main, ["schedules", "--beta1", "0.5", "--beta2", "0.1", "--out",
                                                  str(tmp_path / "bad.png")], capsys)
    assert "increasing" in error


def test_forward_frames_share_one_noise_draw():
    model = visualize.forward_process_model(dict(timesteps=8, beta1=1e-4, beta2=0.02, schedule="linear"))
    y0 = torch.rand(1, 1, SIZE, SIZE) * 2 - 1
    timesteps = visualize.strip_timesteps(8)
    frames = visualize.forward_frames(model, y0, timesteps, seed=0)
    assert frames.shape == (9, 1, SIZE, SIZE) and torch.equal(frames[0], y0[0])
    noise = [(frame - model.sqrt_alpha_bar_t[t] * y0[0]) / model.sqrt_one_minus_alpha_bar_t[t]
             for frame, t in zip(frames[1:], timesteps[1:])]                    # invert S1 eq. 3
    for estimate in noise[1:]:
        torch.testing.assert_close(estimate, noise[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["checkpoint", "image folder"])
def test_forward_strip_is_written(checkpoint, image_folder, tmp_path, capsys, source):
    out = tmp_path / "forward.png"
    flags = ["--checkpoint", checkpoint] if source == "checkpoint" else ["--image-folder", image_folder,
                                                                         "--timesteps", "16"]
    visualize.main(["forward", *flags, "--index", "3", "--out", str(out)])
    assert out.exists() and "wrote" in capsys.readouterr().out
    error = run_and_expect_error(visualize.main, ["forward", *flags, "--index", "99", "--out", str(out)], capsys)
    assert "--index must lie in 0..9" in error


def test_reverse_frames_end_in_the_sample_of_the_sampling_loop(checkpoint):
    model = load_for_sampling(checkpoint, torch.device("cpu"))
    frames = visualize.reverse_frames(model, 3, 2.0, [4, 2, 0], seed=5)
    conditions, _ = sample.class_conditions([3], 1, 10)
    final, _ = generate(model, conditions, 2.0, seed=5)
    assert frames.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(frames[-1], final[0])


def test_reverse_strip_is_written(checkpoint, tmp_path, capsys):
    out = tmp_path / "reverse.png"
    visualize.main(["reverse", "--checkpoint", checkpoint, "--class", "3", "--guidance", "3", "--device", "cpu",
                    "--out", str(out)])
    assert out.exists()
    error = run_and_expect_error(visualize.main, ["reverse", "--checkpoint", checkpoint, "--class", "10",
                                                  "--out", str(out)], capsys)
    assert "class 10 is outside" in error


def test_mixture_figure_is_written(checkpoint, tmp_path, capsys):
    out = tmp_path / "mixtures.png"
    visualize.main(["mixtures", "--checkpoint", checkpoint, "--pairs", "3:8", "1:7", "--guidance", "3", "--n", "3",
                    "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert out.exists()
    for pair, fragment in (("3:3", "two different classes"), ("3-8", "A:B"), ("3:10", "class 10 is outside")):
        error = run_and_expect_error(visualize.main, ["mixtures", "--checkpoint", checkpoint, "--pairs", pair,
                                                      "--out", str(tmp_path / "bad.png")], capsys)
        assert fragment in error
