"""The shared training loop end to end on tiny data the tests make: artifacts, resume, signals, bad input."""
from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import training
from lab.cli import one_line_errors
from lab.checkpoints import load_checkpoint
from lab import speed
from lab.run_files import grid_image_steps, grid_random_state, restore, run_random_state, save_run, set_run_random_state
from lab.speed import FastPath
from ddpm import DDPM
from train_mnist import MNIST
from training import resolve_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(image_folder, out, **overrides):
    given = dict(image_folder=image_folder, cache_dir="", out=str(out), epochs=2, batch_size=16, n_features=8,
                 timesteps=10, guidance=[0.0, 1.0], sample_every=1, gif_every=2, save_every=1, eval_images=20,
                 eval_timesteps=3, device="cpu")
    given.update(overrides)
    return resolve_config(MNIST, given)


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_two_epoch_run_writes_every_artifact(image_folder, tmp_path, capsys):
    train(tiny_config(image_folder, tmp_path / "run"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training on ") and lines[1].startswith("fast path: ")   # the path, and how to
    assert "--no-fast: plain fp32 eager" in lines[1]                                    # turn it off
    names = set(os.listdir(tmp_path / "run"))
    for epoch in (1, 2):
        assert {f"image_ep{epoch}_w0.0.png", f"image_ep{epoch}_w1.0.png", f"model_ep{epoch}.pth"} <= names
    assert {"gif_ep2_w0.0.gif", "gif_ep2_w1.0.gif", "loss.csv", "loss.png"} <= names
    assert "gif_ep1_w0.0.gif" not in names
    rows = read_rows(tmp_path / "run" / "loss.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(float(row["train_loss"]) > 0 and float(row["test_loss"]) > 0 for row in rows)
    grid = Image.open(tmp_path / "run" / "image_ep2_w1.0.png")
    assert grid.size == (10 * 30 + 2, 8 * 30 + 2)  # 10 columns, 4 generated + 4 real rows, padding 2
    gif = Image.open(tmp_path / "run" / "gif_ep2_w1.0.gif")
    assert gif.n_frames == 8  # T = 10: frames after t = 10 (= T) and t = 7..1; t % 20 == 0 never holds
    checkpoint = load_checkpoint(str(tmp_path / "run" / "model_ep2.pth"))
    assert {"model", "optimizer", "epoch", "config", "losses", "ema"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and len(checkpoint["losses"]) == 2
    model = DDPM.from_checkpoint(str(tmp_path / "run" / "model_ep2.pth"), device="cpu")
    assert model.n_timesteps == 10 and model.nn_model.n_features == 8


def test_resumed_run_ends_with_the_same_weights(image_folder, tmp_path):
    settings = dict(epochs=4, sample_every=10, gif_every=10, save_every=2, ema_decay=0.9)
    train(tiny_config(image_folder, tmp_path / "straight", **settings))
    train(tiny_config(image_folder, tmp_path / "resumed", **{**settings, "epochs": 2}))
    train(tiny_config(image_folder, tmp_path / "resumed", **{**settings, "resume": "auto"}))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_ep4.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "model_ep4.pth"))
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert [row["train_loss"] for row in straight["losses"]] == [row["train_loss"] for row in resumed["losses"]]


def test_a_compiled_run_resumes_bit_exactly(image_folder, tmp_path, monkeypatch):
    """torch.compile (one graph per batch shape, ``dynamic=False``) computes a resumed run's steps with the
    kernels of the uninterrupted one. The network and batch of tests/test_speed.py's compiled step (8 MNIST-sized
    images, F = 8), so that inductor's cache of compiled graphs spares this test the compiling."""
    inductor = pytest.importorskip("torch._inductor.config")
    if speed.compile_problem():
        pytest.skip(speed.compile_problem())
    path = FastPath(compile_training="default")
    settings = dict(epochs=2, subset=56, batch_size=8, sample_every=10, gif_every=10, save_every=1, eval_every=0,
                    ema_decay=0.9)
    with inductor.patch(fallback_random=True):          # as there (the key of the cached graphs)
        train_on_path(monkeypatch, path, tiny_config(image_folder, tmp_path / "straight", **settings))
        train_on_path(monkeypatch, path, tiny_config(image_folder, tmp_path / "resumed", **{**settings, "epochs": 1}))
        train_on_path(monkeypatch, path, tiny_config(image_folder, tmp_path / "resumed",
                                                     **{**settings, "resume": "auto"}))
    torch._dynamo.reset()
    straight = load_checkpoint(str(tmp_path / "straight" / "model_ep2.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "model_ep2.pth"))
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


def test_the_run_length_that_decides_compiling_counts_every_grid_and_gif():
    config = tiny_config("unused", "unused", epochs=4, sample_every=2, gif_every=3, guidance=[0.0, 1.0, 3.0],
                         n_sample=4, timesteps=10)
    assert grid_image_steps(config) == 3 * 3 * 4 * 10 * 10           # epochs 2, 3, 4; 3 weights; 40 images; T
    few_step = dataclasses.replace(config, sampler="dpm++2m", sample_steps=5)
    assert grid_image_steps(few_step) == 3 * 3 * 4 * 10 * 5


# ---- resuming across fast-path settings and devices ----------------------------------------------------------

# The CUDA fast path's training layout and Adam (channels_last weights, fused Adam), here on the CPU
CUDA_TRAINING = FastPath(train_channels_last=True, fused_adam=True)
SETTINGS = {"plain": FastPath(), "cuda-like": CUDA_TRAINING}


def train_on_path(monkeypatch, path, config):
    """``train(config)`` with the fast path ``path`` instead of the machine's."""
    monkeypatch.setattr(training, "path_for_run", lambda *args, **kwargs: path)
    return train(config)


def copy_with_moments_laid_out(source, target, channels_last):
    """``source``'s checkpoint at ``target`` with every 4-d Adam moment in channels_last (or the default) layout:
    the file that a run of that layout would have written with the same numbers."""
    checkpoint = torch.load(source, weights_only=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for state in checkpoint["optimizer"]["state"].values():
        for name, value in state.items():
            if value.dim() == 4:
                state[name] = value.contiguous(memory_format=layout)
    os.makedirs(os.path.dirname(target))
    torch.save(checkpoint, target)


@pytest.mark.parametrize("saved_with, resumed_with", [("plain", "cuda-like"), ("cuda-like", "plain")])
def test_a_run_saved_with_one_fast_path_resumes_bit_exactly_with_the_other(image_folder, tmp_path, monkeypatch,
                                                                           saved_with, resumed_with):
    """A run started with one memory layout and Adam (a CPU, or --no-fast) and resumed with the other (a GPU)
    continues exactly as from the same numbers laid out the resuming run's way: the layout of a file's Adam moments
    changes nothing. (The fused Adam mixes up the elements of a moment laid out unlike its weight.)"""
    settings = dict(sample_every=10, gif_every=10, save_every=1, eval_every=0, ema_decay=0.9)
    train_on_path(monkeypatch, SETTINGS[saved_with], tiny_config(image_folder, tmp_path / "first", epochs=1,
                                                                 **settings))
    saved = str(tmp_path / "first" / "model_ep1.pth")
    own_layout = str(tmp_path / "own" / "model_ep1.pth")
    copy_with_moments_laid_out(saved, own_layout, SETTINGS[resumed_with].train_channels_last)
    for checkpoint in (saved, own_layout):
        train_on_path(monkeypatch, SETTINGS[resumed_with],
                      tiny_config(image_folder, os.path.dirname(checkpoint), epochs=2, resume=checkpoint, **settings))
    resumed = load_checkpoint(str(tmp_path / "first" / "model_ep2.pth"))
    expected = load_checkpoint(str(tmp_path / "own" / "model_ep2.pth"))
    for key in ("model", "ema"):
        for name, value in expected[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][index][name], value, rtol=0, atol=0)
    assert [row["train_loss"] for row in resumed["losses"]] == [row["train_loss"] for row in expected["losses"]]


@pytest.mark.parametrize("saved_with, resumed_with", [("plain", "cuda-like"), ("cuda-like", "plain")])
def test_resumed_adam_moments_are_laid_out_like_their_weights(image_folder, tmp_path, saved_with, resumed_with):
    config = tiny_config(image_folder, tmp_path, epochs=1)
    first = training.build_run(config, training.Ranks(), torch.device("cpu"), SETTINGS[saved_with])
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    training.training_step(first, images, torch.arange(8))
    path = save_run(first, "model_ep1.pth")
    resumed = training.build_run(dataclasses.replace(config, resume=path), training.Ranks(), torch.device("cpu"),
                                 SETTINGS[resumed_with])
    moments = 0
    for before, weight in zip(first.model.nn_model.parameters(), resumed.model.nn_model.parameters()):
        for name in ("exp_avg", "exp_avg_sq"):
            moment = resumed.optimizer.state[weight][name]
            assert moment.stride() == weight.stride(), name
            assert torch.equal(moment, first.optimizer.state[before][name])
            moments += weight.dim() == 4
        assert resumed.optimizer.state[weight]["step"].device.type == "cpu"
    assert moments > 20                                        # the convolutions' moments among them
    assert bool(resumed.optimizer.param_groups[0]["fused"]) == SETTINGS[resumed_with].fused_adam   # its own Adam


class OneGPUGenerators:
    """CUDA's generator functions as on a machine with one GPU (cuda:0), on this machine: torch's own
    ``set_rng_state_all`` refuses more states than there are devices, with an IndexError."""

    def __init__(self):
        self.state = torch.zeros(16, dtype=torch.uint8)

    def get_rng_state(self, device="cuda"):
        assert torch.device(device).index in (None, 0)
        return self.state.clone()

    def set_rng_state(self, state, device="cuda"):
        assert torch.device(device).index in (None, 0)
        self.state = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state()]

    def set_rng_state_all(self, states):
        for index, state in enumerate(states):
            if index > 0:
                raise IndexError("tuple index out of range")
            self.set_rng_state(state)

    def install(self, monkeypatch):
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self


def test_a_checkpoint_of_a_machine_with_more_gpus_resumes_on_one(image_folder, tmp_path, monkeypatch):
    """Older checkpoints hold one CUDA generator state per visible GPU; the run trained on the first. Resumed where
    one GPU is visible, that first state is the one restored; new checkpoints hold the run's device's only."""
    generators = OneGPUGenerators().install(monkeypatch)
    config = tiny_config(image_folder, tmp_path, epochs=1)
    run = training.build_run(config, training.Ranks(), torch.device("cpu"))
    path = save_run(run, "model_ep1.pth")
    checkpoint = torch.load(path, weights_only=True)
    states = [torch.full((16,), value, dtype=torch.uint8) for value in (1, 2, 3)]
    checkpoint["rng"]["cuda"] = states                       # saved where three GPUs were visible
    torch.save(checkpoint, path)
    restore(path, run.model.nn_model, run.optimizer, run.ema, torch.device("cuda"))
    assert torch.equal(generators.state, states[0])
    saved = run_random_state(torch.device("cuda"))
    assert set(saved) == {"cpu", "cuda"} and torch.equal(saved["cuda"], states[0])
    assert set(run_random_state(torch.device("cpu"))) == {"cpu"}


class StubMPSGenerator:
    """The MPS generator's functions (torch.mps.manual_seed, get_rng_state, set_rng_state), as on a Mac, backed by
    a CPU generator: ``torch.manual_seed`` then reseeds it, as it reseeds the real one."""

    def __init__(self, monkeypatch):
        self.generator = torch.Generator().manual_seed(123)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: self.generator.manual_seed(seed))
        monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": self.generator.get_state())
        monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": self.generator.set_state(state))

    def draw(self):
        return torch.rand(4, generator=self.generator)


def test_a_grid_leaves_every_generator_the_seed_touches_as_it_was(monkeypatch):
    """On MPS, the training's noise comes from the MPS generator; the grid's fixed seed must not reset it."""
    mps = StubMPSGenerator(monkeypatch)
    torch.manual_seed(5)
    mps.draw()
    expected_cpu, expected_mps = torch.get_rng_state(), mps.generator.get_state()
    with grid_random_state(MNIST):
        mps.draw(), torch.rand(4)
    assert torch.equal(torch.get_rng_state(), expected_cpu)
    assert torch.equal(mps.generator.get_state(), expected_mps)


def test_a_checkpoint_of_a_run_on_mps_keeps_the_mps_generator(monkeypatch):
    """The training's noise on MPS comes from the MPS generator: a resumed run continues its stream."""
    mps = StubMPSGenerator(monkeypatch)
    saved = run_random_state(torch.device("mps"))
    expected = mps.draw()
    set_run_random_state(saved, torch.device("mps"))
    assert set(saved) == {"cpu", "mps"} and torch.equal(mps.draw(), expected)


def test_signal_mid_epoch_saves_and_resumes_exactly(image_folder, tmp_path, monkeypatch):
    """SIGINT during the 3rd step of epoch 2: the step finishes, a checkpoint of that position is written, and
    resuming from it ends where an uninterrupted run ends."""
    settings = dict(epochs=2, sample_every=10, gif_every=10, save_every=10, eval_every=0)
    train(tiny_config(image_folder, tmp_path / "straight", **settings))
    calls = {"n": 0}
    original_step = torch.optim.Adam.step

    def step_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # 4 steps per epoch (60 images / 16)
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_signal)
    train(tiny_config(image_folder, tmp_path / "resumed", **settings))
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert [name for name in os.listdir(tmp_path / "resumed") if name.endswith(".pth")] == ["model_ep1_step3.pth"]
    train(tiny_config(image_folder, tmp_path / "resumed", **{**settings, "resume": "auto"}))
    straight = load_checkpoint(str(tmp_path / "straight" / "model_ep2.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "model_ep2.pth"))
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)
    assert straight["losses"][-1]["train_loss"] == pytest.approx(resumed["losses"][-1]["train_loss"], rel=1e-6)
    assert not any("_step" in name for name in os.listdir(tmp_path / "resumed"))  # stale position removed


def test_sigterm_to_a_real_process_leaves_a_resumable_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train_mnist.py", "--image-folder", image_folder, "--cache-dir", "", "--out", str(out),
               "--epochs", "50", "--batch-size", "4", "--n-features", "8", "--timesteps", "10", "--eval-every", "0",
               "--sample-every", "100", "--gif-every", "100", "--save-every", "100", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    line = ""
    while "training on" not in line and time.time() < deadline:
        line = process.stdout.readline()
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output = line + process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output and "--resume" in output
    saved = [name for name in os.listdir(out) if name.endswith(".pth")]
    assert len(saved) == 1
    checkpoint = load_checkpoint(str(out / saved[0]))
    assert (checkpoint["epoch"], checkpoint["step"]) != (0, 0)
    assert not [name for name in os.listdir(out) if name.startswith(".tmp_")]


# ---- bad input: one line on stderr, exit code 2 ---------------------------------------------------------------

def run_script(argv):
    """What train_mnist.py does with the command line ``argv``."""
    with one_line_errors():
        training.train(training.command_line_config(MNIST, "test", argv))


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    return error


def tiny_argv(image_folder, out, *extra):
    return ["--image-folder", image_folder, "--cache-dir", "", "--out", str(out), "--epochs", "1", "--batch-size",
            "16", "--n-features", "8", "--timesteps", "5", "--guidance", "1", "--eval-every", "0", "--device", "cpu",
            *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-3"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be a positive"),
    (["--guidance", "nan"], "--guidance"),
    (["--beta1", "0.5", "--beta2", "0.1"], "increasing"),
    (["--n-features", "12"], "n_features"),
])
def test_bad_settings_give_one_line(image_folder, tmp_path, capsys, extra, fragment):
    error = run_cli(tiny_argv(image_folder, tmp_path / "out", *extra), capsys)
    assert fragment in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("extra", [["--schedule", "square"], ["--loss", "huber"], ["--guidance", "strong"]])
