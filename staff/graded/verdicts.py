"""The graded checks: the inputs the grader gives each probe and the verdict on what the probe returned.

Runs only in the grading process (staff/grade.py), never beside the student's code: a check's ``verify`` gets the
inputs the grader made and the arrays the probe (staff/graded/probes.py) returned from the student's code, and
raises ``Failed`` with the reason when they contradict the sheets' mathematics. Tolerances: float32 results are
compared with rtol/atol around 1e-4..1e-5; a random draw is judged by its statistics with bounds of at least five
standard errors. The checks ask what the sheets ask and no more: no batching, call counts, dictionary keys beyond
the sheet's, or exact random streams (a reverse step's noise is judged by its distribution when it is not the
expected draw), and GELU in its exact or tanh form.

Sheet 1: ../shared/seeds/000_33643ade1e752521.txt, sheet 2: ../shared/seeds/003_b5fe0bdf44cae1a0.txt.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, NamedTuple

import numpy as np


class Failed(AssertionError):
    """A check's verdict: the student's result contradicts the sheet; the message says how."""


class Check(NamedTuple):
    name: str
    task: str
    probe: str
    inputs: Callable[[np.random.Generator], dict]
    weight: float = 1.0

    @property
    def verify(self) -> Callable[[dict, dict], None]:
        """The verdict: verify(inputs, outputs) raises Failed, attached to the inputs function."""
        return self.inputs.verify


CHECKS: List[Check] = []


def check(task: str, probe: str, weight: float = 1.0):
    """Register ``function(rng) -> inputs`` with its verify (``function.verify``) as a check of ``task``."""
    def register(function):
        CHECKS.append(Check(function.__name__, task, probe, function, weight))
        return function
    return register


def verifies(inputs_function):
    def attach(verify):
        inputs_function.verify = verify
        return verify
    return attach


def _torch():
    import torch
    return torch


def t64(value):
    torch = _torch()
    return torch.from_numpy(np.array(value, dtype=np.float64, copy=True))


def need(outputs: dict, *keys: str) -> list:
    missing = [key for key in keys if key not in outputs]
    if missing:
        raise Failed(f"not computed: {', '.join(missing)}")
    return [outputs[key] for key in keys]


def close(actual, expected, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise Failed(f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}")
    if not np.all(np.isfinite(actual)):
        raise Failed(f"{what}: not finite")
    difference = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    if np.any(difference > bound):
        worst = int(np.argmax(difference - bound))
        raise Failed(f"{what}: differs from the sheet's value by up to {difference.max():.3g} "
                     f"(got {actual.reshape(-1)[worst]:.6g}, expected {expected.reshape(-1)[worst]:.6g})")


def standard_normal(values, what: str, mean_bound: float = None, std_bound: float = None) -> None:
    """values look like draws of N(0, 1): mean and std within five standard errors (or the bounds given)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = max(len(values), 1)
    mean_bound = mean_bound if mean_bound is not None else 5 / math.sqrt(n)
    std_bound = std_bound if std_bound is not None else 5 / math.sqrt(2 * n)
    if not np.all(np.isfinite(values)):
        raise Failed(f"{what}: not finite")
    if abs(values.mean()) > mean_bound or abs(values.std() - 1) > std_bound:
        raise Failed(f"{what} should be N(0, I): mean {values.mean():.3f}, std {values.std():.3f} over {n} values")


def linear_terms(beta1: float, beta2: float, T: int, betas=None) -> Dict[str, np.ndarray]:
    """The sheet's schedule in float64, indexed by t = 0..T (entry 0: beta_0 = 0)."""
    beta = np.concatenate([[0.0], np.linspace(beta1, beta2, T) if betas is None else np.asarray(betas, float)])
    alpha = 1 - beta
    alpha_bar = np.cumprod(alpha)
    return {"beta": beta, "alpha": alpha, "alpha_bar": alpha_bar}


def stub_eps(inputs: dict, y, t_fraction, c):
    """What the grader's linear stub network predicts: a y + b t + c . k (numpy, float64)."""
    y = np.asarray(y, dtype=np.float64)
    t_fraction = np.broadcast_to(np.asarray(t_fraction, dtype=np.float64).reshape(-1), (y.shape[0],))
    class_term = np.asarray(c, dtype=np.float64) @ np.asarray(inputs["stub_k"], dtype=np.float64)
    return float(inputs["stub_a"]) * y + (float(inputs["stub_b"]) * t_fraction + class_term).reshape(-1, 1, 1, 1)


def stub_inputs(rng: np.random.Generator, n_classes: int = 10) -> dict:
    return {"stub_a": np.array(rng.uniform(0.3, 0.7)), "stub_b": np.array(rng.uniform(-1, 1)),
            "stub_k": rng.uniform(-1, 1, n_classes).astype(np.float32)}


def schedule_inputs(beta1: float, beta2: float, T: int) -> dict:
    return {"beta1": np.array(beta1), "beta2": np.array(beta2), "T": np.array(T)}


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def gelu(x):
    torch = _torch()
    return torch.nn.functional.gelu(x)


# --------------------------------------------------------------------------------------------------------------
# Layers recomputed from the weights a probe returned
# --------------------------------------------------------------------------------------------------------------

def layer_kinds(outputs: dict) -> List[str]:
    return [str(outputs[f"layer{i}.kind"]) for i in range(int(outputs.get("n_layers", 0)))]


def conv(outputs: dict, prefix: str, x):
    torch = _torch()
    weight, bias = t64(outputs[f"{prefix}.weight"]), outputs.get(f"{prefix}.bias")
    return torch.nn.functional.conv2d(x, weight, None if bias is None else t64(bias),
                                      stride=tuple(outputs[f"{prefix}.stride"]),
                                      padding=tuple(outputs[f"{prefix}.padding"]))


def batch_norm(outputs: dict, prefix: str, x):
    torch = _torch()
    weight, bias = outputs.get(f"{prefix}.weight"), outputs.get(f"{prefix}.bias")
    return torch.nn.functional.batch_norm(x, t64(outputs[f"{prefix}.running_mean"]),
                                          t64(outputs[f"{prefix}.running_var"]),
                                          None if weight is None else t64(weight), None if bias is None else t64(bias),
                                          training=False, eps=float(outputs[f"{prefix}.eps"]))


