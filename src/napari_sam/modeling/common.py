"""Small building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))`` acting on the last dimension.

    Attribute names (``lin1``, ``lin2``) are the checkpoint's state-dict keys.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(embedding_dim, mlp_dim), nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.lin1(x))
        return self.lin2(hidden)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a BxCxHxW tensor (eps 1e-6, as in SAM).

    Normalises each pixel's C-vector to zero mean and unit (biased) variance, then
    applies the per-channel ``weight`` and ``bias``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(num_channels)), nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(dim=1, keepdim=True)
        normed = centred / torch.sqrt(var + self.eps)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's heads).

    ``layers`` is the checkpoint key; an optional sigmoid follows the last layer.
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
