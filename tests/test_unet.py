"""The conditional U-Net: exact sizes, shapes, the residual rules of ConvBlock, and clear errors.

Tests marked ``@pytest.mark.task("sheet1-unet")`` grade the student's U-Net (grade.py); they find the layers by
type rather than by attribute name wherever the sheet leaves the names to the student. The tests of argument
checking are infrastructure and stay ungraded.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.Conditional_UNet import ConvBlock, Decoder_Block, Embedding_Block, Encoder_Block, UNet, \
    count_trainable_parameters


def _modules_of_type(module: nn.Module, kind: type) -> list:
    """The sub-modules of ``module`` of the given type, in the order they were registered."""
    return [m for m in module.modules() if isinstance(m, kind) and m is not module]


@pytest.mark.task("sheet1-unet")
@pytest.mark.parametrize("args, expected", [((3, 32, 10, 32), 717_955), ((1, 32, 10, 28), 655_361)])
def test_exact_parameter_counts(args, expected):
    assert count_trainable_parameters(UNet(*args)) == expected


@pytest.mark.task("sheet1-unet")
def test_default_unet_is_the_cifar_configuration():
    assert count_trainable_parameters(UNet()) == 717_955


@pytest.mark.task("sheet1-unet")
@pytest.mark.parametrize("channels, height", [(1, 28), (3, 32)])
def test_output_shape_equals_input_shape(channels, height):
    model = UNet(channels, 16, 10, height).eval()
    x = torch.randn(3, channels, height, height)
    out = model(x, torch.rand(3, 1, 1, 1), torch.eye(10)[:3])
    assert out.shape == x.shape


@pytest.mark.task("sheet1-unet")
def test_real_valued_class_vectors_are_accepted():
    model = UNet(1, 8, 10, 8).eval()
    mixture = 0.5 * torch.eye(10)[3] + 0.5 * torch.eye(10)[8]
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2, 1, 1, 1), torch.stack([mixture, torch.zeros(10)]))
    assert torch.isfinite(out).all()


def _sub_blocks_by_hand(block: ConvBlock, x: torch.Tensor):
    """h1 and h2 of a ConvBlock computed from its own two convolutions and batch norms (eval mode)."""
    convs, norms = _modules_of_type(block, nn.Conv2d), _modules_of_type(block, nn.BatchNorm2d)
    assert len(convs) == 2 and len(norms) == 2, "a ConvBlock has two sub-blocks Conv2d -> BatchNorm2d -> GELU"
    for conv in convs:
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    h1 = F.gelu(norms[0](convs[0](x)))
    return h1, F.gelu(norms[1](convs[1](h1)))


@pytest.mark.task("sheet1-unet")
def test_convblock_residual_with_equal_channels_adds_the_input():
    torch.manual_seed(0)
    block = ConvBlock(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    _, h2 = _sub_blocks_by_hand(block, x)
    torch.testing.assert_close(block(x), (x + h2) / math.sqrt(2))


@pytest.mark.task("sheet1-unet")
def test_convblock_residual_with_different_channels_adds_the_first_sub_block():
    torch.manual_seed(0)
    block = ConvBlock(3, 5).eval()
    x = torch.randn(2, 3, 6, 6)
    h1, h2 = _sub_blocks_by_hand(block, x)
    torch.testing.assert_close(block(x), (h1 + h2) / math.sqrt(2))


@pytest.mark.task("sheet1-unet")
def test_blocks_change_the_resolution_as_specified():
    x = torch.randn(2, 4, 8, 8)
    assert Encoder_Block(4, 6)(x).shape == (2, 6, 4, 4)
    decoder = Decoder_Block(8, 3, 2)
    assert decoder(x, torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)
    assert Decoder_Block(4, 4, 7)(torch.randn(2, 4, 1, 1)).shape == (2, 4, 7, 7)
    assert Embedding_Block(1, 6, "sin")(torch.rand(2, 1, 1, 1)).shape == (2, 6)


@pytest.mark.task("sheet1-unet")
def test_encoder_block_is_two_convblocks_then_max_pooling():
    torch.manual_seed(0)
    encoder = Encoder_Block(3, 5).eval()
    blocks = _modules_of_type(encoder, ConvBlock)
    assert len(blocks) == 2
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(encoder(x), F.max_pool2d(blocks[1](blocks[0](x)), kernel_size=2, stride=2))


@pytest.mark.task("sheet1-unet")
def test_decoder_block_concatenates_x_then_skip_before_the_transpose_convolution():
    torch.manual_seed(0)
    decoder = Decoder_Block(6, 4, 2).eval()
    (transpose,) = _modules_of_type(decoder, nn.ConvTranspose2d)
    assert (transpose.kernel_size, transpose.stride) == ((2, 2), (2, 2))
    blocks = _modules_of_type(decoder, ConvBlock)
    assert len(blocks) == 2
    x, skip = torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    expected = blocks[1](blocks[0](transpose(torch.cat((x, skip), dim=1))))
    torch.testing.assert_close(decoder(x, skip), expected)


@pytest.mark.task("sheet1-unet")
def test_decoder_block_without_skip_upsamples_x_alone():
    torch.manual_seed(0)
    decoder = Decoder_Block(4, 4, 3).eval()
    (transpose,) = _modules_of_type(decoder, nn.ConvTranspose2d)
    blocks = _modules_of_type(decoder, ConvBlock)
    x = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(decoder(x), blocks[1](blocks[0](transpose(x))))


@pytest.mark.task("sheet1-unet")
@pytest.mark.parametrize("activation, function", [("sin", torch.sin), ("GELU", F.gelu)])
def test_embedding_block_is_linear_activation_linear(activation, function):
    torch.manual_seed(0)
    block = Embedding_Block(3, 6, activation)
    linears = _modules_of_type(block, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(3, 6), (6, 6)]
    x = torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(block(x), linears[1](function(linears[0](x.view(4, 3)))))


@pytest.mark.task("sheet1-unet")
def test_final_block_is_conv_groupnorm_relu_conv():
    model = UNet(1, 16, 10, 8)
    layers = [m for m in model.final.modules() if not list(m.children())]
    assert [type(layer) for layer in layers] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.Conv2d]
    first, norm, _, last = layers
    assert (first.in_channels, first.out_channels, first.kernel_size, first.padding) == (32, 16, (3, 3), (1, 1))
    assert (norm.num_groups, norm.num_channels) == (8, 16)
    assert (last.in_channels, last.out_channels, last.kernel_size, last.padding) == (16, 1, (3, 3), (1, 1))


@pytest.mark.task("sheet1-unet")
def test_unet_forward_combines_embeddings_and_skips_as_in_figure_4():
    """UNet.forward against the wiring of the module docstring, computed from the model's own blocks."""
    torch.manual_seed(0)
    model = UNet(1, 8, 10, 8).eval()
    n, features = 3, 8
    x, t = torch.randn(n, 1, 8, 8), torch.rand(n, 1, 1, 1)
    c = torch.stack([torch.eye(10)[2], torch.zeros(10), 0.5 * torch.eye(10)[1] + 0.5 * torch.eye(10)[7]])
    init = model.init_conv(x)
    down1 = model.encoder1(init)
    down2 = model.encoder2(down1)
    up1 = model.decoder0(model.to_hidden(down2))
    time1 = model.time_embedding1(t).view(n, 2 * features, 1, 1)
    time2 = model.time_embedding2(t).view(n, features, 1, 1)
    class1 = model.class_embedding1(c).view(n, 2 * features, 1, 1)
    class2 = model.class_embedding2(c).view(n, features, 1, 1)
    up2 = model.decoder1(class1 * up1 + time1, down2)
    up3 = model.decoder2(class2 * up2 + time2, down1)
    torch.testing.assert_close(model(x, t, c), model.final(torch.cat((up3, init), dim=1)))


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