def require_conv3(outputs: dict, prefix: str, in_channels: int, out_channels: int, what: str) -> None:
    got = (int(outputs[f"{prefix}.in_channels"]), int(outputs[f"{prefix}.out_channels"]),
           tuple(int(v) for v in outputs[f"{prefix}.kernel_size"]), tuple(int(v) for v in outputs[f"{prefix}.stride"]),
           tuple(int(v) for v in outputs[f"{prefix}.padding"]))
    if got != (in_channels, out_channels, (3, 3), (1, 1), (1, 1)):
        raise Failed(f"{what}: Conv2d{got[:2]} with kernel {got[2]}, stride {got[3]}, padding {got[4]}; the sheet "
                     f"asks for Conv2d({in_channels}, {out_channels}) with kernel size 3, stride 1, padding 1")


# --------------------------------------------------------------------------------------------------------------
# sheet1-convblock
# --------------------------------------------------------------------------------------------------------------

def convblock_inputs(rng, in_channels, out_channels):
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(in_channels),
            "out_channels": np.array(out_channels), "x": f32(rng, 2, in_channels, 6, 6)}


def verify_convblock(inputs: dict, outputs: dict) -> None:
    kinds = layer_kinds(outputs)
    convs = [f"layer{i}" for i, kind in enumerate(kinds) if kind == "Conv2d"]
    norms = [f"layer{i}" for i, kind in enumerate(kinds) if kind == "BatchNorm2d"]
    if len(convs) != 2 or len(norms) != 2:
        raise Failed(f"ConvBlock has layers {kinds}; the sheet asks for two sub-blocks Conv2d -> BatchNorm2d -> GELU")
    in_channels, out_channels = int(inputs["in_channels"]), int(inputs["out_channels"])
    first = [p for p in convs if int(outputs[f"{p}.in_channels"]) == in_channels][:1] or convs[:1]
    second = [p for p in convs if p != first[0]]
    require_conv3(outputs, first[0], in_channels, out_channels, "ConvBlock's first sub-block")
    require_conv3(outputs, second[0], out_channels, out_channels, "ConvBlock's second sub-block")
    x = t64(inputs["x"])
    h1 = gelu(batch_norm(outputs, norms[0], conv(outputs, first[0], x)))
    h2 = gelu(batch_norm(outputs, norms[1], conv(outputs, second[0], h1)))
    shortcut = x if in_channels == out_channels else h1
    (out,) = need(outputs, "out")
    rule = "(input + h2) / sqrt(2)" if in_channels == out_channels else "(h1 + h2) / sqrt(2)"
    close(out, (shortcut + h2) / math.sqrt(2), f"ConvBlock({in_channels}, {out_channels}) output, the sheet's {rule}",
          rtol=1e-3, atol=2e-3)


@check("sheet1-convblock", "convblock")
def convblock_equal_channels(rng):
    return convblock_inputs(rng, 4, 4)


@check("sheet1-convblock", "convblock")
def convblock_different_channels(rng):
    return convblock_inputs(rng, 3, 5)


convblock_equal_channels.verify = verify_convblock
convblock_different_channels.verify = verify_convblock


# --------------------------------------------------------------------------------------------------------------
# sheet1-encoder, sheet1-decoder, sheet1-embedding, sheet1-final-block
# --------------------------------------------------------------------------------------------------------------

@check("sheet1-encoder", "encoder_block")
def encoder_block(rng):
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(3), "out_channels": np.array(5),
            "x": f32(rng, 2, 3, 8, 8)}


@verifies(encoder_block)
def _(inputs, outputs):
    torch = _torch()
    if int(outputs["n_convblocks"]) != 2:
        raise Failed(f"Encoder_Block has {int(outputs['n_convblocks'])} ConvBlocks; the sheet asks for two")
    block0_in, block0_out, block1_in, block1_out, out = need(outputs, "block0.in0", "block0.out", "block1.in0",
                                                             "block1.out", "out")
    close(block0_in, inputs["x"], "the first ConvBlock's input (the block's input)", atol=1e-6)
    if block0_out.shape[1] != 5:
        raise Failed(f"the first ConvBlock has {block0_out.shape[1]} output channels; the sheet: out_channels (5)")
    close(block1_in, block0_out, "the second ConvBlock's input (the first one's output)", atol=1e-6)
    expected = torch.nn.functional.max_pool2d(t64(block1_out), kernel_size=2, stride=2)
    close(out, expected, "Encoder_Block output, MaxPool2d(kernel 2, stride 2) of the second ConvBlock")


def decoder_inputs(rng, in_channels, out_channels, transpose, skip_channels, size):
    found = {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(in_channels),
             "out_channels": np.array(out_channels), "transpose": np.array(transpose),
             "x": f32(rng, 2, in_channels - skip_channels, size, size)}
    if skip_channels:
        found["skip"] = f32(rng, 2, skip_channels, size, size)
    return found


def verify_decoder(inputs, outputs):
    torch = _torch()
    if int(outputs["n_transposes"]) != 1 or int(outputs["n_convblocks"]) != 2:
        raise Failed(f"Decoder_Block has {int(outputs['n_transposes'])} ConvTranspose2d and "
                     f"{int(outputs['n_convblocks'])} ConvBlocks; the sheet asks for one, then two ConvBlocks")
    k = int(inputs["transpose"])
    kernel, stride = tuple(outputs["transpose0.kernel_size"]), tuple(outputs["transpose0.stride"])
    if kernel != (k, k) or stride != (k, k):
        raise Failed(f"ConvTranspose2d with kernel {kernel} and stride {stride}; the sheet: both = transpose ({k})")
    t_in, t_out, b0_in, b0_out, b1_in, b1_out, out = need(
        outputs, "transpose0.in0", "transpose0.out", "block0.in0", "block0.out", "block1.in0", "block1.out", "out")
    x = inputs["x"] if "skip" not in inputs else np.concatenate([inputs["x"], inputs["skip"]], axis=1)
    close(t_in, x, "the transpose convolution's input (x, then the skip, concatenated along the channels)"
          if "skip" in inputs else "the transpose convolution's input (x)", atol=1e-6)
    bias = outputs.get("transpose0.bias")
    expected = torch.nn.functional.conv_transpose2d(t64(t_in), t64(outputs["transpose0.weight"]),
                                                    None if bias is None else t64(bias), stride=k)
    close(t_out, expected, "the transpose convolution's output")
    close(b0_in, t_out, "the first ConvBlock's input (the transpose convolution's output)", atol=1e-6)
    close(b1_in, b0_out, "the second ConvBlock's input (the first one's output)", atol=1e-6)
    close(out, b1_out, "Decoder_Block output (the second ConvBlock's)", atol=1e-6)


