"""The judge of generated samples: metrics on constructed features, the classifier file, and the CLI end to end."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from tools import evaluate
from lab import judge
from lab import metrics
from lab.checkpoints import network_weights
from ddpm import DDPM
from lab.judge import Classifier, augment, classify, load_classifier, save_classifier
from lab.metrics import class_accuracy, diversity, frechet_distance, frechet_distance_from_statistics
from lab.sample_quality import evaluation_data_config
from lab.train_config import MNIST, TrainConfig
from training import resolve_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gaussian_features(n=400, dims=6, seed=0):
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- Frechet distance ------------------------------------------------------------------------------------------

def test_identical_feature_sets_are_at_distance_zero():
    features = gaussian_features()
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-8)


def test_distance_grows_with_a_shift_of_the_mean():
    features = gaussian_features()
    distances = [frechet_distance(features, features + shift) for shift in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0
    # the covariances are equal, so only ||shift||^2 = dims * shift^2 remains
    assert distances == pytest.approx([6 * shift ** 2 for shift in (0.5, 1.0, 2.0)], rel=1e-6)


def test_one_dimensional_closed_form():
    """N(1, 2^2) and N(3, 3^2): (1 - 3)^2 + (2 - 3)^2 = 5."""
    distance = frechet_distance_from_statistics(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]),
                                                torch.tensor([[9.0]]))
    assert distance == pytest.approx(5.0)


def test_diagonal_closed_form_and_rotation_invariance():
    """Diagonal Gaussians: sum of (mean difference)^2 + (std difference)^2; rotating both spaces alike keeps it."""
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = ((mean_a - mean_b) ** 2 + (std_a - std_b) ** 2).sum().item()
    cov_a, cov_b = torch.diag(std_a ** 2), torch.diag(std_b ** 2)
    assert frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    rotated = frechet_distance_from_statistics(rotation @ mean_a, rotation @ cov_a @ rotation.T, rotation @ mean_b,
                                               rotation @ cov_b @ rotation.T)
    assert rotated == pytest.approx(expected)


def test_sampled_features_approach_the_closed_form():
    features = gaussian_features(n=20000, dims=2)
    scaled = features * torch.tensor([2.0, 1.0]) + torch.tensor([1.0, 0.0])
    assert frechet_distance(features, scaled) == pytest.approx(1.0 + 1.0, rel=0.05)  # mean 1^2, std (2 - 1)^2


# ---- class accuracy --------------------------------------------------------------------------------------------

class BrightnessClassifier(nn.Module):
    """A perfect judge of images whose constant brightness encodes the class: class k has brightness k / 5 - 0.9."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.centers = nn.Parameter(torch.arange(n_classes, dtype=torch.float32) / 5 - 0.9)

    def features(self, images):
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)         # [N, 1]

    def head(self, features):
        return -(features - self.centers) ** 2                # [N, n_classes], nearest centre wins


def brightness_images(labels, channels=1, size=8):
    return (labels.float() / 5 - 0.9).view(-1, 1, 1, 1).expand(-1, channels, size, size)


def test_a_perfect_classifier_scores_one_on_its_own_images():
    labels = torch.arange(10).repeat(7)
    features, predicted = classify(BrightnessClassifier(), brightness_images(labels), batch_size=16)
    assert features.shape == (70, 1) and features.dtype == torch.float64
    assert class_accuracy(predicted, labels) == 1.0
    assert class_accuracy(predicted, (labels + 1) % 10) == 0.0


def test_accuracy_is_the_fraction_of_matching_labels():
    assert class_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3])) == 0.75


# ---- diversity -------------------------------------------------------------------------------------------------

def test_identical_samples_have_no_diversity():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    features = torch.tensor([[1.0, 2.0]] * 3 + [[-4.0, 0.0]] * 3)
    assert diversity(features, labels) == 0.0


def test_diversity_averages_the_pairwise_distance_over_classes():
    labels = torch.tensor([0, 0, 1, 1])
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [5.0, 8.0]])
    assert diversity(features, labels) == pytest.approx((1.0 + 3.0) / 2)


