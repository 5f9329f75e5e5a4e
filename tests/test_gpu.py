"""The GPU tier: every branch that only CUDA runs, end to end on one GPU, on tiny data the tests make.

    python -m pytest -m gpu -rs tests

Without a CUDA device every test here is skipped with the reason (never counted as passed). Written to finish
within 5 minutes on one GPU, most of it compiling (torch.compile with CUDA graphs); not yet timed on one.
docs/reference.md lists the CUDA- and MPS-only branches and the test that reaches each.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import training
from lab.checkpoints import load_checkpoint, network_from_config
from lab.run_files import save_run
from lab.speed import FastInference, FastPath, SharedEncoder
from train_mnist import MNIST
from training import resolve_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs a CUDA device")]


def tiny_config(image_folder, out, **overrides):
    given = dict(image_folder=image_folder, cache_dir="", out=str(out), epochs=2, batch_size=16, n_features=8,
                 timesteps=10, guidance=[1.0], n_sample=1, sample_every=1, gif_every=2, save_every=1, eval_every=0,
                 ema_decay=0.9, device="cuda")
    given.update(overrides)
    return resolve_config(MNIST, given)


def same_numbers(first: dict, second: dict) -> None:
    """Two checkpoints hold the same weights, EMA, Adam state and CPU generator state, bit for bit."""
    for key in ("model", "ema"):
        for name, value in first[key].items():
            torch.testing.assert_close(second[key][name].cpu(), value.cpu(), rtol=0, atol=0, msg=f"{key}.{name}")
    for index, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(second["optimizer"]["state"][index][name].cpu(), value.cpu(), rtol=0, atol=0)
    assert torch.equal(first["rng"]["cpu"], second["rng"]["cpu"])


@pytest.fixture(scope="module")
def cuda_run(image_folder, tmp_path_factory):
    """A two-epoch eager run on CUDA with the fast path: channels_last, fused Adam, cudnn.benchmark."""
    out = tmp_path_factory.mktemp("cuda_run") / "run"
    model = train(tiny_config(image_folder, out, device="auto"))              # auto picks CUDA first
    assert model.device.type == "cuda"
    return str(out / "model_ep2.pth")


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_two_epochs_on_cuda(image_folder, tmp_path, compile, cuda_run):
    path = cuda_run
    if compile:                                    # CUDA graphs for training and for the EMA's sampling network
        train(tiny_config(image_folder, tmp_path / "run", compile=True, guidance=[0.0, 1.0]))
        path = str(tmp_path / "run" / "model_ep2.pth")
    checkpoint = load_checkpoint(path)
    assert checkpoint["optimizer"]["param_groups"][0]["fused"]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in checkpoint["losses"])
    assert set(checkpoint["rng"]) == {"cpu", "cuda"} and checkpoint["rng"]["cuda"].dim() == 1  # the run's GPU only
    assert os.path.exists(os.path.join(os.path.dirname(path), "image_ep2_w1.0.png"))


def test_resume_cpu_to_cuda_to_cpu(image_folder, tmp_path):
    """A run started on the CPU resumes on CUDA (channels_last, fused Adam) and back on the CPU; the state moves
    CPU -> CUDA -> CPU bit for bit, and on CUDA without the fast path Adam's step counters stay on the host."""
    train(tiny_config(image_folder, tmp_path / "run", epochs=1, device="cpu"))
    on_cpu = str(tmp_path / "run" / "model_ep1.pth")
    runs = {}
    for device, given in (("cuda", on_cpu), ("cpu", str(tmp_path / "run" / "via_cuda.pth"))):
        config = tiny_config(image_folder, tmp_path / "run", epochs=1, device=device, resume=given)
        runs[device] = training.build_run(config, training.Ranks(), torch.device(device))
        weight = next(p for p in runs[device].model.nn_model.parameters() if p.dim() == 4)
        assert runs[device].optimizer.state[weight]["exp_avg"].stride() == weight.stride()
        save_run(runs[device], "via_cuda.pth" if device == "cuda" else "back_on_cpu.pth")
    same_numbers(load_checkpoint(on_cpu), load_checkpoint(str(tmp_path / "run" / "back_on_cpu.pth")))
    assert runs["cuda"].optimizer.param_groups[0]["fused"]
    train(tiny_config(image_folder, tmp_path / "run", epochs=2, resume=on_cpu))           # trains on CUDA
    plain = training.build_run(tiny_config(image_folder, tmp_path / "run", epochs=3, fast=False,
                                           resume=str(tmp_path / "run" / "model_ep2.pth")),
                               training.Ranks(), torch.device("cuda"))
    steps = [state["step"] for state in plain.optimizer.state.values()]
    assert steps and all(step.device.type == "cpu" for step in steps)          # no device wait per weight
    train(tiny_config(image_folder, tmp_path / "run", epochs=3, device="cpu",
                      resume=str(tmp_path / "run" / "model_ep2.pth")))               # and on the CPU again
    assert load_checkpoint(str(tmp_path / "run" / "model_ep3.pth"))["epoch"] == 3


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_one_process_torchrun_with_nccl(image_folder, tmp_path, compile):
    out = tmp_path / "run"
    (tmp_path / "run_weights").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(ROOT, "tests", "ddp_worker.py"), image_folder, str(out), "cuda"] + ["compile"] * compile
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process group backend: nccl" in result.stdout and "cuda:0 x 1" in result.stdout
    assert ("compile (training; sampling)" in result.stdout) == compile           # no CUDA graphs under DDP
    assert (out / "model_ep2.pth").exists()