@check("sheet1-decoder", "decoder_block")
def decoder_with_skip(rng):
    return decoder_inputs(rng, 6, 4, 2, 2, 5)


@check("sheet1-decoder", "decoder_block")
def decoder_without_skip(rng):
    return decoder_inputs(rng, 4, 4, 3, 0, 2)


decoder_with_skip.verify = verify_decoder
decoder_without_skip.verify = verify_decoder


def verify_embedding(inputs, outputs):
    torch = _torch()
    n_in, n_out = int(inputs["in_channels"]), int(inputs["out_channels"])
    if int(outputs["n_linears"]) != 2:
        raise Failed(f"Embedding_Block has {int(outputs['n_linears'])} Linear layers; the sheet asks for two")
    shapes = [(int(outputs[f"linear{i}.in_features"]), int(outputs[f"linear{i}.out_features"])) for i in range(2)]
    if shapes != [(n_in, n_out), (n_out, n_out)]:
        raise Failed(f"Linear layers {shapes}; the sheet: Linear({n_in}, {n_out}) then Linear({n_out}, {n_out})")
    x = t64(inputs["x"]).reshape(-1, n_in)
    hidden = x @ t64(outputs["linear0.weight"]).T + t64(outputs["linear0.bias"])
    hidden = torch.sin(hidden) if str(inputs["activation"]) == "sin" else gelu(hidden)
    expected = hidden @ t64(outputs["linear1.weight"]).T + t64(outputs["linear1.bias"])
    (out,) = need(outputs, "out")
    close(np.asarray(out).reshape(expected.shape) if np.size(out) == expected.numel() else out, expected,
          f"Embedding_Block({n_in}, {n_out}, '{inputs['activation']}') output, Linear -> activation -> Linear",
          rtol=1e-3, atol=1e-3)


@check("sheet1-embedding", "embedding_block")
def embedding_sine(rng):
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(1), "out_channels": np.array(6),
            "activation": np.array("sin"), "x": rng.uniform(0, 1, (4, 1, 1, 1)).astype(np.float32)}


@check("sheet1-embedding", "embedding_block")
def embedding_gelu(rng):
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(3), "out_channels": np.array(6),
            "activation": np.array("GELU"), "x": f32(rng, 4, 3)}


embedding_sine.verify = verify_embedding
embedding_gelu.verify = verify_embedding


def final_inputs(rng, in_channels, n_features, height):
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(in_channels),
            "n_features": np.array(n_features), "height": np.array(height),
            "z": f32(rng, 2, 2 * n_features, height, height)}


def verify_final(inputs, outputs):
    torch = _torch()
    kinds = layer_kinds(outputs)
    if kinds != ["Conv2d", "GroupNorm", "ReLU", "Conv2d"]:
        raise Failed(f"the final block has layers {kinds}; the sheet: Conv2d, GroupNorm, ReLU, Conv2d")
    features, channels = int(inputs["n_features"]), int(inputs["in_channels"])
    require_conv3(outputs, "layer0", 2 * features, features, "the final block's first Conv2d (halves the channels)")
    require_conv3(outputs, "layer3", features, channels, "the final block's last Conv2d (to the image's channels)")
    if int(outputs["layer1.num_groups"]) != 8:
        raise Failed(f"GroupNorm with {int(outputs['layer1.num_groups'])} groups; the sheet: 8 groups")
    z = t64(inputs["z"])
    h = conv(outputs, "layer0", z)
    h = torch.nn.functional.group_norm(h, 8, t64(outputs["layer1.weight"]), t64(outputs["layer1.bias"]),
                                       float(outputs["layer1.eps"]))
    expected = conv(outputs, "layer3", torch.relu(h))
    close(outputs["out"], expected, "the final block's output")


@check("sheet1-final-block", "final_block")
def final_block_grey(rng):
    return final_inputs(rng, 1, 16, 8)


@check("sheet1-final-block", "final_block")
def final_block_colour(rng):
    return final_inputs(rng, 3, 8, 4)


final_block_grey.verify = verify_final
final_block_colour.verify = verify_final


# --------------------------------------------------------------------------------------------------------------
# sheet1-unet-forward: the wiring of figures 3 and 4, read off the inputs and outputs of the U-Net's blocks
# --------------------------------------------------------------------------------------------------------------

def unet_inputs(rng, in_channels, n_features, height, n):
    c = np.zeros((n, 10), dtype=np.float32)
    c[0, int(rng.integers(10))] = 1
    c[2, [1, 7]] = 0.5                       # row 1: the null class; row 2: a mixture
    return {"seed": np.array(int(rng.integers(1 << 30))), "in_channels": np.array(in_channels),
            "n_features": np.array(n_features), "height": np.array(height),
            "x": f32(rng, n, in_channels, height, height), "t": rng.uniform(0, 1, (n, 1, 1, 1)).astype(np.float32),
            "c": c}