def test_diversity_grows_with_spread():
    base, labels = gaussian_features(n=60, dims=4), torch.arange(3).repeat(20)
    values = [diversity(base * spread, labels) for spread in (0.1, 1.0, 3.0)]
    assert values == sorted(values) and values[1] == pytest.approx(10 * values[0])


def test_noise_floor_parts_are_disjoint_and_as_large_as_the_generated_set():
    part, rest = metrics.noise_floor_split(100, 30)
    assert len(part) == 30 and len(rest) == 70 and not set(part.tolist()) & set(rest.tolist())
    part, rest = metrics.noise_floor_split(100, 500)
    assert len(part) == len(rest) == 50                    # never more than half


# ---- the data of a checkpoint ----------------------------------------------------------------------------------

def test_data_flags_replace_the_checkpoint_paths_and_the_whole_test_split_is_kept():
    saved = dataclasses.asdict(TrainConfig(image_folder="/elsewhere/train", eval_images=500, subset=100))
    config = evaluation_data_config(saved, {})
    assert (config.image_folder, config.subset) == ("/elsewhere/train", None) and config.eval_images > 10 ** 6
    assert evaluation_data_config(saved, {"image_folder": "mine/train"}).image_folder == "mine/train"
    builtin = evaluation_data_config(saved, {"data_root": "here"})   # --data-root alone: built-in data
    assert (builtin.data_root, builtin.image_folder) == ("here", None)


# ---- the classifier and its file -------------------------------------------------------------------------------

def test_classifier_shapes_and_file_round_trip(tmp_path):
    classifier = Classifier(3, 10, (4, 8), convs_per_stage=2).eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    assert classifier.features(images).shape == (5, 8) and classifier(images).shape == (5, 10)
    path = str(tmp_path / "judge.pt")
    save_classifier(classifier, path, "cifar10", 32, test_accuracy=0.5)
    loaded, info = load_classifier(path, "cifar10")
    assert info == {"dataset": "cifar10", "test_accuracy": 0.5, "in_channels": 3, "image_size": 32, "n_classes": 10,
                    "widths": [4, 8], "convs_per_stage": 2}
    torch.testing.assert_close(loaded(images), classifier(images))


def test_augment_keeps_shapes_and_only_flips_or_shifts():
    images = torch.rand(6, 3, 8, 8)
    assert torch.equal(augment(images, shift=0, flip=False), images)
    flipped = augment(images, shift=0, flip=True)
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(2)) for f, i in zip(flipped, images))
    assert augment(images, shift=2, flip=True).shape == images.shape


