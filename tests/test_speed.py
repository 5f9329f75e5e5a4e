"""The fast path: its rules per machine, and that every choice leaves the numbers as they were (exactly where the
arithmetic is the same, within bf16's rounding where it is not)."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lab.checkpoints import network_from_config
from lab.generation import SamplingDDPM, generate, sampling_model
from networks.Conditional_UNet import UNet
from lab import speed
from lab.speed import (CPU_PATH, CUDA_SAMPLE_CHUNK, MACHINE_CLASSES, PLAIN_SAMPLE_CHUNK, RULES, FastInference, FastPath,
                       Machine, Rule, cpu_has_native_bf16, make_optimizer, path_for_run, to_channels_last)
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
    for path, rule in ((avx2, RULES["cpu-avx2"]), (amx, RULES["cpu-bf16"])):   # 1-channel images: channels_last
        assert path == replace(rule.path, train_channels_last=rule.train_channels_last_grey)  # training as the rule says
    assert avx2.share_encoder and avx2.fold_batchnorm and avx2.sample_channels_last
    gpu = FastPath.for_machine(torch.device("cuda"), 3, machine=machine("cuda", gpu="NVIDIA H200"))
    assert gpu.fused_adam and not gpu.bf16_autocast and gpu.sample_chunk == CUDA_SAMPLE_CHUNK
    assert FastPath().sample_chunk == PLAIN_SAMPLE_CHUNK and not FastPath().compile_training


def test_each_machine_falls_in_one_class_by_what_it_computes_natively():
    classes = {machine(): "cpu-avx2", machine(capability="DEFAULT"): "cpu-avx2",
               machine(capability="AVX512"): "cpu-avx512", machine(capability="AVX512", bf16=True): "cpu-bf16",
               machine("cuda", gpu="NVIDIA H100"): "cuda", machine("mps"): "mps"}
    for found, expected in classes.items():
        assert found.machine_class == expected
        assert expected in RULES and expected in MACHINE_CLASSES


def test_capping_onednn_below_bf16_leaves_no_native_bf16(monkeypatch):
    """tools/bench.py measures the other CPU classes on one CPU by capping torch's and oneDNN's instruction sets
    (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA); the capped machine then computes bf16 by emulation."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert not cpu_has_native_bf16() and Machine.of(torch.device("cpu")).machine_class == "cpu-avx2"


def test_a_rule_compiles_only_runs_long_enough_to_repay_it():
    rule = Rule(FastPath(), compile_training_from=1000, compile_sampling_from=500)
    assert rule.compiles(None, 999, 500)[:2] == (False, True)
    training, sampling, note = rule.compiles(None, 10, 10)
    assert not training and not sampling and "training under 1,000 images" in note and "sampling under 500" in note
    assert rule.compiles(None, None, 10)[2] == "eager for sampling under 500 image-steps: too short to repay compiling"
    assert rule.compiles(True, 0, 0) == (True, True, "") and rule.compiles(False, 10 ** 9, 10 ** 9) == (False, False, "")
    assert Rule(FastPath()).compiles(None, 10 ** 9, 10 ** 9) == (False, False, "")     # a rule without compiling


def test_compile_mode_uses_cuda_graphs_only_on_cuda(monkeypatch):
    monkeypatch.setattr(speed, "compile_problem", lambda: "")
    cpu_path = FastPath.for_machine(torch.device("cpu"), 1, compile=True, machine=machine())
    assert cpu_path.compile_training == cpu_path.compile_sampling == "default"
    cuda = FastPath.for_machine(torch.device("cuda"), 1, compile=True, machine=machine("cuda", gpu="H100"))
    assert cuda.compile_training == cuda.compile_sampling == "reduce-overhead"
    assert "compile (training, reduce-overhead; sampling, reduce-overhead)" in cuda.describe()
    assert "500 images per sampling call" in cuda.describe()