def verify_unet(inputs, outputs):
    torch = _torch()
    n, features, height = len(inputs["x"]), int(inputs["n_features"]), int(inputs["height"])
    for name in ("init_conv", "encoder1", "encoder2", "decoder0", "decoder1", "decoder2", "final",
                 "time_embedding1", "time_embedding2", "class_embedding1", "class_embedding2"):
        if f"{name}.out" not in outputs:
            raise Failed(f"UNet.forward does not use self.{name} (figures 3 and 4)")
    o = outputs
    close(o["init_conv.in0"], inputs["x"], "init_conv's input (the image x)", atol=1e-6)
    close(o["encoder1.in0"], o["init_conv.out"], "encoder1's input (init_conv's output)", atol=1e-6)
    close(o["encoder2.in0"], o["encoder1.out"], "encoder2's input (encoder1's output)", atol=1e-6)
    hidden = gelu(torch.nn.functional.avg_pool2d(t64(o["encoder2.out"]), height // 4))
    close(o["decoder0.in0"], hidden, "decoder0's input, GELU(AvgPool2d(height / 4)) of encoder2's output",
          atol=1e-5)
    for name in ("time_embedding1", "time_embedding2"):
        close(np.asarray(o[f"{name}.in0"]).reshape(-1), inputs["t"].reshape(-1), f"{name}'s input (t)", atol=1e-6)
    for name in ("class_embedding1", "class_embedding2"):
        close(np.asarray(o[f"{name}.in0"]).reshape(n, -1), inputs["c"], f"{name}'s input (c)", atol=1e-6)

    def embedded(name, channels):
        return t64(o[f"{name}.out"]).reshape(n, channels, 1, 1)

    steps = (("decoder1", "decoder0", "encoder2", 2 * features, "1"), ("decoder2", "decoder1", "encoder1", features, "2"))
    for decoder, previous, skip, channels, k in steps:
        combined = embedded(f"class_embedding{k}", channels) * t64(o[f"{previous}.out"]) \
            + embedded(f"time_embedding{k}", channels)
        what = f"{decoder}'s input, c_emb{k} * {previous} output + t_emb{k} with the skip of {skip}"
        if f"{decoder}.in1" in o:
            close(o[f"{decoder}.in0"], combined, what, atol=1e-5)
            close(o[f"{decoder}.in1"], o[f"{skip}.out"], f"{decoder}'s skip input ({skip}'s output)", atol=1e-6)
        else:
            close(o[f"{decoder}.in0"], torch.cat((combined, t64(o[f"{skip}.out"])), dim=1), what, atol=1e-5)
    close(o["final.in0"], torch.cat((t64(o["decoder2.out"]), t64(o["init_conv.out"])), dim=1),
          "the final block's input, decoder2's output then init_conv's, concatenated", atol=1e-6)
    close(o["out"], o["final.out"], "UNet output (the final block's)", atol=1e-6)


@check("sheet1-unet-forward", "unet_forward")
def unet_forward_grey(rng):
    return unet_inputs(rng, 1, 8, 8, 3)


@check("sheet1-unet-forward", "unet_forward")
def unet_forward_colour(rng):
    return unet_inputs(rng, 3, 8, 12, 3)


unet_forward_grey.verify = verify_unet
unet_forward_colour.verify = verify_unet


@check("sheet1-parameter-check", "parameter_check")
def parameter_check(rng):
    return {"seed": np.array(0)}


@verifies(parameter_check)
def _(inputs, outputs):
    printed, counts = need(outputs, "printed", "counts")
    numbers = {int(re.sub(r"[,_' ]", "", m)) for m in re.findall(r"\d{1,3}(?:[,_' ]\d{3})+|\d+", str(printed))}
    if not {int(v) for v in np.asarray(counts).reshape(-1)} & numbers:
        raise Failed(f"`python networks/Conditional_UNet.py` does not print the trainable parameter count "
                     f"({int(counts[0])} for UNet(3, 32, 10, 32)); it printed: {str(printed)[-200:]!r}")
    if abs(int(counts[0]) - 717_955) > 0.01 * 717_955:
        raise Failed(f"UNet(3, 32, 10, 32) has {int(counts[0])} trainable parameters; the sheet: around 718k")


# --------------------------------------------------------------------------------------------------------------
# sheet1-schedule, sheet2-cosine-schedule, sheet2-sigmoid-schedule
# --------------------------------------------------------------------------------------------------------------

SHEET_TERMS = ("sqrt_beta_t", "alpha_t", "alpha_bar_t", "one_over_sqrt_alpha_t", "sqrt_alpha_bar_t",
               "sqrt_one_minus_alpha_bar_t", "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t")


def expected_terms(terms: dict) -> dict:
    beta, alpha, alpha_bar = terms["beta"], terms["alpha"], terms["alpha_bar"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"sqrt_beta_t": np.sqrt(beta), "alpha_t": alpha, "alpha_bar_t": alpha_bar,
                "one_over_sqrt_alpha_t": 1 / np.sqrt(alpha), "sqrt_alpha_bar_t": np.sqrt(alpha_bar),
                "sqrt_one_minus_alpha_bar_t": np.sqrt(1 - alpha_bar),
                "one_minus_alpha_t_over_sqrt_1_minus_alpha_bar_t": (1 - alpha) / np.sqrt(1 - alpha_bar)}


@check("sheet1-schedule", "ddpm_schedule", weight=3)
def schedule_linear(rng):
    return schedule_inputs(1e-4, 0.02, 400)


def verify_terms(inputs, outputs, what: str, rtol: float, atol: float) -> None:
    """The schedule's terms at t = 1..T against eqs. 3-5 of the betas the DDPM gave it (inputs["betas"]) or of
    the linear schedule."""
    T = int(inputs["T"])
    betas = inputs["betas"] if "betas" in inputs else None
    expected = expected_terms(linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), T, betas))
    missing = [name for name in SHEET_TERMS if f"term.{name}" not in outputs]
    if missing:
        raise Failed(f"the schedule's dictionary lacks {', '.join(missing)} (the keys the file defines)")
    for name in SHEET_TERMS:
        got = np.asarray(outputs[f"term.{name}"]).reshape(-1)
        if len(got) != T + 1:
            raise Failed(f"{name} has {len(got)} entries; the file defines T + 1 = {T + 1}, indexed by t = 0..T")
        close(got[1:], expected[name][1:], f"{name} at t = 1..T {what}", rtol=rtol, atol=atol)


@verifies(schedule_linear)
def _(inputs, outputs):
    verify_terms(inputs, outputs, "(the linear schedule)", rtol=1e-5, atol=1e-7)


@check("sheet1-schedule", "ddpm_schedule")
def schedule_noise_free_entry_0(rng):
    return schedule_inputs(1e-4, 0.02, 400)


@verifies(schedule_noise_free_entry_0)
def _(inputs, outputs):
    entry = {name: float(np.asarray(outputs.get(f"term.{name}", [np.nan])).reshape(-1)[0]) for name in SHEET_TERMS}
    if not all(math.isfinite(value) for value in entry.values()):
        raise Failed(f"entry t = 0 of the schedule is not finite: {entry}")
    if entry["alpha_bar_t"] != 1 or entry["alpha_t"] != 1 or entry["sqrt_beta_t"] != 0:
        raise Failed("entry t = 0 is the noise-free state (beta_0 = 0, alpha_0 = alpha_bar_0 = 1), got "
                     f"alpha_t {entry['alpha_t']}, alpha_bar_t {entry['alpha_bar_t']}, sqrt_beta_t {entry['sqrt_beta_t']}")