# ---- the command line end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch DDPM checkpoint (F = 8, T = 10) on train/ and test/ folders of 10 classes of random 28x28 grey
    images, and an untrained tiny classifier file."""
    root = tmp_path_factory.mktemp("evaluate")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 4)):
        for label in range(10):
            folder = root / "digits" / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = (torch.rand(28, 28, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    image_folder = str(root / "digits" / "train")
    train(resolve_config(MNIST, dict(image_folder=image_folder, cache_dir="", out=str(root / "run"), epochs=1,
                                     batch_size=16, n_features=8, timesteps=10, guidance=[1.0], eval_every=0,
                                     device="cpu")))
    classifier_path = str(root / "judge.pt")
    torch.manual_seed(0)
    save_classifier(Classifier(1, 10, (4, 8)), classifier_path, "mnist", 28, test_accuracy=0.1)
    return {"checkpoint": str(root / "run" / "model_ep1.pth"), "classifier": classifier_path,
            "image_folder": image_folder, "root": root}


def evaluate_argv(run, *extra):
    return ["metrics", "--checkpoint", run["checkpoint"], "--classifier", run["classifier"], "--n-per-class", "2",
            "--device", "cpu", "--cache-dir", "", *extra]


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_cli_writes_a_row_for_real_images_and_one_per_weight(tiny_run, capsys):
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "0", "2", "--chunk-size", "10"))
    output = capsys.readouterr().out
    rows = read_rows(os.path.join(tiny_run["root"], "run", "model_ep1_eval_ddpm10_w0-2_n2.csv"))
    assert [row["images"] for row in rows] == ["real", "generated", "generated"]
    assert [row["w"] for row in rows] == ["", "0.0", "2.0"]
    assert [row["n"] for row in rows] == ["40", "20", "20"]              # 10 x 4 test images, 10 x 2 generated
    assert [row["steps"] for row in rows[1:]] == ["10", "10"] and rows[1]["sampler"] == "ddpm"
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1
        assert math.isfinite(float(row["frechet"])) and float(row["frechet"]) >= 0
        assert float(row["diversity"]) >= 0 and row["real_diversity"] == rows[0]["diversity"]
    assert float(rows[1]["seconds"]) >= 0 and "frechet" in output and "model_ep1_eval_ddpm10_w0-2_n2.csv" in output


def test_one_count_per_weight_samples_that_many_of_each_class(tiny_run):
    argv = evaluate_argv(tiny_run, "--guidance", "0", "2", "--sampler", "ddim", "--steps", "2")
    evaluate.main(argv[:argv.index("--n-per-class") + 1] + ["3", "2"] + argv[argv.index("--n-per-class") + 2:])
    rows = read_rows(os.path.join(tiny_run["root"], "run", "model_ep1_eval_ddim2_w0-2_n3-2.csv"))
    assert [row["n"] for row in rows] == ["40", "30", "20"]              # 10 x 4 test images, 10 x 3 and 10 x 2


def test_default_table_names_carry_the_settings_and_existing_tables_are_kept(tiny_run, capsys):
    folder = os.path.join(tiny_run["root"], "run")
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "1", "--sampler", "dpm++2m", "--steps", "3"))
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "1", "--sampler", "dpm++2m", "--steps", "3", "--spacing",
                                "time", "--weights", "raw", "--clip-denoised", "--seed", "4"))
    for name in ("model_ep1_eval_dpm++2m3_w1_n2.csv", "model_ep1_eval_dpm++2m3_time_w1_n2_raw_clip_seed4.csv"):
        assert read_rows(os.path.join(folder, name))[1]["sampler"] == "dpm++2m"
    path = os.path.join(folder, "model_ep1_eval_dpm++2m3_w1_n2.csv")
    before = open(path, "rb").read()
    error = cli_error(evaluate_argv(tiny_run, "--guidance", "1", "--sampler", "dpm++2m", "--steps", "3",
                                    "--seed", "0"), capsys)
    assert "exists" in error and "--overwrite" in error and open(path, "rb").read() == before
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "1", "--sampler", "dpm++2m", "--steps", "3", "--overwrite"))


def test_cli_ddim_with_a_chosen_csv_path(tiny_run, tmp_path):
    csv_path = tmp_path / "table.csv"
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "1", "--sampler", "ddim", "--steps", "3", "--csv",
                                str(csv_path)))
    rows = read_rows(csv_path)
    assert len(rows) == 2 and (rows[1]["sampler"], rows[1]["steps"], rows[1]["w"]) == ("ddim", "3", "1.0")
    assert rows[1]["weights"] == "ema"


def test_raw_weights_are_the_trained_ones_and_differ_from_the_ema(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run["checkpoint"], map_location="cpu", weights_only=True)
    for weights in ("raw", "ema"):
        state = DDPM.from_checkpoint(tiny_run["checkpoint"], "cpu", weights=weights).nn_model.state_dict()
        saved = checkpoint["model" if weights == "raw" else "ema"]
        assert all(torch.equal(state[key], saved[key]) for key in saved)
    assert not all(torch.equal(checkpoint["model"][key], checkpoint["ema"][key]) for key in checkpoint["model"])
    with pytest.raises(ValueError, match="weights must be one of"):
        network_weights(checkpoint, "best")
    csv_path = tmp_path / "raw.csv"
    evaluate.main(evaluate_argv(tiny_run, "--guidance", "0", "--weights", "raw", "--csv", str(csv_path)))
    assert read_rows(csv_path)[1]["weights"] == "raw"


def test_cli_trains_and_saves_a_classifier(tiny_run, tmp_path):
    path = tmp_path / "mnist.pt"
    argv = ["train-classifier", "mnist", "--image-folder", tiny_run["image_folder"], "--cache-dir", "",
            "--epochs", "1", "--batch-size", "32", "--classifier", str(path)]
    evaluate.main(argv)
    _, info = load_classifier(str(path), "mnist")
    assert (info["dataset"], info["in_channels"], info["image_size"]) == ("mnist", 1, 28)
    assert 0 <= info["test_accuracy"] <= 1
    before = path.read_bytes()
    with pytest.raises(SystemExit):
        evaluate.main(argv)                    # an existing classifier is kept without --overwrite
    assert path.read_bytes() == before


class NoFloat64(torch.Tensor):
    """A tensor on a device without float64, as MPS: making a float64 tensor of it raises as MPS does, and
    ``.cpu()`` leaves the device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu:
            return result.as_subclass(torch.Tensor)
        if isinstance(result, torch.Tensor) and result.dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return result


