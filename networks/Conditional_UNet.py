"""The class-conditional U-Net that predicts the noise eps_theta(y_t, t, c) (sheet 1, task 1, figures 3 and 4).

Shapes use N for the batch, C for image channels, H = W for the image size and F for ``n_features``. The first
column names the UNet's attribute.

    init_conv         ConvBlock(C, F)                    [N, F, H, W]
    encoder1          Encoder_Block(F, F)                [N, F, H/2, W/2]
    encoder2          Encoder_Block(F, 2F)               [N, 2F, H/4, W/4]
    to_hidden         AvgPool2d(H/4) -> GELU             [N, 2F, 1, 1]
    time_embedding1   Embedding_Block(1, 2F, 'sin')      t_emb1 [N, 2F] (viewed as [N, 2F, 1, 1])
    time_embedding2   Embedding_Block(1, F, 'sin')       t_emb2 [N, F]
    class_embedding1  Embedding_Block(n_classes, 2F, 'GELU')   c_emb1 [N, 2F]
    class_embedding2  Embedding_Block(n_classes, F, 'GELU')    c_emb2 [N, F]
    decoder0          Decoder_Block(2F, 2F, H/4) on hidden, no skip: up1   [N, 2F, H/4, W/4]
    decoder1          Decoder_Block(4F, F, 2) on (c_emb1 * up1 + t_emb1, encoder2 out): up2   [N, F, H/2, W/2]
    decoder2          Decoder_Block(2F, F, 2) on (c_emb2 * up2 + t_emb2, encoder1 out): up3   [N, F, H, W]
    final             Conv(2F, F) -> GroupNorm(8, F) -> ReLU -> Conv(F, C) on cat(up3, init_conv out)  [N, C, H, W]

Concatenations are along the channel dimension, the first-named tensor first.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Two sub-blocks Conv2d(3x3, stride 1, padding 1) -> BatchNorm2d -> GELU with a residual connection.

    The residual is ``(x + h2) / sqrt(2)`` when in_channels == out_channels, otherwise ``(h1 + h2) / sqrt(2)``,
    h1 and h2 being the outputs of the first and second sub-block. Maps [N, in, H, W] to [N, out, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        _require_positive(in_channels=in_channels, out_channels=out_channels)
        # BEGIN SOLUTION sheet1-convblock ConvBlock layers
        self.same_channels = in_channels == out_channels
        self.sub_block1 = _conv_bn_gelu(in_channels, out_channels)
        self.sub_block2 = _conv_bn_gelu(out_channels, out_channels)
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION sheet1-convblock ConvBlock.forward
        h1 = self.sub_block1(x)
        h2 = self.sub_block2(h1)
        shortcut = x if self.same_channels else h1
        return (shortcut + h2) / math.sqrt(2.0)
        # END SOLUTION


def _conv_bn_gelu(in_channels: int, out_channels: int) -> nn.Sequential:
    """One sub-block of ConvBlock: Conv2d(kernel 3, stride 1, padding 1) -> BatchNorm2d -> GELU."""
    # BEGIN SOLUTION sheet1-convblock ConvBlock sub-block
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )
    # END SOLUTION


class Encoder_Block(nn.Module):
    """ConvBlock(in, out) -> ConvBlock(out, out) -> MaxPool2d(2): [N, in, H, W] -> [N, out, H/2, W/2]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # BEGIN SOLUTION sheet1-encoder Encoder_Block layers
        self.layers = nn.Sequential(
            ConvBlock(in_channels, out_channels),
            ConvBlock(out_channels, out_channels),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION sheet1-encoder Encoder_Block.forward
        return self.layers(x)
        # END SOLUTION


class Decoder_Block(nn.Module):
    """ConvTranspose2d(in, out, kernel = stride = transpose) -> ConvBlock(out, out) x 2.

    ``forward(x, x_skip)`` first concatenates the skip connection along the channel dimension, x's channels
    first (``torch.cat((x, x_skip), dim=1)``), so ``in_channels`` counts the channels of x and x_skip together;
    without x_skip the layers act on x alone. [N, in, h, w] -> [N, out, h*transpose, w*transpose].
    """

    def __init__(self, in_channels: int, out_channels: int, transpose: int):
        super().__init__()
        _require_positive(transpose=transpose)
        # BEGIN SOLUTION sheet1-decoder Decoder_Block layers
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=transpose, stride=transpose),
            ConvBlock(out_channels, out_channels),
            ConvBlock(out_channels, out_channels),
        )
        # END SOLUTION

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        # BEGIN SOLUTION sheet1-decoder Decoder_Block.forward
        if x_skip is not None:
            x = torch.cat((x, x_skip), dim=1)
        return self.layers(x)
        # END SOLUTION


class Embedding_Block(nn.Module):
    """Linear(in, out) -> activation -> Linear(out, out) on the input flattened to [N, in]; returns [N, out].

    ``activation`` is ``'sin'`` (torch.sin, for the time embedding) or ``'GELU'`` (for the class embedding).
    """

    ACTIVATIONS = ("sin", "GELU")

    def __init__(self, in_channels: int, out_channels: int, activation: str):
        super().__init__()
        _require_positive(in_channels=in_channels, out_channels=out_channels)
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {self.ACTIVATIONS}, got {activation!r}")
        self.in_channels = in_channels
        # BEGIN SOLUTION sheet1-embedding Embedding_Block layers
        self.linear1 = nn.Linear(in_channels, out_channels)
        self.activation = _Sine() if activation == "sin" else nn.GELU()
        self.linear2 = nn.Linear(out_channels, out_channels)
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION sheet1-embedding Embedding_Block.forward
        x = x.reshape(-1, self.in_channels)
        return self.linear2(self.activation(self.linear1(x)))
        # END SOLUTION


