"""experiments.py end to end on a tiny study: every run trains and is judged once, the results files appear,
and running the study again reuses what is done."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from tools import experiments
from tools.experiments import Evaluation, Study, run_study


def tiny_study(image_folder):
    base = dict(image_folder=image_folder, cache_dir="", subset=20, epochs=2, n_features=8, timesteps=10,
                batch_size=10, guidance=[1.0], sampler="ddim", sample_steps=3, save_every=1, sample_every=1000,
                gif_every=1000, eval_images=20, eval_timesteps=2)
    return Study(dataset="mnist", base=base, runs={"a": {}, "b": dict(lr=1e-4)},
                 comparisons={"lr": ["a", "b"], "ema": ["a", "a:raw"]},
                 evaluation=Evaluation(guidance=[1.0], n_per_class=2, sampler="ddim", steps=3))


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def finished(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study = tiny_study(image_folder)
    out, work = str(root / "out"), str(root / "work")
    run_study("tiny", study, {}, out, work, torch.device("cpu"))
    return study, out, work


def test_every_result_file_is_written(finished):
    _, out, _ = finished
    assert sorted(os.listdir(out)) == ["tiny_a_w1.png", "tiny_b_w1.png", "tiny_ema.png", "tiny_losses.csv",
                                       "tiny_lr.png", "tiny_metrics.csv", "tiny_runs.csv"]


def test_metric_table_has_the_real_row_once_then_each_run_and_the_raw_weights(finished):
    _, out, _ = finished
    rows = read_rows(os.path.join(out, "tiny_metrics.csv"))
    assert [(row["run"], row["images"], row["weights"]) for row in rows] == [
        ("a", "real", ""), ("a", "generated", "ema"), ("a", "generated", "raw"), ("b", "generated", "ema")]
    assert all(row["sampler"] == "ddim" and row["steps"] == "3" for row in rows[1:])


def test_loss_table_has_every_epoch_and_the_raw_weights_test_loss(finished):
    _, out, _ = finished
    rows = read_rows(os.path.join(out, "tiny_losses.csv"))
    assert [(row["run"], row["epoch"]) for row in rows] == [
        ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2"), ("a:raw", "1"), ("a:raw", "2")]
    ema, raw = rows[1], rows[5]
    assert ema["train_loss"] == raw["train_loss"]                      # the same training ...
    assert float(ema["test_loss"]) != float(raw["test_loss"])          # ... judged with other weights


def test_run_summary_counts_parameters_and_images(finished):
    _, out, _ = finished
    rows = read_rows(os.path.join(out, "tiny_runs.csv"))
    assert [row["run"] for row in rows] == ["a", "b"] and rows[1]["changes"] == "lr=0.0001"
    assert all(row["images_seen"] == "40" and int(row["parameters"]) > 0 for row in rows)


def test_running_again_reuses_the_trained_runs_and_their_tables(finished, monkeypatch):
    study, out, work = finished
    monkeypatch.setattr(experiments, "train", lambda config: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(experiments, "evaluate_checkpoint", lambda *args, **kwargs: pytest.fail("judged again"))
    run_study("tiny", study, {}, out, work, torch.device("cpu"), only=["b"])


def test_cli_lists_runs_and_refuses_unknown_ones(capsys):
    experiments.main(["mnist", "--list"])
    assert "figure schedule: baseline, cosine, sigmoid" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["mnist", "--runs", "nonsense"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "nonsense" in error and "baseline" in error and len(error.strip().splitlines()) == 1


def test_a_stopped_run_stops_the_study_with_a_message(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "train", lambda config: None)   # as if Ctrl-C came before the last epoch
    with pytest.raises(experiments.StudyStopped, match="run the same command again"):
        run_study("tiny", tiny_study(image_folder), {}, str(tmp_path / "out"), str(tmp_path / "work"),
                  torch.device("cpu"))
    assert not os.path.exists(tmp_path / "out")