class ClassifierOnNoFloat64Device(Classifier):
    """A classifier whose features live on a device without float64."""

    def features(self, images):
        return super().features(images).as_subclass(NoFloat64)


def test_classify_makes_float64_only_on_the_cpu():
    torch.manual_seed(0)
    on_device = ClassifierOnNoFloat64Device(1, 10, (4, 8)).eval()
    plain = Classifier(1, 10, (4, 8)).eval()
    plain.load_state_dict(on_device.state_dict())
    images = torch.rand(7, 1, 28, 28) * 2 - 1
    features, predicted = classify(on_device, images, batch_size=3)
    expected_features, expected_predicted = classify(plain, images, batch_size=3)
    assert type(features) is torch.Tensor and features.dtype == torch.float64
    assert torch.equal(features, expected_features) and torch.equal(predicted, expected_predicted)


def test_train_classifier_saves_the_judge_before_it_measures_it(tiny_run, tmp_path, monkeypatch):
    """Training is the long part: the trained judge is on disk before its test accuracy is measured."""
    def failing_classify(*args, **kwargs):
        raise RuntimeError("the device failed while classifying the test images")

    monkeypatch.setattr(evaluate, "classify", failing_classify)
    path = tmp_path / "mnist.pt"
    with pytest.raises(RuntimeError, match="device failed"):
        evaluate.main(["train-classifier", "mnist", "--image-folder", tiny_run["image_folder"], "--cache-dir", "",
                       "--epochs", "1", "--batch-size", "32", "--classifier", str(path)])
    classifier, info = load_classifier(str(path), "mnist")
    assert info["in_channels"] == 1 and math.isnan(info["test_accuracy"])


# ---- bad input: one line on stderr, exit code 2 ----------------------------------------------------------------

def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    return error


