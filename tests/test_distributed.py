"""The shared loop under torchrun: 2 gloo processes on the CPU train in lockstep and write artifacts once."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_end_with_identical_weights_and_write_once(image_folder, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run_weights").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "ddp_worker.py"), image_folder, str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "run_weights" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "run_weights" / "rank1.pt", weights_only=True)
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
    names = sorted(os.listdir(out))
    assert names.count("model_ep2.pth") == 1 and "image_ep2_w1.0.png" in names and "loss.csv" in names
    assert result.stdout.count("epoch 2/2  train loss") == 1   # one summary line: only rank 0 reports
    with open(out / "loss.csv") as file:
        assert len(file.read().strip().splitlines()) == 3        # header + one row per epoch, written once
    # 54 training images over 2 ranks of batch 8: 27 per rank, 4 steps per epoch
    checkpoint = torch.load(out / "model_ep2.pth", weights_only=True)
    assert checkpoint["optimizer"]["state"][0]["step"].item() == 8


def test_a_torchrun_job_of_one_process_is_distributed(monkeypatch):
    """torchrun with one process (how the GPU tier reaches nccl and DDP on one GPU) trains through its process
    group, as a larger job does; without torchrun there is none."""
    import socket

    import training
    from train_mnist import MNIST
    config = dataclasses.replace(MNIST, device="cpu")
    assert not training.start_ranks(config)[0].distributed
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    ranks, device = training.start_ranks(config)
    try:
        assert ranks.distributed and ranks.world_size == 1 and ranks.is_main
        assert torch.distributed.get_backend() == "gloo" and device.type == "cpu"
    finally:
        torch.distributed.destroy_process_group()