def test_a_bf16_training_step_on_cuda(image_folder, tmp_path):
    """--precision bf16 on CUDA: autocast on the GPU, weights, Adam and loss in fp32."""
    run = training.build_run(tiny_config(image_folder, tmp_path, precision="bf16"), training.Ranks(),
                             torch.device("cuda"))
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, device="cuda")
    loss = training.training_step(run, images, torch.arange(8, device="cuda"))
    assert run.path.bf16_autocast and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in run.model.nn_model.parameters())


def test_the_unets_own_check_on_cuda():
    result = subprocess.run([sys.executable, os.path.join("networks", "Conditional_UNet.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "cuda: UNet(3, 32, 10, 32) 717955 trainable" in result.stdout, result.stdout


def test_guided_sampling_with_the_compiled_shared_encoder():
    torch.manual_seed(0)
    network = network_from_config(dict(in_channels=1, image_size=28, n_classes=10, n_features=8)).cuda().eval()
    fast = FastInference(network, FastPath.for_machine(torch.device("cuda"), 1, compile=True))
    assert fast.copies is not None and SharedEncoder.matches(fast.network)   # the check holds on cuDNN
    c = F.one_hot(torch.arange(8) % 10, 10).float().cuda()
    t = torch.rand(8, 1, 1, 1, device="cuda")
    with torch.no_grad():
        for seed in (1, 2, 3):                          # replays of the CUDA graph with new inputs
            x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).cuda()
            shared = fast.noise_of_copies(x, t, c, 2)
            expected = network(x.repeat(2, 1, 1, 1), t, c)
            assert (shared - expected).norm() / expected.norm() < 1e-2


def test_evaluate_metrics_on_cuda(cuda_run, image_folder, tmp_path):
    from tools import evaluate
    csv_path = tmp_path / "table.csv"
    rows = evaluate.run_metrics(evaluate.build_parser().parse_args(
        ["metrics", "--checkpoint", cuda_run, "--device", "cuda", "--image-folder", image_folder, "--cache-dir", "",
         "--guidance", "0", "1", "--n-per-class", "2", "--sampler", "ddim", "--steps", "3", "--csv", str(csv_path)]))
    assert csv_path.exists() and len(rows) == 3                        # the real images, then w = 0 and w = 1


def test_bench_quick_on_cuda():
    command = [sys.executable, "-m", "tools.bench", "--quick", "--devices", "cuda", "--configs", "mnist",
               "--batch-sizes", "16", "--eval-images", "20", "--per-class", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = json.loads(result.stdout.strip().splitlines()[-1])["results"][0]["fast_path"]
    assert "cudnn.benchmark" not in paths["plain"] and "cudnn.benchmark" in paths["fast"]


def write_idx(path, array):
    """A file in MNIST's idx format (what torchvision reads from MNIST/raw/)."""
    with open(path, "wb") as file:
        file.write(struct.pack(">I", 0x0800 + array.dim()) + b"".join(struct.pack(">I", n) for n in array.shape))
        file.write(array.to(torch.uint8).numpy().tobytes())


def tiny_reference_data(root):
    """MNIST/raw/ with 200 training and 50 test digits and cifar10-jpeg/{train,test}/ with 12 and 3 JPEGs per class,
    random pixels: the layout that tools/gpu_reference.sh reads."""
    generator = torch.Generator().manual_seed(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 200), ("t10k", 50)):
        write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=generator))
        write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    for split, n in (("train", 12), ("test", 3)):
        for label in range(10):
            folder = root / "cifar10-jpeg" / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(n):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.jpg")


def test_gpu_reference_in_its_trial_mode(tmp_path):
    tiny_reference_data(tmp_path / "data")
    settings = dict(DEVICE="cuda", COMPILE="", PYTHON=sys.executable, F64_SECONDS="0", DDIM_STEPS="3",
                    TRAIN_FLAGS="--epochs 1 --subset 64 --timesteps 10 --eval-every 0",
                    EVAL_FLAGS="--n-per-class 2",
                    BENCH_FLAGS="--configs mnist --batch-sizes 8 --train-steps 1 --timed-steps 2 --rounds 1 "
                                "--eval-images 20 --per-class 1")
    result = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_reference.sh"), str(tmp_path / "out"),
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=400,
                            env={**os.environ, **settings})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    times = (tmp_path / "out" / "times.txt").read_text()
    assert "== all done" in times and "did not finish" not in times
    assert (tmp_path / "out" / "log_cifar10" / "model_ep1.pth").exists()