def cosine_expected(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    t = np.arange(T + 1)
    f = np.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def sigmoid_expected(start: float, end: float, T: int, s_limit: float = 6.0) -> np.ndarray:
    """Sheet 2, eq. 10: beta_t = beta_start + sigmoid(-s_limit + 2 t s_limit / T) (beta_end - beta_start)."""
    t = np.arange(1, T + 1)
    return start + (end - start) / (1 + np.exp(-(-s_limit + 2 * t * s_limit / T)))


# The schedule is used with every schedule the training offers (--schedule, sheet 2, 2.3): the DDPM hands
# ddpm_schedule the betas of the chosen schedule, and its terms must follow from those betas, not from a linear
# schedule of its own. The probe hands over the grader's betas, so a mistake in another task's schedule costs
# nothing here.
@check("sheet1-schedule", "ddpm_schedule")
def schedule_of_cosine_betas(rng):
    return dict(schedule_inputs(1e-4, 0.02, 400), schedule=np.array("cosine"), betas=cosine_expected(400))


@check("sheet1-schedule", "ddpm_schedule")
def schedule_of_sigmoid_betas(rng):
    return dict(schedule_inputs(1e-4, 0.02, 120), schedule=np.array("sigmoid"),
                betas=sigmoid_expected(1e-4, 0.02, 120))


@verifies(schedule_of_cosine_betas)
def _(inputs, outputs):
    verify_terms(inputs, outputs, "of the cosine schedule's betas that the DDPM passes (--schedule cosine)",
                 rtol=1e-4, atol=1e-6)


@verifies(schedule_of_sigmoid_betas)
def _(inputs, outputs):
    verify_terms(inputs, outputs, "of the sigmoid schedule's betas that the DDPM passes (--schedule sigmoid)",
                 rtol=1e-4, atol=1e-6)


def verify_cosine(inputs, outputs):
    T = int(inputs["T"])
    kwargs = {"s": float(inputs["s"]), "max_beta": float(inputs["max_beta"])} if "s" in inputs else {}
    close(np.asarray(need(outputs, "betas")[0]).reshape(-1) if np.size(outputs["betas"]) == T else outputs["betas"],
          cosine_expected(T, **kwargs), "the cosine schedule's beta_1..beta_T (Nichol and Dhariwal, clipped)",
          rtol=1e-4, atol=1e-6)


@check("sheet2-cosine-schedule", "cosine_schedule")
def cosine_400(rng):
    return {"T": np.array(400)}


@check("sheet2-cosine-schedule", "cosine_schedule")
def cosine_10(rng):
    return {"T": np.array(10)}


@check("sheet2-cosine-schedule", "cosine_schedule")
def cosine_offset_and_clip(rng):
    return {"T": np.array(50), "s": np.array(0.05), "max_beta": np.array(0.5)}


cosine_400.verify = cosine_10.verify = cosine_offset_and_clip.verify = verify_cosine


def verify_sigmoid(inputs, outputs):
    T, start, end = int(inputs["T"]), float(inputs["beta_start"]), float(inputs["beta_end"])
    s_limit = float(inputs["s_limit"]) if "s_limit" in inputs else 6.0
    expected = sigmoid_expected(start, end, T, s_limit)
    close(need(outputs, "betas")[0], expected, "the sigmoid schedule's beta_1..beta_T (sheet 2, eq. 10)",
          rtol=1e-5, atol=1e-9)


@check("sheet2-sigmoid-schedule", "sigmoid_schedule")
def sigmoid_default_limit(rng):
    return {"beta_start": np.array(1e-4), "beta_end": np.array(0.02), "T": np.array(400)}


@check("sheet2-sigmoid-schedule", "sigmoid_schedule")
def sigmoid_given_limit(rng):
    return {"beta_start": np.array(1e-3), "beta_end": np.array(0.05), "T": np.array(37), "s_limit": np.array(3.0)}


sigmoid_default_limit.verify = sigmoid_given_limit.verify = verify_sigmoid


# --------------------------------------------------------------------------------------------------------------
# sheet2-q-sample, sheet2-p-losses, sheet1-algorithm1
# --------------------------------------------------------------------------------------------------------------

def q_inputs(rng, beta1, beta2, T, t):
    n = len(t)
    return dict(schedule_inputs(beta1, beta2, T), **stub_inputs(rng), y0=f32(rng, n, 2, 3, 3),
                noise=f32(rng, n, 2, 3, 3), t=np.array(t, dtype=np.int64))


def diffused(inputs, y0=None, noise=None, t=None):
    terms = linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), int(inputs["T"]))
    t = inputs["t"] if t is None else t
    a = terms["alpha_bar"][np.asarray(t)].reshape(-1, 1, 1, 1)
    y0 = inputs["y0"] if y0 is None else y0
    noise = inputs["noise"] if noise is None else noise
    return np.sqrt(a) * np.asarray(y0, np.float64) + np.sqrt(1 - a) * np.asarray(noise, np.float64)


def verify_q_sample(inputs, outputs):
    close(need(outputs, "y_t")[0], diffused(inputs),
          "q_sample: y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps (S1 eq. 3, S2 eq. 4)")


@check("sheet2-q-sample", "q_sample")
def q_sample_sheet_schedule(rng):
    return q_inputs(rng, 1e-4, 0.02, 400, [1, 2, 100, 399, 400])


@check("sheet2-q-sample", "q_sample")
def q_sample_large_betas(rng):
    return q_inputs(rng, 0.1, 0.9, 4, [4, 1, 3, 2])


q_sample_sheet_schedule.verify = q_sample_large_betas.verify = verify_q_sample


def noise_loss(predicted, noise, loss_type: str, per_image: bool = False):
    error = np.asarray(noise, np.float64) - np.asarray(predicted, np.float64)
    values = np.abs(error) if loss_type == "l1" else error ** 2
    return values.reshape(len(values), -1).mean(axis=1) if per_image else values.mean()


def verify_p_losses(inputs, outputs):
    net_y, net_t, net_c, loss = need(outputs, "net_y", "net_t", "net_c", "loss")
    T = int(inputs["T"])
    close(net_y, diffused(inputs), "the network's input y_t (q_sample of y_0, t and the given noise)")
    close(net_t, inputs["t"] / T, "the network's time input t / T", atol=1e-6)
    close(net_c, inputs["c"], "the network's class input c", atol=0)
    expected = noise_loss(stub_eps(inputs, net_y, net_t, net_c), inputs["noise"], str(inputs["loss_type"]))
    close(loss, expected, f"the {inputs['loss_type']} loss between the noise and the network's prediction (eq. 9)")
    if int(outputs["loss_dim"]) != 0 or not bool(outputs["loss_requires_grad"]):
        raise Failed("p_losses must return a scalar tensor that carries the gradient to the network")


def p_losses_inputs(rng, loss_type):
    found = q_inputs(rng, 0.01, 0.2, 20, [1, 5, 10, 20])
    found["c"] = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 4)]
    found["loss_type"] = np.array(loss_type)
    return found


@check("sheet2-p-losses", "p_losses")
def p_losses_l2(rng):
    return p_losses_inputs(rng, "l2")