def test_unknown_choices_are_refused_by_the_parser(image_folder, tmp_path, capsys, extra):
    error = run_cli(tiny_argv(image_folder, tmp_path / "out", *extra), capsys)
    assert "invalid" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(image_folder, tmp_path, capsys):
    error = run_cli(tiny_argv(image_folder, tmp_path / "out", "--device", "cuda"), capsys)
    assert "CUDA is not available" in error


def test_missing_and_empty_image_folders(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert str(missing) in run_cli(tiny_argv(str(missing), tmp_path / "out"), capsys)
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in run_cli(tiny_argv(str(tmp_path / "empty"), tmp_path / "out"), capsys)
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    (tmp_path / "noimages" / "cat" / "notes.txt").write_text("not an image")
    assert "no images" in run_cli(tiny_argv(str(tmp_path / "noimages"), tmp_path / "out"), capsys)


def test_missing_builtin_dataset_names_the_path(tmp_path, monkeypatch):
    from lab import image_data
    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found.") if not download else OSError("no network")

    monkeypatch.setitem(image_data.BUILTIN, "mnist", Offline)
    with pytest.raises(image_data.DataError, match=str(tmp_path)) as error:
        image_data.load_builtin("mnist", str(tmp_path), train=True)
    assert "--data-root" in str(error.value)


def test_bad_checkpoints_are_refused_with_a_reason(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_script(tiny_argv(image_folder, out))
    good = out / "model_ep1.pth"
    before = good.read_bytes()
    capsys.readouterr()
    run_script(tiny_argv(image_folder, out))            # a new run never mixes into this one
    assert "left as it is" in capsys.readouterr().out
    fresh = list((tmp_path / "runs").iterdir())
    assert len(fresh) == 1 and (fresh[0] / "model_ep1.pth").exists()
    error = run_cli(tiny_argv(image_folder, out, "--resume", str(good), "--n-features", "16", "--epochs", "2"), capsys)
    assert "n_features: checkpoint 8, now 16" in error
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(before[: len(before) // 2])
    assert "corrupt" in run_cli(tiny_argv(image_folder, out, "--resume", str(corrupt)), capsys)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": 1}, foreign)
    assert "not a training checkpoint" in run_cli(tiny_argv(image_folder, out, "--resume", str(foreign)), capsys)
    assert good.read_bytes() == before  # nothing overwritten


def test_a_checkpoint_with_a_broken_random_state_is_refused_in_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_script(tiny_argv(image_folder, out))
    checkpoint = torch.load(out / "model_ep1.pth", weights_only=True)
    checkpoint["rng"]["cpu"] = torch.zeros(3, dtype=torch.uint8)
    broken = tmp_path / "broken" / "model_ep1.pth"
    broken.parent.mkdir()
    torch.save(checkpoint, broken)
    capsys.readouterr()
    error = run_cli(tiny_argv(image_folder, out, "--resume", str(broken), "--epochs", "2"), capsys)
    assert "random generator state" in error and len(error.splitlines()) == 1


def test_non_finite_loss_stops_with_epoch_and_step(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_script(tiny_argv(image_folder, out))
    before = (out / "model_ep1.pth").read_bytes()
    monkeypatch.setattr(DDPM, "forward",
                        lambda self, y, c: self.nn_model(y, torch.zeros(len(y)), c).sum() * float("nan"))
    error = run_cli(tiny_argv(image_folder, out, "--resume", "auto", "--epochs", "2"), capsys)
    assert "epoch 2, step 1" in error
    assert (out / "model_ep1.pth").read_bytes() == before


def test_real_examples_are_class_fastest_and_fill_missing_classes():
    from lab.image_data import ImageSet
    from lab.run_files import real_examples
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    image_set = ImageSet(images, torch.tensor([0, 1, 0, 2, 1, 0]), list("abcd"))
    values = ((real_examples(image_set, 2, 4)[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert values == [0, 1, 3, 0, 2, 4, 3, 0]  # class 2 repeats its one image, class 3 (none) is black


def test_a_subset_of_an_image_folder_holds_every_class(image_folder):
    from lab.image_data import load_image_folder
    first = load_image_folder(image_folder, 1, 28).first(20)
    assert len(first.labels.unique()) >= 8    # folders are listed class by class; the loader shuffles them