def test_without_a_working_compiler_the_run_stays_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(speed, "compile_problem", lambda: "no C++ compiler found")
    path = FastPath.for_machine(torch.device("cpu"), 3, compile=True, machine=machine())
    assert not path.compile_training and not path.compile_sampling
    assert "eager: no C++ compiler found" in path.announce()


def test_the_announcement_names_the_path_and_the_flags_that_turn_it_off(monkeypatch):
    monkeypatch.setattr(speed, "compile_problem", lambda: "")
    monkeypatch.setitem(speed.RULES, "cpu-avx2", Rule(CPU_PATH, compile_training_from=100, compile_sampling_from=100))
    long_run = FastPath.for_machine(torch.device("cpu"), 3, machine=machine(), training_images=100,
                                    sampled_image_steps=100)
    line = long_run.announce()
    assert line.startswith("fast path: channels_last (training, sampling), compile (training; sampling)")
    assert "--no-fast: plain fp32 eager" in line and "--no-compile: eager" in line and "--compile:" not in line
    short_run = FastPath.for_machine(torch.device("cpu"), 3, machine=machine(), training_images=10)
    assert "eager for training under 100 images" in short_run.announce()
    assert "--compile: compile anyway" in short_run.announce() and "--no-compile" not in short_run.announce()
    assert FastPath().announce().startswith("plain path: 250 images per sampling call")


def test_a_network_whose_compiling_fails_goes_on_eager_and_says_so(monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    def failing_compile(network, **options):
        def call(*inputs):
            error = BackendCompilerFailed.__new__(BackendCompilerFailed)     # its constructor differs by version
            Exception.__init__(error, "backend='inductor' raised: no C++ compiler\nmore")
            raise error
        return call
    monkeypatch.setattr(torch, "compile", failing_compile)
    network = torch.nn.Linear(3, 2)
    wrapped = speed.compiled(network, "default")
    x = torch.randn(4, 3)
    torch.testing.assert_close(wrapped(x), network(x), rtol=0, atol=0)
    torch.testing.assert_close(wrapped(x), network(x), rtol=0, atol=0)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("torch.compile failed (BackendCompilerFailed")
    assert printed[0].endswith("going on eager")
    assert speed.compiled(network, "") is network


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


def group_norm_layouts(network: torch.nn.Module) -> list[bool]:
    """Records, for each GroupNorm call from now on, whether its input (after any pre-hook) was channels_last."""
    layouts = []
    for layer in network.modules():
        if isinstance(layer, torch.nn.GroupNorm):
            layer.register_forward_hook(lambda layer, inputs, output: layouts.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous()))
    return layouts


def test_channels_last_training_normalises_groups_in_nchw_and_learns_as_plain():
    """GroupNorm's NHWC CPU kernel is slow: channels_last training hands it NCHW inputs, with the same loss and
    gradients as the plain path; the EMA copy and a network in eval mode (sampling) keep channels_last."""
    plain, fast = tiny_run(FastPath()), tiny_run(FastPath(train_channels_last=True))
    layouts = group_norm_layouts(fast.model.nn_model)
    sampling_layouts = group_norm_layouts(fast.ema.module)
    images, labels = one_batch()
    losses = []
    for run in (plain, fast):
        torch.manual_seed(3)
        losses.append(training_step(run, images, labels).item())
    assert layouts == [False]                              # one GroupNorm (the final block), given NCHW input
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for expected, found in zip(plain.model.nn_model.parameters(), fast.model.nn_model.parameters()):
        assert torch.allclose(expected.grad, found.grad, rtol=1e-3, atol=1e-5)
    x, t, c = network_inputs()
    with torch.no_grad():
        fast.ema.module(to_channels_last(x, True), t, c)
        fast.model.nn_model.eval()(to_channels_last(x, True), t, c)
    assert sampling_layouts == [True] and layouts == [False, True]


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
    with inductor.patch(fallback_random=True):                 # the same random draws as eager mode
        for compile_mode in ("", "default"):
            run = tiny_run(FastPath(compile_training=compile_mode))
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


# ---- what only a GPU runs, covered here ------------------------------------------------------------------------

