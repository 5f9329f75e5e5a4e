"""The conditional U-Net: public tests of its properties (shapes, sizes, what its blocks depend on) and clear errors.

These tests go to the students: they check properties that follow from sheet 1, task 1, and hold no solution. The
grade comes from the tutors' checks (staff/graded/, not handed out). Select one task's tests with --task TASK_ID.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks.Conditional_UNet import ConvBlock, Decoder_Block, Embedding_Block, Encoder_Block, UNet


def _zero_the(module: nn.Module, kind: type) -> None:
    """Set the weights and biases of every sub-module of a type to zero."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, kind):
                for parameter in layer.parameters(recurse=False):
                    parameter.zero_()


def _size(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("args, expected", [((3, 32, 10, 32), 717_955), ((1, 32, 10, 28), 655_361)])
def test_parameter_counts_of_figure_3(args, expected):
    """The sheet: around 718k parameters for 32 intermediate channels and 10 classes (this is the exact count of
    the layers the sheet lists, with biases)."""
    assert _size(UNet(*args)) == expected


@pytest.mark.task("sheet1-convblock")
@pytest.mark.parametrize("in_channels, out_channels", [(4, 4), (3, 5)])
def test_convblock_keeps_the_size_and_sets_the_channels(in_channels, out_channels):
    block = ConvBlock(in_channels, out_channels).eval()
    assert block(torch.randn(2, in_channels, 6, 6)).shape == (2, out_channels, 6, 6)
    assert len([m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]) == 2


@pytest.mark.task("sheet1-convblock")
def test_convblock_with_silent_convolutions_passes_on_the_scaled_input_only_with_equal_channels():
    """With every convolution zero, both sub-blocks output GELU(0) = 0: what remains is the residual's input part."""
    x = torch.randn(2, 4, 5, 5)
    same = ConvBlock(4, 4).eval()
    _zero_the(same, nn.Conv2d)
    assert torch.allclose(same(x), x / math.sqrt(2), atol=1e-6)
    different = ConvBlock(4, 6).eval()
    _zero_the(different, nn.Conv2d)
    assert torch.allclose(different(x), torch.zeros(2, 6, 5, 5), atol=1e-6)


@pytest.mark.task("sheet1-encoder")
def test_encoder_block_halves_the_resolution():
    assert Encoder_Block(4, 6)(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    assert len([m for m in Encoder_Block(4, 6).modules() if isinstance(m, ConvBlock)]) == 2


@pytest.mark.task("sheet1-decoder")
def test_decoder_block_upsamples_by_transpose_with_and_without_skip():
    assert Decoder_Block(8, 3, 2)(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)
    assert Decoder_Block(4, 4, 7)(torch.randn(2, 4, 1, 1)).shape == (2, 4, 7, 7)


@pytest.mark.task("sheet1-decoder")
def test_decoder_block_uses_the_skip():
    torch.manual_seed(0)
    decoder = Decoder_Block(8, 3, 2).eval()
    x = torch.randn(2, 4, 4, 4)
    assert not torch.allclose(decoder(x, torch.randn(2, 4, 4, 4)), decoder(x, torch.randn(2, 4, 4, 4)))


@pytest.mark.task("sheet1-embedding")
@pytest.mark.parametrize("activation", ["sin", "GELU"])
def test_embedding_block_shape_and_a_silent_first_layer(activation):
    """[N, in] or [N, in, 1, 1] -> [N, out]; with the first layer zero, sin(0) = GELU(0) = 0 leaves the second
    layer's bias."""
    block = Embedding_Block(3, 6, activation)
    assert block(torch.rand(4, 3, 1, 1)).shape == (4, 6) and block(torch.rand(4, 3)).shape == (4, 6)
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 6), (6, 6)]
    _zero_the(linears[0], nn.Linear)
    assert torch.allclose(block(torch.rand(4, 3)), linears[1].bias.detach().expand(4, 6), atol=1e-6)


@pytest.mark.task("sheet1-final-block")
def test_final_block_maps_2f_channels_to_the_image_channels():
    model = UNet(3, 16, 10, 8).eval()
    assert model.final(torch.randn(2, 32, 8, 8)).shape == (2, 3, 8, 8)
    assert [type(m) for m in model.final.modules() if not list(m.children())] == \
        [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.Conv2d]


@pytest.mark.task("sheet1-unet-forward")
@pytest.mark.parametrize("channels, height", [(1, 28), (3, 32)])
def test_output_shape_equals_input_shape(channels, height):
    model = UNet(channels, 16, 10, height).eval()
    x = torch.randn(3, channels, height, height)
    out = model(x, torch.rand(3, 1, 1, 1), torch.eye(10)[:3])
    assert out.shape == x.shape


@pytest.mark.task("sheet1-unet-forward")
def test_the_noise_prediction_depends_on_the_time_and_the_class():
    torch.manual_seed(0)
    model = UNet(1, 8, 10, 8).eval()
    x, t, c = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 1, 1), torch.eye(10)[[3, 8]]
    out = model(x, t, c)
    assert not torch.allclose(out, model(x, t + 0.3, c))
    assert not torch.allclose(out, model(x, t, torch.zeros_like(c)))
    mixture = 0.5 * torch.eye(10)[3] + 0.5 * torch.eye(10)[8]
    assert torch.isfinite(model(x, t, torch.stack([mixture, torch.zeros(10)]))).all()


@pytest.mark.task("sheet1-unet-forward")
def test_each_image_is_predicted_on_its_own():
    torch.manual_seed(0)
    model = UNet(1, 8, 10, 8).eval()
    x, t, c = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 1, 1), torch.eye(10)[:4]
    assert torch.allclose(model(x, t, c)[1:2], model(x[1:2], t[1:2], c[1:2]), atol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(height=30), "height"),
    (dict(n_features=12), "n_features"),
    (dict(n_features=0), "n_features"),
    (dict(in_channels=0), "in_channels"),
    (dict(n_classes=-1), "n_classes"),
    (dict(height=0), "height"),
])
def test_bad_construction_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UNet(**kwargs)


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sin.*GELU"):
        Embedding_Block(1, 4, "relu")


@pytest.mark.parametrize("x_shape, c_shape, fragment", [
    ((2, 1, 8, 8), (2, 10), r"\[N, 3, 8, 8\].*\[2, 1, 8, 8\]"),   # wrong channel count
    ((2, 3, 12, 12), (2, 10), r"\[N, 3, 8, 8\].*\[2, 3, 12, 12\]"),  # wrong image size
    ((2, 3, 8, 8), (2, 7), r"\[2, 10\].*\[2, 7\]"),                 # wrong class-vector width
])
def test_bad_forward_shapes_name_expected_and_got(x_shape, c_shape, fragment):
    model = UNet(3, 8, 10, 8)
    with pytest.raises(ValueError, match=fragment):
        model(torch.randn(*x_shape), torch.rand(x_shape[0], 1, 1, 1), torch.zeros(*c_shape))