@check("sheet2-p-losses", "p_losses")
def p_losses_l1(rng):
    return p_losses_inputs(rng, "l1")


p_losses_l2.verify = p_losses_l1.verify = verify_p_losses


def algorithm1_inputs(rng, T, n, drop_prob, loss_type="l2", real_valued=False, shape=(1, 1, 1)):
    found = dict(schedule_inputs(0.01, 0.2, T), **stub_inputs(rng), seed=np.array(int(rng.integers(1 << 30))),
                 drop_prob=np.array(drop_prob), loss_type=np.array(loss_type),
                 y0=rng.uniform(-1, 1, (n,) + shape).astype(np.float32))
    if real_valued:
        found["c"] = (rng.uniform(0, 1, (n, 10)) + 0.1).astype(np.float32)
    else:
        found["c"] = np.eye(10, dtype=np.float32)[np.arange(n) % 10]
    return found


def algorithm1_records(inputs, outputs):
    net_y, net_t, net_c = need(outputs, "net_y", "net_t", "net_c")
    n = len(inputs["y0"])
    if len(net_t) != n:
        raise Failed(f"the network saw {len(net_t)} noisy images for a batch of {n}: Algorithm 1 predicts the noise "
                     f"of every image once")
    return net_y, net_t, net_c


@check("sheet1-algorithm1", "algorithm1")
def algorithm1_t_uniform_on_1_to_T(rng):
    return algorithm1_inputs(rng, 4, 8000, 0.0)


@verifies(algorithm1_t_uniform_on_1_to_T)
def _(inputs, outputs):
    _, net_t, _ = algorithm1_records(inputs, outputs)
    T, n = int(inputs["T"]), len(net_t)
    steps = np.round(np.asarray(net_t) * T)
    if not np.allclose(steps, np.asarray(net_t) * T, atol=1e-4):
        raise Failed("the network's time input is not t / T for an integer t")
    counts = np.bincount(steps.astype(int).clip(0, T + 1), minlength=T + 2)
    if counts[0] or counts[T + 1:].sum():
        raise Failed(f"t must be drawn from 1..T (Algorithm 1, line 3), got t = 0 {counts[0]} times, "
                     f"t > T {counts[T + 1:].sum()} times")
    bound = 5 * math.sqrt(0.25 * 0.75 / n)
    if any(abs(count / n - 1 / T) > bound for count in counts[1:T + 1]):
        raise Failed(f"t is not uniform on 1..{T}: counts {counts[1:T + 1].tolist()} of {n}")


@check("sheet1-algorithm1", "algorithm1")
def algorithm1_drops_about_p_of_the_classes(rng):
    return algorithm1_inputs(rng, 10, 20000, 0.1, real_valued=True)


@verifies(algorithm1_drops_about_p_of_the_classes)
def _(inputs, outputs):
    _, _, net_c = algorithm1_records(inputs, outputs)
    c = inputs["c"]
    dropped = np.all(np.asarray(net_c) == 0, axis=1)
    n, p = len(c), float(inputs["drop_prob"])
    if abs(dropped.mean() - p) > 5 * math.sqrt(p * (1 - p) / n):
        raise Failed(f"{dropped.mean():.3f} of the class vectors were set to 0; Algorithm 1, line 5: "
                     f"p_unconditioned = {p}")
    close(np.asarray(net_c)[~dropped], c[~dropped], "the class vectors kept (whole vectors, unchanged)", atol=0)


def verify_drop_extreme(inputs, outputs):
    _, _, net_c = algorithm1_records(inputs, outputs)
    dropped = int(np.all(np.asarray(net_c) == 0, axis=1).sum())
    expected = 0 if float(inputs["drop_prob"]) == 0 else len(inputs["c"])
    if dropped != expected:
        raise Failed(f"with p_unconditioned = {float(inputs['drop_prob'])}, {dropped} of {len(inputs['c'])} class "
                     f"vectors were set to 0, expected {expected}")


@check("sheet1-algorithm1", "algorithm1", weight=0.5)
def algorithm1_drop_probability_0(rng):
    return algorithm1_inputs(rng, 10, 200, 0.0)


@check("sheet1-algorithm1", "algorithm1", weight=0.5)
def algorithm1_drop_probability_1(rng):
    return algorithm1_inputs(rng, 10, 200, 1.0)


algorithm1_drop_probability_0.verify = algorithm1_drop_probability_1.verify = verify_drop_extreme


def verify_algorithm1_loss(inputs, outputs):
    net_y, net_t, net_c = algorithm1_records(inputs, outputs)
    T = int(inputs["T"])
    t = np.round(np.asarray(net_t) * T).astype(int)
    if t.min() < 1 or t.max() > T:
        raise Failed(f"t must be drawn from 1..T, got {t.min()}..{t.max()}")
    terms = linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), T)
    a = terms["alpha_bar"][t].reshape(-1, 1, 1, 1)
    eps = (np.asarray(net_y) - np.sqrt(a) * inputs["y0"].astype(np.float64)) / np.sqrt(1 - a)
    standard_normal(eps, "the noise eps read off y_t = sqrt(alpha_bar_t) y_0 + sqrt(1 - alpha_bar_t) eps (line 6 "
                    "with eqs. 2-3)")
    loss_type = str(inputs["loss_type"])
    expected = noise_loss(stub_eps(inputs, net_y, net_t, net_c), eps, loss_type)
    close(outputs["loss"], expected, f"the loss, the {loss_type} norm of eps - eps_theta(y_t, t, c) (line 7)",
          rtol=1e-3, atol=1e-5)
    if int(outputs["loss_dim"]) != 0 or not bool(outputs["loss_requires_grad"]):
        raise Failed("DDPM.forward must return a scalar tensor that carries the gradient to the network")


@check("sheet1-algorithm1", "algorithm1")
def algorithm1_loss_l2(rng):
    return algorithm1_inputs(rng, 10, 128, 0.3, "l2", shape=(1, 4, 4))


@check("sheet1-algorithm1", "algorithm1")
def algorithm1_loss_l1(rng):
    return algorithm1_inputs(rng, 10, 128, 0.3, "l1", shape=(1, 4, 4))


algorithm1_loss_l2.verify = algorithm1_loss_l1.verify = verify_algorithm1_loss


# --------------------------------------------------------------------------------------------------------------
# sheet2-guidance, sheet2-p-sample, sheet1-algorithm2
# --------------------------------------------------------------------------------------------------------------