def round_to_tf32(tensor):
    """``tensor`` rounded to TF32 (10 bits of mantissa), as cuDNN's tensor-core algorithms read fp32 inputs."""
    bits = tensor.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(tensor.shape)


def with_tf32_convolutions_at_batch(network, batch):
    """Let ``network``'s convolutions compute in TF32 on batches of ``batch`` images only: what cuDNN does when it
    picks a tensor-core algorithm for one batch size and another for the other."""
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            def forward(x, module=module):
                if len(x) != batch:
                    return torch.nn.Conv2d.forward(module, x)
                return module._conv_forward(round_to_tf32(x), round_to_tf32(module.weight), module.bias)
            module.forward = forward
    return network


def test_the_shared_encoders_check_holds_when_convolutions_change_algorithm_with_the_batch():
    """SharedEncoder.matches compares batches of 2 and 4 images; on CUDA, cuDNN may compute one of them in TF32.
    The check must still accept the U-Net, and still refuse a network whose first half sees the class."""
    network = with_tf32_convolutions_at_batch(trained_network(), batch=4)
    fast = FastInference(network, FastPath(share_encoder=True))
    assert fast.copies is not None
    x, t, c = network_inputs(4)
    with torch.no_grad():
        shared, full = fast.noise_of_copies(x[:2], t, c, 2), network(x[:2].repeat(2, 1, 1, 1), t, c)
    assert 0 < (shared - full).norm() / full.norm() < 1e-2


def test_the_shared_encoder_keeps_channels_last_and_compiles_to_one_graph():
    """Its second half gets channels_last inputs from a channels_last network (``repeat`` would return the default
    layout, and every layer would convert it), and torch.compile sees no graph break in it."""
    network = trained_network()
    fast = FastInference(network, FastPath(sample_channels_last=True, share_encoder=True))
    layouts = []
    for layer in (fast.network.decoder1.layers[0], fast.network.decoder2.layers[0], fast.network.final[0]):
        layer.register_forward_pre_hook(
            lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    x, t, c = network_inputs(4)
    with torch.no_grad():
        fast.noise_of_copies(x[:2], t, c, 2)
        assert layouts == [True, True, True]
        explanation = torch._dynamo.explain(fast.copies)(to_channels_last(x[:2], True), t, c, 2)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_benchs_rows_each_run_with_their_own_switches():
    """cudnn.benchmark is one of the fast path's choices: the plain row runs without it, even when its rounds
    alternate with those of a path that turns it on (a global switch, set before every round)."""
    from tools import bench
    seen = []
    original_step = bench.training_step

    def recording_step(run, images, labels):
        seen.append((run.path.cudnn_benchmark, torch.backends.cudnn.benchmark))
        return original_step(run, images, labels)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "training_step", recording_step)
        paths = {"plain": FastPath(), "tuned": FastPath(cudnn_benchmark=True)}
        bench.alternate({name: (lambda p=path: bench.training_rounds("mnist", 8, torch.device("cpu"), p, 2, 1))
                         for name, path in paths.items()}, rounds=2)
    torch.backends.cudnn.benchmark = False
    assert len(seen) == 2 * (3 + 2) and all(chosen == used for chosen, used in seen)
    assert not bench.variants(torch.device("cpu"), 1, full=True, compile_too=False)["plain"].cudnn_benchmark