def test_missing_and_corrupt_checkpoints(tiny_run, tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    assert "does not exist" in cli_error(evaluate_argv({**tiny_run, "checkpoint": missing}), capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    assert "corrupt" in cli_error(evaluate_argv({**tiny_run, "checkpoint": str(corrupt)}), capsys)


def test_missing_classifier_names_the_command_that_trains_it(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(judge, "CLASSIFIER_FOLDER", str(tmp_path))
    argv = ["metrics", "--checkpoint", tiny_run["checkpoint"], "--device", "cpu", "--cache-dir", "", "--csv",
            str(tmp_path / "table.csv")]
    assert "python -m tools.evaluate train-classifier mnist" in cli_error(argv, capsys)


def test_classifier_for_other_images_is_refused(tiny_run, tmp_path, capsys):
    path = str(tmp_path / "cifar.pt")
    save_classifier(Classifier(3, 10, (4, 8)), path, "cifar10", 32, test_accuracy=0.1)
    assert "3x32x32" in cli_error(evaluate_argv({**tiny_run, "classifier": path}), capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    assert "not a classifier" in cli_error(evaluate_argv({**tiny_run, "classifier": str(foreign)}), capsys)


@pytest.mark.parametrize("extra, fragment", [
    (["--steps", "5"], "ddim"),                           # the DDPM sampler takes all T steps
    (["--sampler", "ddim", "--steps", "99"], "steps"),
    (["--n-per-class", "1"], "--n-per-class"),
    (["--n-per-class", "4", "4"], "one per guidance weight"),           # three weights by default
    (["--chunk-size", "0"], "--chunk-size"),
    (["--sampler", "dpm++2m", "--spacing", "karras"], "--spacing"),
    (["--guidance", "inf"], "--guidance"),
    (["--weights", "best"], "--weights"),
    (["--image-folder", "/nowhere/train"], "/nowhere/train"),
])
def test_bad_settings_give_one_line(tiny_run, capsys, extra, fragment):
    assert fragment in cli_error(evaluate_argv(tiny_run, *extra), capsys)


def test_real_process_exits_with_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.evaluate", "metrics", "--checkpoint", str(tmp_path / "none.pth")],
                            cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_sampler_study_writes_a_table_per_setting_the_summary_and_the_figure(tiny_run, tmp_path, monkeypatch):
    from tools import samplers
    out = str(tmp_path / "study")
    argv = ["--checkpoint", tiny_run["checkpoint"], "--n-per-class", "2", "--device", "cpu", "--cache-dir", "",
            "--guidance", "0", "1", "--out", out, "--only", "ddim10", "dpm++2m10", "dpm++2m10_time"]
    samplers.main(argv)
    rows = read_rows(os.path.join(out, "samplers.csv"))
    assert [(row["setting"], row["w"]) for row in rows] == [("real", "")] + [
        (name, w) for name in ("ddim10", "dpm++2m10", "dpm++2m10_time") for w in ("0.0", "1.0")]
    assert [row["evaluations_per_image"] for row in rows[1:3]] == ["10", "20"]     # w != 0 doubles the batch
    assert [row["spacing"] for row in rows[3:]] == ["logsnr", "logsnr", "time", "time"]
    assert os.path.getsize(os.path.join(out, "samplers.png")) > 0
    monkeypatch.setattr(samplers, "evaluate_model", lambda *a, **k: pytest.fail("a finished table was redone"))
    samplers.main(argv)                                                        # every table is read back
    with pytest.raises(SystemExit):
        samplers.main(argv[:-3] + ["ddim7"])


def test_a_deleted_study_table_is_judged_again_from_the_saved_images(tiny_run, tmp_path, monkeypatch):
    from lab import sample_quality
    from tools import samplers
    out = str(tmp_path / "study")
    argv = ["--checkpoint", tiny_run["checkpoint"], "--n-per-class", "3", "2", "--device", "cpu", "--cache-dir", "",
            "--guidance", "0", "1", "--out", out, "--only", "ddim10"]
    samplers.main(argv)
    table = os.path.join(out, "ddim10.csv")
    first = read_rows(table)
    assert [row["n"] for row in first[1:]] == ["30", "20"]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["ddim10_w0_n3.pt", "ddim10_w1_n2.pt"]
    sample = sample_quality.generate_classes
    calls = []
    monkeypatch.setattr(sample_quality, "generate_classes", lambda *a, **k: calls.append(a) or sample(*a, **k))
    os.remove(table)
    samplers.main(argv)                                                        # the same images, judged again
    assert read_rows(table) == first and calls == []
    os.remove(table)
    samplers.main(argv + ["--classifier", tiny_run["classifier"]])             # another judge, no new sampling
    assert [row["seconds"] for row in read_rows(table)] == [row["seconds"] for row in first] and calls == []
    os.remove(table)
    samplers.main(argv + ["--seed", "1"])                                      # other noise: sampled anew
    assert len(calls) == 2


def test_sampler_setting_names_carry_spacing_and_stochasticity():
    from tools import samplers
    assert samplers.setting_name("ddpm", None, "time") == "ddpm"
    assert samplers.setting_name("dpm++2m", 20, "time") == "dpm++2m20_time"
    assert samplers.setting_name("dpm++2m", 20, "logsnr", 1.0) == "dpm++2m20_sde"
    assert samplers.setting_name("ddim", 50, "time", 0.5) == "ddim50_eta0.5"
    assert samplers.setting_name("ddim", 50, "time", 1.0) == "ddim50_eta1"      # ancestral DDIM, not an SDE solver
