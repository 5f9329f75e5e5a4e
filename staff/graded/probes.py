"""The student side of the graded checks: each probe calls the student's code on the grader's inputs and returns
what it computed, and nothing else. No probe decides anything: the verdict is reached by staff/graded/verdicts.py
in the grading process, which never runs the student's code (see staff/grade.py).

A probe is ``PROBES[name](inputs) -> outputs``, both dicts of numpy arrays. It runs in a process of its own
(staff/graded/runner.py) whose working folder and first sys.path entry are the project being graded, so
``import ddpm`` imports the student's ddpm.py (with the reference's code in the regions of the other tasks, or the
student's own project as handed in; see staff/grade.py). The probes hold no formula of the sheets: they only
record what the student's code does (its outputs, the inputs it gives the network, the layers it builds).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np

PROBES: Dict[str, Callable[[dict], dict]] = {}


def probe(function):
    PROBES[function.__name__] = function
    return function


def _torch():
    import torch
    return torch


def tensor(array) -> "torch.Tensor":  # noqa: F821
    return _torch().from_numpy(np.array(array, copy=True))


def array(value) -> np.ndarray:
    """A tensor (or number) as a float64/int64 numpy array, detached."""
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.double() if value.is_floating_point() else value.long()
        return value.numpy().copy()
    return np.asarray(value)


class LinearStub:
    """A stand-in for the U-Net with known weights: eps(y, t, c) = a y + b t + c . k, recording every call.

    a, b and k [n_classes] come from the grader's inputs, so the verdict can compute what it predicts.
    """

    def __new__(cls, a: float, b: float, k: np.ndarray):
        torch = _torch()

        class _Stub(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.n_classes = len(k)
                self.a = torch.nn.Parameter(torch.tensor(float(a)))
                self.b = float(b)
                self.k = torch.tensor(np.asarray(k), dtype=torch.float32)
                self.calls: List[tuple] = []

            def forward(self, y, t, c):
                t_column = t.reshape(-1).to(y.dtype)
                if t_column.numel() == 1:
                    t_column = t_column.expand(y.shape[0])
                self.calls.append((y.detach().clone(), t_column.detach().clone(), c.detach().clone()))
                class_term = c.to(y.dtype) @ self.k.to(y.dtype)
                return self.a * y + (self.b * t_column + class_term).view(-1, 1, 1, 1)

            def recorded(self) -> dict:
                if not self.calls:
                    return {"net_y": np.zeros((0,)), "net_t": np.zeros((0,)), "net_c": np.zeros((0,)),
                            "net_calls": np.zeros((0,), dtype=np.int64)}
                ys, ts, cs = zip(*self.calls)
                return {"net_y": array(torch.cat(ys)), "net_t": array(torch.cat(ts)), "net_c": array(torch.cat(cs)),
                        "net_calls": np.array([len(y) for y in ys], dtype=np.int64)}

        return _Stub()


def stub_from(inputs: dict):
    return LinearStub(float(inputs["stub_a"]), float(inputs["stub_b"]), inputs["stub_k"])


def new_ddpm(network, inputs: dict, **kwargs):
    from ddpm import DDPM
    return DDPM(network, float(inputs["beta1"]), float(inputs["beta2"]), int(inputs["T"]), device="cpu", **kwargs)


def leaves(module, kind=None) -> list:
    """The sub-modules without children (or of type ``kind``), in the order they were registered."""
    found = [m for m in module.modules() if m is not module and not list(m.children())]
    if kind is not None:
        found = [m for m in module.modules() if m is not module and isinstance(m, kind)]
    return found


def layer_record(prefix: str, layer) -> dict:
    """A layer's kind, settings and weights, for the verdict to recompute it."""
    torch = _torch()
    nn = torch.nn
    out = {f"{prefix}.kind": np.array(type(layer).__name__)}
    for name, value in layer.named_parameters(recurse=False):
        out[f"{prefix}.{name}"] = array(value)
    for name, value in layer.named_buffers(recurse=False):
        out[f"{prefix}.{name}"] = array(value)
    for name in ("kernel_size", "stride", "padding", "in_channels", "out_channels", "in_features", "out_features"):
        if hasattr(layer, name):
            out[f"{prefix}.{name}"] = np.array(getattr(layer, name))
    if isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
        out[f"{prefix}.eps"] = np.array(layer.eps)
    if isinstance(layer, nn.GroupNorm):
        out[f"{prefix}.num_groups"] = np.array(layer.num_groups)
    if isinstance(layer, nn.GELU):
        out[f"{prefix}.approximate"] = np.array(getattr(layer, "approximate", "none"))
    return out


