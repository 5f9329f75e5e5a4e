"""The conditional U-Net: exact sizes, shapes, the residual rules of ConvBlock, and clear errors."""
import math

import pytest
import torch

from networks.Conditional_UNet import ConvBlock, Decoder_Block, Embedding_Block, Encoder_Block, UNet, \
    count_trainable_parameters


@pytest.mark.parametrize("args, expected", [((3, 32, 10, 32), 717_955), ((1, 32, 10, 28), 655_361)])
def test_exact_parameter_counts(args, expected):
    assert count_trainable_parameters(UNet(*args)) == expected


def test_default_unet_is_the_cifar_configuration():
    assert count_trainable_parameters(UNet()) == 717_955


@pytest.mark.parametrize("channels, height", [(1, 28), (3, 32)])
def test_output_shape_equals_input_shape(channels, height):
    model = UNet(channels, 16, 10, height).eval()
    x = torch.randn(3, channels, height, height)
    out = model(x, torch.rand(3, 1, 1, 1), torch.eye(10)[:3])
    assert out.shape == x.shape


def test_real_valued_class_vectors_are_accepted():
    model = UNet(1, 8, 10, 8).eval()
    mixture = 0.5 * torch.eye(10)[3] + 0.5 * torch.eye(10)[8]
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2, 1, 1, 1), torch.stack([mixture, torch.zeros(10)]))
    assert torch.isfinite(out).all()


def _sub_block_by_hand(sub_block, x):
    conv, norm, _ = sub_block
    return torch.nn.functional.gelu(norm(conv(x)))


def test_convblock_residual_with_equal_channels_adds_the_input():
    torch.manual_seed(0)
    block = ConvBlock(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    h2 = _sub_block_by_hand(block.sub_block2, _sub_block_by_hand(block.sub_block1, x))
    torch.testing.assert_close(block(x), (x + h2) / math.sqrt(2))


def test_convblock_residual_with_different_channels_adds_the_first_sub_block():
    torch.manual_seed(0)
    block = ConvBlock(3, 5).eval()
    x = torch.randn(2, 3, 6, 6)
    h1 = _sub_block_by_hand(block.sub_block1, x)
    h2 = _sub_block_by_hand(block.sub_block2, h1)
    torch.testing.assert_close(block(x), (h1 + h2) / math.sqrt(2))


def test_blocks_change_the_resolution_as_specified():
    x = torch.randn(2, 4, 8, 8)
    assert Encoder_Block(4, 6)(x).shape == (2, 6, 4, 4)
    decoder = Decoder_Block(8, 3, 2)
    assert decoder(x, torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)
    assert Decoder_Block(4, 4, 7)(torch.randn(2, 4, 1, 1)).shape == (2, 4, 7, 7)
    assert Embedding_Block(1, 6, "sin")(torch.rand(2, 1, 1, 1)).shape == (2, 6)


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