@check("sheet2-guidance", "guidance_formula")
def guidance_formula(rng):
    return {"conditional": f32(rng, 3, 1, 2, 2), "unconditional": f32(rng, 3, 1, 2, 2),
            "weights": np.array([1.0, 3.0, -0.5, 0.0])}


@verifies(guidance_formula)
def _(inputs, outputs):
    for index, w in enumerate(inputs["weights"]):
        (got,) = need(outputs, f"w{index}")
        close(got, (1 + w) * inputs["conditional"].astype(float) - w * inputs["unconditional"].astype(float),
              f"eq. 5 with w = {w}: (1 + w) eps(c) - w eps(0)")


def guided_inputs(rng, w):
    return dict(schedule_inputs(1e-4, 0.02, 50), **stub_inputs(rng), y=f32(rng, 3, 1, 2, 2), t=np.array(17),
                c=np.eye(10, dtype=np.float32)[rng.choice(10, 3, replace=False)], w=np.array(w))


def verify_guided(inputs, outputs):
    T, t, w = int(inputs["T"]), int(inputs["t"]), float(inputs["w"])
    conditional = stub_eps(inputs, inputs["y"], t / T, inputs["c"])
    unconditional = stub_eps(inputs, inputs["y"], t / T, np.zeros_like(inputs["c"]))
    close(need(outputs, "out")[0], (1 + w) * conditional - w * unconditional,
          f"the guided noise at w = {w}: (1 + w) eps(y_t, t, c) - w eps(y_t, t, c = 0) (eq. 5)")


@check("sheet2-guidance", "guided_noise")
def guided_noise_w2(rng):
    return guided_inputs(rng, 2.0)


@check("sheet2-guidance", "guided_noise")
def guided_noise_w_half(rng):
    return guided_inputs(rng, 0.5)


@check("sheet2-guidance", "guided_noise")
def guided_noise_w0(rng):
    return guided_inputs(rng, 0.0)


guided_noise_w2.verify = guided_noise_w_half.verify = guided_noise_w0.verify = verify_guided


def p_sample_inputs(rng, t):
    return dict(schedule_inputs(1e-4, 0.02, 50), **stub_inputs(rng), y=f32(rng, 64, 1, 4, 4),
                eps=f32(rng, 64, 1, 4, 4), t=np.array(t), w=np.array(1.5), seed=np.array(int(rng.integers(1 << 30))),
                c=np.eye(10, dtype=np.float32)[np.arange(64) % 10])


def reverse_mean(inputs, eps):
    terms = linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), int(inputs["T"]))
    t = int(inputs["t"])
    alpha, alpha_bar = terms["alpha"][t], terms["alpha_bar"][t]
    return (inputs["y"].astype(float) - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha), \
        math.sqrt(1 - alpha)


def p_sample_eps(inputs, outputs):
    """The guided noise p_sample should use: the grader's stand-in when it called guided_noise, else eq. 5."""
    if len(np.asarray(outputs.get("guided_calls", []))):
        return inputs["eps"].astype(float)
    T, t, w = int(inputs["T"]), int(inputs["t"]), float(inputs["w"])
    return (1 + w) * stub_eps(inputs, inputs["y"], t / T, inputs["c"]) \
        - w * stub_eps(inputs, inputs["y"], t / T, np.zeros_like(inputs["c"]))


def verify_p_sample(inputs, outputs):
    out, again, z = need(outputs, "out", "again", "z")
    mean, sigma = reverse_mean(inputs, p_sample_eps(inputs, outputs))
    what = "y_{t-1} = 1/sqrt(alpha_t) (y_t - beta_t / sqrt(1 - alpha_bar_t) eps~) + sqrt(beta_t) z (eq. 4)"
    try:
        close(out, mean + sigma * z.astype(float), what)
        return
    except Failed:
        pass                                    # another draw of z: judge z by its distribution
    if np.asarray(out).shape != mean.shape:
        raise Failed(f"p_sample returned shape {list(np.asarray(out).shape)}, expected {list(mean.shape)}")
    standard_normal((np.asarray(out) - mean) / sigma, f"z in {what}")
    if np.allclose(out, again):
        raise Failed("p_sample at t > 1 gave the same y_{t-1} twice: z ~ N(0, I) must be drawn anew")


@check("sheet2-p-sample", "p_sample")
def p_sample_t2(rng):
    return p_sample_inputs(rng, 2)


@check("sheet2-p-sample", "p_sample")
def p_sample_t17(rng):
    return p_sample_inputs(rng, 17)


@check("sheet2-p-sample", "p_sample")
def p_sample_t50(rng):
    return p_sample_inputs(rng, 50)


p_sample_t2.verify = p_sample_t17.verify = p_sample_t50.verify = verify_p_sample


@check("sheet2-p-sample", "p_sample")
def p_sample_last_step_adds_no_noise(rng):
    return p_sample_inputs(rng, 1)


@verifies(p_sample_last_step_adds_no_noise)
def _(inputs, outputs):
    out, again = need(outputs, "out", "again")
    mean, _ = reverse_mean(inputs, p_sample_eps(inputs, outputs))
    close(out, mean, "the last step (t = 1): y_0 is the mean of eq. 4, z = 0")
    close(again, mean, "the last step (t = 1), drawn again: z = 0")


def algorithm2_inputs(rng, keep=None):
    found = dict(schedule_inputs(0.01, 0.2, 12), **stub_inputs(rng), seed=np.array(int(rng.integers(1 << 30))),
                 n_sample=np.array(4), size=np.array([1, 4, 4]), w=np.array(1.5))
    if keep is not None:
        found["keep"] = np.array(keep, dtype=np.int64)
    return found


def algorithm2_states(inputs, outputs):
    """y_T, ..., y_1 read off the network's inputs, step by step, and y_0; checks the steps' times."""
    net_y, net_t, net_c = need(outputs, "net_y", "net_t", "net_c")
    T, n = int(inputs["T"]), 10 * int(inputs["n_sample"])
    net_t = np.asarray(net_t)
    states, conditions = {}, None
    for t in range(T, 0, -1):
        rows = np.flatnonzero(np.abs(net_t - t / T) < 1e-5)
        if len(rows) < n:
            raise Failed(f"the network was not evaluated on the {n} images at t = {t} with time input t / T "
                         f"(Algorithm 2, line 2: t = T, ..., 1)")
        y = np.asarray(net_y)[rows]
        states[t] = y[:n]
        conditional = rows[np.any(np.asarray(net_c)[rows] != 0, axis=1)]
        if conditions is None:
            conditions = np.asarray(net_c)[conditional]
    if np.any(np.abs(net_t * T - np.round(net_t * T)) > 1e-4) or np.any(np.round(net_t * T) < 1):
        raise Failed("the network was evaluated at times other than t / T, t = 1..T")
    states[0] = need(outputs, "y0")[0]
    return states, conditions


