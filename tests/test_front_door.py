"""The front door on a copy of the repository that holds committed-style reference runs in log_mnist/ and
log_cifar10/: the bare training commands train and leave the references alone, --resume auto serves the first
start and every restart, --resume PATH works after the data moved."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--subset", "40", "--timesteps", "5", "--n-features", "8", "--batch-size", "20",
        "--eval-images", "10", "--eval-every", "0", "--guidance", "1", "--device", "cpu", "--cache-dir", ""]


def copy_of_the_repository(destination) -> str:
    """The project's code (no results, no virtual environment) in ``destination``."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "log_*", "runs", "scratch", "__pycache__", "*.pth", ".devdata",
                                    ".pytest_cache")
    shutil.copytree(ROOT, destination, ignore=ignore)
    return str(destination)


def train(repo: str, script: str, *flags: str, timeout: int = 300) -> str:
    """Run a training script in ``repo``; it must exit 0. Returns its stdout and stderr."""
    result = subprocess.run([sys.executable, script, *flags], cwd=repo, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def fingerprints(folder: str) -> dict:
    """File name -> SHA-1 of every file in ``folder``."""
    return {name: hashlib.sha1(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, image_folder):
    """A copy of the repository with a finished tiny reference run in log_mnist/ and a copy of it in
    log_cifar10/ (the CIFAR-10 script only has to see that the folder holds a run)."""
    repo = copy_of_the_repository(tmp_path_factory.mktemp("clone") / "repo")
    train(repo, "train_mnist.py", "--image-folder", image_folder, *TINY)
    shutil.copytree(os.path.join(repo, "log_mnist"), os.path.join(repo, "log_cifar10"))
    return repo


def new_run_folders(repo: str, out: str) -> list:
    runs = os.path.join(repo, "runs")
    return sorted(name for name in os.listdir(runs) if name.startswith(out + "-")) if os.path.isdir(runs) else []


@pytest.mark.parametrize("script, out", [("train_mnist.py", "log_mnist"), ("train_cifar10.py", "log_cifar10")])
def test_bare_command_trains_in_a_fresh_folder_and_resume_auto_continues_it(repo, image_folder, script, out):
    reference = fingerprints(os.path.join(repo, out))
    assert "model_ep1.pth" in reference
    output = train(repo, script, "--image-folder", image_folder, *TINY)
    assert f"{out} holds an earlier run" in output and "left as it is" in output
    new_runs = new_run_folders(repo, out)
    assert len(new_runs) == 1 and f"writes to {os.path.join('runs', new_runs[0])}" in output
    assert "model_ep1.pth" in os.listdir(os.path.join(repo, "runs", new_runs[0]))
    if script == "train_mnist.py":          # the newest run is the new one: --resume auto continues it
        output = train(repo, script, "--image-folder", image_folder, *TINY, "--epochs", "2", "--resume", "auto")
        assert f"resumed {os.path.join('runs', new_runs[0], 'model_ep1.pth')}" in output
        assert "model_ep2.pth" in os.listdir(os.path.join(repo, "runs", new_runs[0]))
    assert fingerprints(os.path.join(repo, out)) == reference


def test_resume_path_with_moved_data_and_the_data_flag(repo, image_folder, tmp_path):
    moved = tmp_path / "moved" / "train"
    shutil.copytree(image_folder, moved)
    out = str(tmp_path / "run")
    train(repo, "train_mnist.py", "--image-folder", str(moved), "--out", out, *TINY)
    shutil.rmtree(tmp_path / "moved")                       # the saved data path no longer exists
    checkpoint = os.path.join(out, "model_ep1.pth")
    failed = subprocess.run([sys.executable, "train_mnist.py", "--resume", checkpoint, "--epochs", "2"], cwd=repo,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and str(moved) in failed.stderr and "--image-folder" in failed.stderr
    output = train(repo, "train_mnist.py", "--resume", checkpoint, "--image-folder", image_folder, "--epochs", "2")
    assert "resumed" in output and os.path.exists(os.path.join(out, "model_ep2.pth"))


def test_one_command_line_serves_the_first_start_and_every_restart(repo, image_folder, tmp_path):
    """The same command with --resume auto: the first run starts (and says so), is killed, the second resumes."""
    out = str(tmp_path / "requeued")
    command = [sys.executable, "train_mnist.py", "--image-folder", image_folder, "--out", out, "--resume", "auto",
               *TINY, "--epochs", "2", "--batch-size", "1"]
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, deadline = "", time.time() + 120
    while "training on" not in first and time.time() < deadline:
        first += process.stdout.readline()
    process.send_signal(signal.SIGTERM)          # within the first of 2 x 40 steps
    first += process.communicate(timeout=120)[0]
    assert process.returncode == 0, first
    assert "no checkpoint of an earlier run" in first and "starting a new run" in first
    assert "stopped by SIGTERM" in first
    second = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed {out}" in second.stdout
    assert os.path.exists(os.path.join(out, "model_ep2.pth"))
