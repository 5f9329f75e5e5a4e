"""The fast path: its rules per machine, and that every choice leaves the numbers as they were (exactly where the
arithmetic is the same, within bf16's rounding where it is not)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lab.checkpoints import network_from_config
from lab.generation import SamplingDDPM, generate, sampling_model
from networks.Conditional_UNet import UNet
from lab.speed import (CPU_SAMPLE_CHUNK, CUDA_SAMPLE_CHUNK, PLAIN_SAMPLE_CHUNK, FastInference, FastPath, Machine,
                       cpu_has_native_bf16, path_for_run)
from lab.train_config import MNIST
from training import Ranks, build_run, training_step

GEOMETRY = dict(in_channels=1, image_size=28, n_classes=10, n_features=8)
MNIST_SCHEDULE = dict(beta1=MNIST.beta1, beta2=MNIST.beta2, schedule=MNIST.schedule, drop_prob=MNIST.drop_prob,
                      loss=MNIST.loss)


def machine(device_type="cpu", capability="AVX2", bf16=False, gpu=""):
    return Machine(device_type, capability, bf16, gpu, torch.__version__)


def test_rules_follow_the_machines_capabilities_not_its_device_type():
    cpu = torch.device("cpu")
    avx2 = FastPath.for_machine(cpu, 1, machine=machine())
    amx = FastPath.for_machine(cpu, 1, machine=machine(capability="AVX512", bf16=True))
    assert not avx2.bf16_autocast and amx.bf16_autocast                # bf16 only where the CPU has it natively
    assert avx2.sample_chunk == amx.sample_chunk == CPU_SAMPLE_CHUNK and avx2.share_encoder
    assert not avx2.train_channels_last and FastPath.for_machine(cpu, 3, machine=machine()).train_channels_last
    gpu = FastPath.for_machine(torch.device("cuda"), 3, machine=machine("cuda", gpu="NVIDIA H200"))
    assert gpu.fused_adam and not gpu.bf16_autocast and gpu.sample_chunk == CUDA_SAMPLE_CHUNK
    assert FastPath().sample_chunk == PLAIN_SAMPLE_CHUNK and not FastPath().compile


def test_compile_mode_uses_cuda_graphs_only_on_cuda():
    assert FastPath.for_machine(torch.device("cpu"), 1, compile=True, machine=machine()).compile == "default"
    cuda = FastPath.for_machine(torch.device("cuda"), 1, compile=True, machine=machine("cuda", gpu="H100"))
    assert cuda.compile == "reduce-overhead"
    assert "compile (reduce-overhead)" in cuda.describe() and "500 images per sampling call" in cuda.describe()


def test_this_machine_is_described_by_its_capabilities():
    found = Machine.of(torch.device("cpu"))
    assert found.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert found.cpu_bf16 == cpu_has_native_bf16()
    assert found.cpu_capability in found.describe() and torch.__version__ in found.describe()


def trained_network():
    """A tiny U-Net whose BatchNorm statistics are not the identity (so folding them changes the weights)."""
    torch.manual_seed(0)
    network = network_from_config(GEOMETRY)
    network.train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(16, 1, 28, 28) * 2 + 0.5, torch.rand(16), F.one_hot(torch.arange(16) % 10, 10).float())
    return network.eval()


def network_inputs(n=6):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 28, 28, generator=generator), torch.rand(n, generator=generator),
            F.one_hot(torch.arange(n) % 10, 10).float())


def test_fast_inference_computes_the_same_noise_in_fp32():
    network = trained_network()
    path = FastPath(sample_channels_last=True, fold_batchnorm=True)
    with torch.no_grad():
        expected = network(*network_inputs())
        fast = FastInference(network, path)(*network_inputs())
    assert fast.dtype == torch.float32 and fast.shape == expected.shape
    assert torch.allclose(fast, expected, atol=1e-4), (fast - expected).abs().max()


def test_bf16_autocast_sampling_returns_fp32_within_bf16_rounding():
    network = trained_network()
    with torch.no_grad():
        expected = network(*network_inputs())
        fast = FastInference(network, FastPath(bf16_autocast=True, fold_batchnorm=True))(*network_inputs())
    assert fast.dtype == torch.float32
    relative = (fast - expected).norm() / expected.norm()
    assert 0 < relative < 0.05, relative                    # bf16 has 8 bits of mantissa: about 0.4 % per op


def tiny_run(path: FastPath, **changes):
    config = dataclasses.replace(MNIST, n_features=8, batch_size=8, device="cpu", ema_decay=0.9, **changes)
    return build_run(config, Ranks(), torch.device("cpu"), path)


def one_batch():
    generator = torch.Generator().manual_seed(2)
    return (torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=generator),
            torch.arange(8) % 10)


def test_bf16_training_keeps_weights_optimizer_ema_and_loss_in_fp32():
    plain, bf16 = tiny_run(FastPath()), tiny_run(FastPath(bf16_autocast=True))
    images, labels = one_batch()
    torch.manual_seed(3)
    expected = training_step(plain, images, labels)
    torch.manual_seed(3)
    loss = training_step(bf16, images, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 0.02 * expected.item()
    tensors = [*bf16.model.nn_model.parameters(), *bf16.ema.module.parameters()]
    tensors += [value for state in bf16.optimizer.state.values() for value in state.values()
                if torch.is_tensor(value) and value.is_floating_point()]
    assert tensors and all(tensor.dtype == torch.float32 for tensor in tensors)
    assert all(p.grad.dtype == torch.float32 for p in bf16.model.nn_model.parameters() if p.grad is not None)


def test_generate_samples_in_the_models_chunks_by_default():
    network = trained_network()
    calls = []

    def counting(x, t, c):
        calls.append(len(x))
        return network(x, t, c)

    model = sampling_model(counting, dict(MNIST_SCHEDULE, **GEOMETRY, timesteps=10), torch.device("cpu"), chunk_size=4)
    conditions = F.one_hot(torch.arange(10) % 10, 10).float()
    with torch.no_grad():
        images, _ = generate(model, conditions, 1.0, sampler="ddim", steps=2)
        assert images.shape == (10, 1, 28, 28)
        assert calls == [8, 8, 8, 8, 4, 4]                   # chunks of 4, 4, 2 images, x2 with guidance
        calls.clear()
        generate(model, conditions, 1.0, sampler="ddim", steps=2, chunk_size=10)
        assert calls == [20, 20]
        with pytest.raises(ValueError, match="chunk_size must be positive"):
            generate(model, conditions, 1.0, chunk_size=0)


def test_compiled_and_eager_training_steps_give_the_same_loss():
    """torch.compile (the CPU's inductor kernels; CUDA graphs on CUDA) computes the step's loss as eager does."""
    inductor = pytest.importorskip("torch._inductor.config")
    images, labels = one_batch()
    losses = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inductor, "fallback_random", True)        # the same random draws as eager mode
        for compile_mode in ("", "default"):
            run = tiny_run(FastPath(compile=compile_mode))
            torch.manual_seed(3)
            losses.append([training_step(run, images, labels).item() for _ in range(2)])
    torch._dynamo.reset()
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_precision_flag_overrides_the_machines_choice():
    cpu = torch.device("cpu")
    assert path_for_run(cpu, 1, fast=False, compile=False, precision="bf16").bf16_autocast
    assert not path_for_run(cpu, 1, fast=True, compile=False, precision="fp32").bf16_autocast
    automatic = path_for_run(cpu, 1, fast=True, compile=False, precision="auto")
    assert automatic == FastPath.for_machine(cpu, 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        path_for_run(cpu, 1, fast=True, compile=False, precision="fp16")


def test_precision_studies_compare_both_precisions_over_the_same_seeds():
    from tools.experiments import STUDIES
    from training import resolve_config
    for name in ("precision-mnist", "precision-cifar10"):
        study = STUDIES[name]
        configs = [resolve_config(study.defaults, {**study.base, **changes}) for changes in study.runs.values()]
        assert sorted((c.precision, c.seed) for c in configs) == sorted(
            (p, s) for p in ("fp32", "bf16") for s in (0, 1, 2))
        assert len({(c.epochs, c.batch_size, c.lr, c.eval_images) for c in configs}) == 1


def test_guided_noise_with_a_shared_encoder_equals_the_repeated_batch():
    """With guidance the class-blind half of the U-Net runs once per image, and the noise is the same."""
    network = trained_network()
    fast = FastInference(network, FastPath(sample_channels_last=True, fold_batchnorm=True, share_encoder=True))
    assert fast.copies is not None and FastInference(network, FastPath()).copies is None
    seen = []
    fast.network.init_conv.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    y = torch.randn(3, 1, 28, 28)
    conditions = torch.stack([torch.eye(10)[[1, 2, 3]], torch.eye(10)[[4, 5, 6]]])
    with torch.no_grad():
        for w, proportions in ((2.0, (0.5, 0.5)), (0.0, (0.5, 0.5))):
            expected = SamplingDDPM(network, n_timesteps=10, device="cpu").with_options(proportions).guided_noise(
                y, 7, conditions, w)
            seen.clear()
            result = SamplingDDPM(fast, n_timesteps=10, device="cpu").with_options(proportions).guided_noise(
                y, 7, conditions, w)
            assert seen == [3]                                    # not 9 (w != 0) or 6 (w = 0)
            torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


def test_a_network_whose_first_half_sees_the_class_is_called_on_the_repeated_batch():
    class ClassInInput(UNet):
        def forward(self, x, t, c):                               # the same layers, the class in the first half
            return super().forward(x + c[:, :1].view(-1, 1, 1, 1), t, c)

    class Reordered(UNet):
        def forward(self, x, t, c):                               # another computation, a class-blind first half
            return super().forward(x, t, c.flip(1))

    torch.manual_seed(0)
    other = ClassInInput(in_channels=1, n_features=8, n_classes=10, height=28).eval()
    assert FastInference(other, FastPath(share_encoder=True)).copies is None
    reordered = Reordered(in_channels=1, n_features=8, n_classes=10, height=28).eval()
    assert FastInference(reordered, FastPath(share_encoder=True)).copies is not None   # runs its own forward
    assert FastInference(torch.nn.Sequential(), FastPath(share_encoder=True)).copies is None
    x, t, c = network_inputs(4)
    fast = FastInference(other, FastPath(share_encoder=True))
    with torch.no_grad():
        torch.testing.assert_close(fast.noise_of_copies(x[:2], t, c, 2), other(x[:2].repeat(2, 1, 1, 1), t, c))