def layers_record(module) -> dict:
    out = {"n_layers": np.array(len(leaves(module)))}
    for index, layer in enumerate(leaves(module)):
        out.update(layer_record(f"layer{index}", layer))
    return out


def hooked_call(module, names_or_modules: dict, call):
    """Run ``call()`` with forward hooks on the named sub-modules; returns (result, {name: (inputs, output)})."""
    seen: Dict[str, tuple] = {}
    handles = []
    for name, sub in names_or_modules.items():
        def hook(_module, inputs, output, name=name):
            if name not in seen:
                seen[name] = (tuple(x for x in inputs if hasattr(x, "detach")), output)
        handles.append(sub.register_forward_hook(hook))
    try:
        result = call()
    finally:
        for handle in handles:
            handle.remove()
    return result, seen


def hooks_record(seen: dict) -> dict:
    out = {}
    for name, (inputs, output) in seen.items():
        for index, value in enumerate(inputs):
            out[f"{name}.in{index}"] = array(value)
        out[f"{name}.out"] = array(output)
    return out


# --------------------------------------------------------------------------------------------------------------
# Sheet 1, task 1: the U-Net
# --------------------------------------------------------------------------------------------------------------

@probe
def convblock(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import ConvBlock
    torch.manual_seed(int(inputs["seed"]))
    block = ConvBlock(int(inputs["in_channels"]), int(inputs["out_channels"])).eval()
    record = layers_record(block)
    with torch.no_grad():
        record["out"] = array(block(tensor(inputs["x"]).float()))
    return record


@probe
def encoder_block(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import ConvBlock, Encoder_Block
    torch.manual_seed(int(inputs["seed"]))
    block = Encoder_Block(int(inputs["in_channels"]), int(inputs["out_channels"])).eval()
    blocks = leaves(block, ConvBlock)
    others = [m for m in leaves(block) if not any(m is inner for b in blocks for inner in b.modules())]
    record = {"n_convblocks": np.array(len(blocks)), "n_other_layers": np.array(len(others))}
    for index, layer in enumerate(others):
        record.update(layer_record(f"other{index}", layer))
    with torch.no_grad():
        out, seen = hooked_call(block, {f"block{i}": b for i, b in enumerate(blocks)},
                                lambda: block(tensor(inputs["x"]).float()))
    record.update(hooks_record(seen))
    record["out"] = array(out)
    return record


@probe
def decoder_block(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import ConvBlock, Decoder_Block
    torch.manual_seed(int(inputs["seed"]))
    block = Decoder_Block(int(inputs["in_channels"]), int(inputs["out_channels"]), int(inputs["transpose"])).eval()
    blocks = leaves(block, ConvBlock)
    transposes = leaves(block, torch.nn.ConvTranspose2d)
    record = {"n_convblocks": np.array(len(blocks)), "n_transposes": np.array(len(transposes))}
    for index, layer in enumerate(transposes):
        record.update(layer_record(f"transpose{index}", layer))
    watched = {f"block{i}": b for i, b in enumerate(blocks)}
    watched.update({f"transpose{i}": t for i, t in enumerate(transposes)})
    arguments = (tensor(inputs["x"]).float(),)
    if "skip" in inputs:
        arguments += (tensor(inputs["skip"]).float(),)
    with torch.no_grad():
        out, seen = hooked_call(block, watched, lambda: block(*arguments))
    record.update(hooks_record(seen))
    record["out"] = array(out)
    return record


@probe
def embedding_block(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import Embedding_Block
    torch.manual_seed(int(inputs["seed"]))
    block = Embedding_Block(int(inputs["in_channels"]), int(inputs["out_channels"]), str(inputs["activation"]))
    record = {}
    linears = leaves(block, torch.nn.Linear)
    record["n_linears"] = np.array(len(linears))
    for index, layer in enumerate(linears):
        record.update(layer_record(f"linear{index}", layer))
    with torch.no_grad():
        record["out"] = array(block(tensor(inputs["x"]).float()))
    return record


@probe
def final_block(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import UNet
    torch.manual_seed(int(inputs["seed"]))
    model = UNet(int(inputs["in_channels"]), int(inputs["n_features"]), 10, int(inputs["height"])).eval()
    final = getattr(model, "final")
    record = layers_record(final)
    with torch.no_grad():
        record["out"] = array(final(tensor(inputs["z"]).float()))
    return record


UNET_PARTS = ("init_conv", "encoder1", "encoder2", "decoder0", "decoder1", "decoder2", "final",
              "time_embedding1", "time_embedding2", "class_embedding1", "class_embedding2")


@probe
def unet_forward(inputs: dict) -> dict:
    torch = _torch()
    from networks.Conditional_UNet import UNet
    torch.manual_seed(int(inputs["seed"]))
    channels, height, features = int(inputs["in_channels"]), int(inputs["height"]), int(inputs["n_features"])
    model = UNet(channels, features, 10, height).eval()
    watched = {name: getattr(model, name) for name in UNET_PARTS}
    with torch.no_grad():
        out, seen = hooked_call(model, watched, lambda: model(tensor(inputs["x"]).float(), tensor(inputs["t"]).float(),
                                                              tensor(inputs["c"]).float()))
    record = hooks_record(seen)
    record["out"] = array(out)
    return record


@probe
def parameter_check(inputs: dict) -> dict:
    """Runs ``python networks/Conditional_UNet.py`` (as __main__) and returns what it printed."""
    import contextlib
    import io
    import runpy
    torch = _torch()
    from networks.Conditional_UNet import UNet
    counts = [sum(p.numel() for p in UNet(c, 32, 10, h).parameters() if p.requires_grad) for c, h in ((3, 32), (1, 28))]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path("networks/Conditional_UNet.py", run_name="__main__")
    del torch
    return {"printed": np.array(printed.getvalue()[-20000:]), "counts": np.array(counts)}


# --------------------------------------------------------------------------------------------------------------
# Sheet 1, task 2 and sheet 2: ddpm.py
# --------------------------------------------------------------------------------------------------------------

@probe
def ddpm_schedule(inputs: dict) -> dict:
    """ddpm_schedule as the DDPM calls it; with inputs["betas"], the file's make_betas hands over those betas for
    inputs["schedule"] (so the terms are judged apart from the project's own cosine or sigmoid schedule)."""
    import ddpm
    arguments = (float(inputs["beta1"]), float(inputs["beta2"]), int(inputs["T"]))
    if "betas" in inputs:
        betas, schedule, own = tensor(inputs["betas"]), str(inputs["schedule"]), ddpm.make_betas
        ddpm.make_betas = lambda name, *rest: betas.clone() if name == schedule else own(name, *rest)
        terms = ddpm.DDPM.ddpm_schedule(*arguments, schedule)
    else:
        terms = ddpm.DDPM.ddpm_schedule(*arguments)
    return {f"term.{name}": array(value) for name, value in dict(terms).items()}


@probe
def cosine_schedule(inputs: dict) -> dict:
    import ddpm
    kwargs = {}
    if "s" in inputs:
        kwargs = {"s": float(inputs["s"]), "max_beta": float(inputs["max_beta"])}
    return {"betas": array(ddpm.cosine_beta_schedule(int(inputs["T"]), **kwargs))}


@probe
def sigmoid_schedule(inputs: dict) -> dict:
    import ddpm
    args = (float(inputs["beta_start"]), float(inputs["beta_end"]), int(inputs["T"]))
    if "s_limit" in inputs:
        return {"betas": array(ddpm.sigmoid_beta_schedule(*args, float(inputs["s_limit"])))}
    return {"betas": array(ddpm.sigmoid_beta_schedule(*args))}


@probe
def q_sample(inputs: dict) -> dict:
    model = new_ddpm(stub_from(inputs), inputs)
    y_t = model.q_sample(tensor(inputs["y0"]).float(), tensor(inputs["t"]).long(), tensor(inputs["noise"]).float())
    return {"y_t": array(y_t)}


@probe
def p_losses(inputs: dict) -> dict:
    stub = stub_from(inputs)
    model = new_ddpm(stub, inputs)
    loss = model.p_losses(tensor(inputs["y0"]).float(), tensor(inputs["t"]).long(), tensor(inputs["c"]).float(),
                          tensor(inputs["noise"]).float(), loss_type=str(inputs["loss_type"]))
    record = stub.recorded()
    record.update(loss=array(loss), loss_requires_grad=np.array(bool(getattr(loss, "requires_grad", False))),
                  loss_dim=np.array(loss.dim() if hasattr(loss, "dim") else -1))
    return record


@probe
def algorithm1(inputs: dict) -> dict:
    torch = _torch()
    stub = stub_from(inputs)
    model = new_ddpm(stub, inputs, drop_prob=float(inputs["drop_prob"]), loss_type=str(inputs["loss_type"]))
    torch.manual_seed(int(inputs["seed"]))
    loss = model(tensor(inputs["y0"]).float(), tensor(inputs["c"]).float())
    record = stub.recorded()
    record.update(loss=array(loss), loss_requires_grad=np.array(bool(getattr(loss, "requires_grad", False))),
                  loss_dim=np.array(loss.dim() if hasattr(loss, "dim") else -1))
    return record


@probe
def guidance_formula(inputs: dict) -> dict:
    import ddpm
    conditional, unconditional = tensor(inputs["conditional"]).float(), tensor(inputs["unconditional"]).float()
    return {f"w{index}": array(ddpm.classifier_free_guidance(conditional, unconditional, float(w)))
            for index, w in enumerate(inputs["weights"])}


@probe
def guided_noise(inputs: dict) -> dict:
    stub = stub_from(inputs)
    model = new_ddpm(stub, inputs)
    out = model.guided_noise(tensor(inputs["y"]).float(), int(inputs["t"]), tensor(inputs["c"]).float(),
                             float(inputs["w"]))
    record = stub.recorded()
    record["out"] = array(out)
    return record


@probe
def p_sample(inputs: dict) -> dict:
    """p_sample with guided_noise standing in (the grader's eps); z is read back by replaying the generator."""
    torch = _torch()
    from ddpm import DDPM
    eps = tensor(inputs["eps"]).float()
    calls = []

    def guided(self, y_t, t, c, w):
        calls.append((int(t), float(w)))
        return eps.clone()

    DDPM.guided_noise = guided
    model = new_ddpm(stub_from(inputs), inputs)
    y = tensor(inputs["y"]).float()
    t = int(inputs["t"])
    torch.manual_seed(int(inputs["seed"]))
    first = model.p_sample(y, t, tensor(inputs["c"]).float(), float(inputs["w"]))
    torch.manual_seed(int(inputs["seed"]))
    z = torch.randn_like(y)
    torch.manual_seed(int(inputs["seed"]) + 1)
    second = model.p_sample(y, t, tensor(inputs["c"]).float(), float(inputs["w"]))
    return {"out": array(first), "again": array(second), "z": array(z),
            "guided_calls": np.array([c[0] for c in calls]), "guided_w": np.array([c[1] for c in calls])}


@probe
def algorithm2(inputs: dict) -> dict:
    """DDPM.sample with each p_sample call recorded (t, its input and output) around the project's own p_sample."""
    torch = _torch()
    from ddpm import DDPM
    original = DDPM.p_sample
    steps, states_in, states_out, weights, conditions = [], [], [], [], []

    def recording(self, y_t, t, c, g_weight):
        result = original(self, y_t, t, c, g_weight)
        steps.append(int(t))
        states_in.append(y_t.detach().clone())
        states_out.append(result.detach().clone())
        weights.append(float(g_weight))
        if not conditions:
            conditions.append(c.detach().clone())
        return result

    DDPM.p_sample = recording
    stub = stub_from(inputs)
    model = new_ddpm(stub, inputs)
    torch.manual_seed(int(inputs["seed"]))
    keep = [int(s) for s in inputs["keep"]] if "keep" in inputs else None
    size = tuple(int(v) for v in inputs["size"])
    kwargs = {"keep": keep} if keep is not None else {}
    y0, frames = model.sample(n_sample=int(inputs["n_sample"]), size=size, n_classes=10,
                              g_weight=float(inputs["w"]), **kwargs)
    return {**stub.recorded(), "steps": np.array(steps), "states_in": array(torch.stack(states_in)) if states_in else np.zeros(0),
            "states_out": array(torch.stack(states_out)) if states_out else np.zeros(0),
            "weights": np.array(weights), "conditions": array(conditions[0]) if conditions else np.zeros(0),
            "y0": array(y0), "frames": np.asarray(frames, dtype=np.float64)}


@probe
def test_loop(inputs: dict) -> dict:
    """training.test_loss twice (different global seeds) on 10 test images, around the linear stub."""
    import dataclasses
    torch = _torch()
    import training
    from lab.generation import sampling_model
    from lab.image_data import ImageSet
    from lab.train_config import TrainConfig
    stub = stub_from(inputs)
    config = TrainConfig.for_dataset("mnist", timesteps=int(inputs["T"]), eval_timesteps=int(inputs["eval_timesteps"]),
                                     loss=str(inputs["loss_type"]), image_size=4, beta1=float(inputs["beta1"]),
                                     beta2=float(inputs["beta2"]))
    model = sampling_model(stub, dataclasses.asdict(config), torch.device("cpu"))
    test_set = ImageSet(tensor(inputs["images"]).to(torch.uint8), tensor(inputs["labels"]).long(),
                        [str(k) for k in range(10)])
    torch.manual_seed(1)
    first = training.test_loss(model, test_set, config)
    record = stub.recorded()
    stub.calls.clear()
    torch.manual_seed(2)
    second = training.test_loss(model, test_set, config)
    again = stub.recorded()
    record.update({f"again_{key}": value for key, value in again.items()})
    record["first"] = np.array(float(first["test_loss"]))
    record["second"] = np.array(float(second["test_loss"]))
    return record