def test_the_bench_times_each_variant_only_in_the_phases_it_changes():
    """A sampling-only ingredient trains exactly as the plain path does: timing it there would only show noise
    (and a compiled variant would find an earlier one's kernels in the cache)."""
    from tools import bench
    for in_channels in (1, 3):
        chosen = bench.variants(torch.device("cpu"), in_channels, full=True, compile_too=False)
        training, sampling = bench.timed_in(chosen, "train_img_s"), bench.timed_in(chosen, "ddpm400_img_s")
        assert {"plain", "fast"} <= set(sampling) and "plain" in training   # fast trains as plain on some CPUs
        assert "shared encoder only" in sampling and "shared encoder only" not in training
        assert "fold batchnorm only" not in training and "foreach adam only" not in sampling
        for phase, timed in (("train_img_s", training), ("ddpm400_img_s", sampling)):
            same = bench.same_as(chosen, phase)
            assert set(same) == set(chosen) - set(timed) and set(same.values()) <= set(timed)
            for name, other in same.items():    # computes that phase with the choices of a variant timed before it
                assert bench.phase_choices(chosen[name], phase) == bench.phase_choices(chosen[other], phase)
                assert list(chosen).index(other) < list(chosen).index(name)
            plain = bench.phase_choices(FastPath(), phase)
            assert all(name in timed for name, path in chosen.items()    # the rule table reads every ingredient
                       if name.endswith(" only") and bench.phase_choices(path, phase) != plain
                       and not path.compile_training and not path.compile_sampling)


def test_the_cuda_path_turns_cudnn_benchmark_on_and_torchrun_compiles_without_cuda_graphs():
    cuda = torch.device("cuda")
    rules = FastPath.for_machine(cuda, 3, compile=True, machine=machine("cuda", gpu="NVIDIA H100"))
    assert rules.cudnn_benchmark and rules.compile_training == "reduce-overhead"
    assert not FastPath.for_machine(torch.device("cpu"), 3, machine=machine()).cudnn_benchmark
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Machine, "of", classmethod(lambda cls, device: machine("cuda", gpu="NVIDIA H100")))
        single = path_for_run(cuda, 3, fast=True, compile=True, precision="auto")
        under_torchrun = path_for_run(cuda, 3, fast=True, compile=True, precision="auto", distributed=True)
        plain_under_torchrun = path_for_run(cuda, 3, fast=False, compile=True, precision="auto", distributed=True)
    assert single.compile_training == single.compile_sampling == "reduce-overhead"
    for path in (under_torchrun, plain_under_torchrun):                           # DDP's hooks between graph replays
        assert path.compile_training == path.compile_sampling == "default"


def test_the_fused_adam_runs_wherever_the_path_asks_for_it():
    """make_optimizer takes the choice from the path, not from the device: the CPU tests run the CUDA path's Adam."""
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(parameters, 1e-3, FastPath(fused_adam=True)).param_groups[0]["fused"]
    assert not make_optimizer(parameters, 1e-3, FastPath()).param_groups[0]["fused"]


def rule_benchmarks() -> list[str]:
    """The benchmark CSVs that docs/speed.md's rule table is generated from (one per CPU machine class)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "speed.md")) as file:
        specs = re.findall(r"^<!-- table: rules (.+?) -->$", file.read(), flags=re.MULTILINE)
    return [os.path.join(root, path) for spec in specs for path in spec.split()]


def test_each_rule_keeps_only_what_its_benchmark_measured_faster():
    """Every ingredient a machine class's rule turns on ran faster alone than the plain path in that class's
    committed benchmark (for the images it applies to), and each compile threshold lies beyond the run length
    at which compiling repaid its compile time there."""
    from tools.bench import compile_break_even, ingredient_ratios
    from tools.doc_tables import read_rows
    paths = rule_benchmarks()
    assert paths, "docs/speed.md names no benchmark for its rule table"
    for path in paths:
        rows = read_rows(path)
        rule = RULES[rows[0]["machine_class"]]
        for field, by_config in ingredient_ratios(rows).items():
            if field.startswith("compile") or not getattr(rule.path, field):
                continue
            applies = {config: ratio for config, ratio in by_config.items()
                       if field != "train_channels_last" or rule.train_channels_last_grey or config != "mnist"}
            assert min(applies.values()) >= 1.0, f"{path}: {field} is on but measured {applies}"
        break_even = compile_break_even(rows)
        for phase, limit in (("training", rule.compile_training_from), ("sampling", rule.compile_sampling_from)):
            if limit is not None:
                assert break_even[phase] and all(value is not None and value <= limit
                                                 for value in break_even[phase].values()), (path, phase, break_even)