def verify_algorithm2(inputs, outputs):
    states, conditions = algorithm2_states(inputs, outputs)
    T, n, w = int(inputs["T"]), 10 * int(inputs["n_sample"]), float(inputs["w"])
    grid = np.eye(10)[np.tile(np.arange(10), int(inputs["n_sample"]))]
    if conditions is None or conditions.shape != grid.shape or not np.allclose(conditions, grid):
        raise Failed("the conditional copies must carry the one-hot classes of the grid, class-fastest "
                     "([0, 1, ..., 9, 0, 1, ...])")
    standard_normal(states[T], "y_T (Algorithm 2, line 1)")
    terms = linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), T)
    residuals = []
    for t in range(T, 0, -1):
        y = states[t]
        eps = (1 + w) * stub_eps(inputs, y, t / T, grid) - w * stub_eps(inputs, y, t / T, np.zeros_like(grid))
        alpha, alpha_bar = terms["alpha"][t], terms["alpha_bar"][t]
        mean = (y - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
        if t == 1:
            close(states[0], mean, "y_0 after the last step (t = 1, z = 0; Algorithm 2, lines 3-5)")
        else:
            residual = (np.asarray(states[t - 1], np.float64) - mean) / math.sqrt(1 - alpha)
            standard_normal(residual, f"z at t = {t} in y_(t-1) = 1/sqrt(alpha_t) (y_t - ... eps~) + sqrt(beta_t) z "
                                      f"(lines 3-5)", mean_bound=0.25, std_bound=0.2)
            residuals.append(residual)
    standard_normal(np.concatenate([r.reshape(-1) for r in residuals]), "z over all steps t > 1")
    frames = np.asarray(outputs["frames"])
    keep = inputs["keep"].tolist() if "keep" in inputs else \
        [t - 1 for t in range(T, 0, -1) if t % 20 == 0 or t == T or t < 8]
    expected = [states[s] for s in sorted(set(keep), reverse=True)]
    if frames.shape[0] != len(expected):
        raise Failed(f"{frames.shape[0]} frames returned, expected {len(expected)} (y_s for s in {sorted(keep)})")
    for frame, s, state in zip(frames, sorted(set(keep), reverse=True), expected):
        close(frame, state, f"frame y_{s}", atol=1e-5)


@check("sheet1-algorithm2", "algorithm2", weight=2)
def algorithm2_sampling_loop(rng):
    return algorithm2_inputs(rng)


@check("sheet1-algorithm2", "algorithm2")
def algorithm2_frames_asked_for(rng):
    return algorithm2_inputs(rng, keep=[12, 5, 0])


algorithm2_sampling_loop.verify = algorithm2_frames_asked_for.verify = verify_algorithm2


# --------------------------------------------------------------------------------------------------------------
# sheet2-test-loop
# --------------------------------------------------------------------------------------------------------------

def test_loop_inputs(rng, loss_type):
    return dict(schedule_inputs(0.01, 0.2, 20), **stub_inputs(rng), loss_type=np.array(loss_type),
                eval_timesteps=np.array(5), images=rng.integers(0, 256, (10, 1, 4, 4)).astype(np.uint8),
                labels=rng.permutation(10).astype(np.int64))


def verify_test_loop(inputs, outputs):
    """What training.test_loss's docstring states: the noise loss (config.loss or l2) of every test image with its
    one-hot class at each of a fixed set of at least two timesteps in 1..T, noise fixed by a seed (the same value
    on every call). Which timesteps is the student's choice: the sheet asks for "specific time-steps"."""
    net_y, net_t, net_c, first, second = need(outputs, "net_y", "net_t", "net_c", "first", "second")
    if float(first) != float(second) or not np.array_equal(net_y, outputs.get("again_net_y")) \
            or not np.array_equal(net_t, outputs.get("again_net_t")):
        raise Failed("the test loss differs between two calls: fix the test noise and timesteps (a defined test "
                     "set at specific time-steps)")
    T = int(inputs["T"])
    t = np.round(np.asarray(net_t) * T).astype(int)
    if len(t) == 0:
        raise Failed("the test loop never evaluated the network")
    label = np.argmax(net_c, axis=1)
    if not np.allclose(net_c, np.eye(10)[label]):
        raise Failed("the test images are evaluated with their one-hot class labels")
    timesteps = sorted(set(t.tolist()))
    if len(timesteps) < 2 or timesteps[0] < 1 or timesteps[-1] > T:
        raise Failed(f"the test loss uses the timesteps {timesteps}; the docstring: a fixed set of at least two "
                     f"timesteps in 1..T (the sheet's specific time-steps)")
    for step in timesteps:
        if sorted(label[t == step].tolist()) != list(range(10)):
            raise Failed(f"at t = {step} the test loop did not evaluate each test image once")
    image_of_label = np.argsort(inputs["labels"])
    y0 = (inputs["images"].astype(np.float64) / 127.5 - 1)[image_of_label[label]]
    terms = linear_terms(float(inputs["beta1"]), float(inputs["beta2"]), T)
    a = terms["alpha_bar"][t].reshape(-1, 1, 1, 1)
    eps = (np.asarray(net_y) - np.sqrt(a) * y0) / np.sqrt(1 - a)
    standard_normal(eps, "the test noise", mean_bound=0.25, std_bound=0.25)
    predicted = stub_eps(inputs, net_y, net_t, net_c)
    candidates = {loss: noise_loss(predicted, eps, loss) for loss in ("l2", str(inputs["loss_type"]))}
    if not any(abs(float(first) - value) <= 1e-3 * abs(value) + 1e-6 for value in candidates.values()):
        raise Failed(f"test loss {float(first):.6g}; the mean noise loss over the test images and timesteps is "
                     + ", ".join(f"{value:.6g} ({loss})" for loss, value in candidates.items()))


@check("sheet2-test-loop", "test_loop")
def test_loop_l2(rng):
    return test_loop_inputs(rng, "l2")


@check("sheet2-test-loop", "test_loop")
def test_loop_l1_run(rng):
    return test_loop_inputs(rng, "l1")


test_loop_l2.verify = test_loop_l1_run.verify = verify_test_loop


def checks_of(task: str) -> List[Check]:
    return [c for c in CHECKS if c.task == task]