class _Sine(nn.Module):
    """The sine activation of the time embedding as a module: x -> sin(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION sheet1-embedding sine activation
        return torch.sin(x)
        # END SOLUTION


class UNet(nn.Module):
    """Noise predictor eps_theta(y_t, t, c), conditioned on the time and a class vector (figures 3 and 4).

    Args:
        in_channels: image channels C (1 for MNIST, 3 for CIFAR-10).
        n_features: F, the channels of the first level; the second level has 2F. Divisible by 8 (GroupNorm(8)).
        n_classes: width of the class vector c.
        height: image size H = W, divisible by 4 (two 2x poolings).
    """

    def __init__(self, in_channels: int = 3, n_features: int = 32, n_classes: int = 10, height: int = 32):
        super().__init__()
        _require_positive(in_channels=in_channels, n_features=n_features, n_classes=n_classes, height=height)
        if height % 4 != 0:
            raise ValueError(f"height must be divisible by 4 (two 2x poolings), got {height}")
        if n_features % 8 != 0:
            raise ValueError(f"n_features must be divisible by 8 (GroupNorm with 8 groups), got {n_features}")
        self.in_channels = in_channels
        self.n_features = n_features
        self.n_classes = n_classes
        self.height = height
        features = n_features

        self.init_conv = ConvBlock(in_channels, features)
        self.encoder1 = Encoder_Block(features, features)
        self.encoder2 = Encoder_Block(features, 2 * features)
        self.to_hidden = nn.Sequential(nn.AvgPool2d(height // 4), nn.GELU())

        self.time_embedding1 = Embedding_Block(1, 2 * features, "sin")
        self.time_embedding2 = Embedding_Block(1, features, "sin")
        self.class_embedding1 = Embedding_Block(n_classes, 2 * features, "GELU")
        self.class_embedding2 = Embedding_Block(n_classes, features, "GELU")

        self.decoder0 = Decoder_Block(2 * features, 2 * features, height // 4)
        self.decoder1 = Decoder_Block(4 * features, features, 2)
        self.decoder2 = Decoder_Block(2 * features, features, 2)
        # BEGIN SOLUTION sheet1-final-block UNet final block
        self.final = nn.Sequential(
            nn.Conv2d(2 * features, features, kernel_size=3, stride=1, padding=1),
            nn.GroupNorm(8, features),
            nn.ReLU(),
            nn.Conv2d(features, in_channels, kernel_size=3, stride=1, padding=1),
        )
        # END SOLUTION

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Predict the noise in x.

        Args:
            x: noisy images [N, C, H, W].
            t: timestep / T, [N, 1, 1, 1] (any shape with N elements).
            c: class vectors [N, n_classes]: one-hot, all zeros for the unconditional model, or any real mixture.
        Returns:
            predicted noise [N, C, H, W].
        """
        self._check_inputs(x, t, c)
        # BEGIN SOLUTION sheet1-unet-forward UNet.forward
        n = x.shape[0]
        features = self.n_features

        init = self.init_conv(x)
        down1 = self.encoder1(init)
        down2 = self.encoder2(down1)
        hidden = self.to_hidden(down2)

        time_emb1 = self.time_embedding1(t).view(n, 2 * features, 1, 1)
        time_emb2 = self.time_embedding2(t).view(n, features, 1, 1)
        class_emb1 = self.class_embedding1(c).view(n, 2 * features, 1, 1)
        class_emb2 = self.class_embedding2(c).view(n, features, 1, 1)

        up1 = self.decoder0(hidden)
        up2 = self.decoder1(class_emb1 * up1 + time_emb1, down2)
        up3 = self.decoder2(class_emb2 * up2 + time_emb2, down1)
        return self.final(torch.cat((up3, init), dim=1))
        # END SOLUTION

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> None:
        expected_image = (self.in_channels, self.height, self.height)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected_image:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected_image))}], got {list(x.shape)}")
        n = x.shape[0]
        if c.dim() != 2 or tuple(c.shape) != (n, self.n_classes):
            raise ValueError(f"c must have shape [{n}, {self.n_classes}] (batch, n_classes), got {list(c.shape)}")
        if t.numel() != n:
            raise ValueError(f"t must hold one timestep per image ({n}, e.g. shape [{n}, 1, 1, 1]), "
                             f"got shape {list(t.shape)}")


def _require_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def count_trainable_parameters(model: nn.Module) -> int:
    """The number of parameters that require a gradient computation (training.py prints it too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_on(device: str) -> None:
    """Sheet 1's own check: both configurations on a dummy batch, with their trainable parameter counts."""
    # BEGIN SOLUTION sheet1-parameter-check the check with a dummy input
    for channels, height in ((3, 32), (1, 28)):
        model = UNet(in_channels=channels, n_features=32, n_classes=10, height=height).to(device)
        x = torch.randn(4, channels, height, height, device=device)
        t = torch.rand(4, 1, 1, 1, device=device)
        c = nn.functional.one_hot(torch.arange(4, device=device), 10).float()
        with torch.no_grad():
            out = model(x, t, c)
        print(f"{device}: UNet({channels}, 32, 10, {height}) {count_trainable_parameters(model)} trainable "
              f"parameters; input {list(x.shape)} -> output {list(out.shape)}")
    # END SOLUTION


if __name__ == "__main__":
    _check_on("cpu")
    if torch.cuda.is_available():
        _check_on("cuda")
    else:
        print("cuda: not available, skipped")
