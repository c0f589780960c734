"""Model registry: ``build_model(name, input_shape, num_classes)`` returns a fresh ``nn.Module``.

All models output raw logits of shape (N, num_classes), use no dropout and draw random numbers
only for parameter init, so ``torch.manual_seed`` before building fixes the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fmlray.config import MODELS
from fmlray.errors import ConfigError

__all__ = ["MODELS", "build_model"]

Shape = tuple[int, ...]


def _mlp(shape: Shape, num_classes: int) -> nn.Module:
    """Flatten, then two hidden layers of 200 units with ReLU."""
    features = 1
    for side in shape:
        features *= side
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def _flat_size(body: nn.Module, shape: Shape) -> int:
    """Number of features ``body`` yields for one input of ``shape`` (one dummy forward)."""
    with torch.no_grad():
        return body(torch.zeros(1, *shape)).numel()


def _pool_relu() -> list[nn.Module]:
    """2x2 max-pooling, then ReLU: the same as ReLU then pooling, bit for bit, values and gradients (both keep
    order and ReLU works element by element; a window whose maximum is <= 0 passes no gradient either way:
    tests/unit/test_models.py), while ReLU and its backward touch a quarter of the values (one cnn5 client's
    update ~4-6 % faster on one thread). Neither has parameters, so state dicts keep their keys."""
    return [nn.MaxPool2d(2), nn.ReLU()]


def _lenet5(shape: Shape, num_classes: int) -> nn.Module:
    """LeNet-5: two 5x5 conv+pool stages, then fc 120 -> 84 -> classes."""
    layers: list[nn.Module] = []
    channels, side = shape[0], shape[1]
    for out in (6, 16):
        # Pad only where an unpadded 5x5 conv would leave too little to pool and convolve again
        # (8x8 digits); 28x28 and 32x32 keep the classic unpadded layout.
        pad = 2 if side < 10 else 0
        layers += [nn.Conv2d(channels, out, 5, padding=pad), *_pool_relu()]
        channels, side = out, (side + 2 * pad - 4) // 2
    body = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(
        body,
        nn.Linear(_flat_size(body, shape), 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def _cnn(shape: Shape, num_classes: int) -> nn.Module:
    """Three 3x3 convs (32, 64, 64; pooling after the first two), then fc 128 -> classes."""
    body = nn.Sequential(
        nn.Conv2d(shape[0], 32, 3, padding=1),
        *_pool_relu(),
        nn.Conv2d(32, 64, 3, padding=1),
        *_pool_relu(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    return nn.Sequential(body, nn.Linear(_flat_size(body, shape), 128), nn.ReLU(), nn.Linear(128, num_classes))


def _cnn5(shape: Shape, num_classes: int) -> nn.Module:
    """The CNN of the FedAvg paper (McMahan et al., arXiv 1602.05629): two 5x5 'same' convs (32, 64),
    each followed by 2x2 max-pooling, then fc 512 -> classes. 1,663,370 parameters on 28x28x1."""
    body = nn.Sequential(
        nn.Conv2d(shape[0], 32, 5, padding=2),
        *_pool_relu(),
        nn.Conv2d(32, 64, 5, padding=2),
        *_pool_relu(),
        nn.Flatten(),
    )
    return nn.Sequential(body, nn.Linear(_flat_size(body, shape), 512), nn.ReLU(), nn.Linear(512, num_classes))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    """Bias-free conv followed by BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn(c_out, c_out, 3, 1)
        project = stride != 1 or c_in != c_out
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + self.shortcut(x))


def _resnet(shape: Shape, num_classes: int, widths: tuple[int, ...], blocks: int) -> nn.Module:
    """CIFAR-style ResNet: 3x3 stem (no max-pool), stages of BasicBlocks, global average pool."""
    layers: list[nn.Module] = [_conv_bn(shape[0], widths[0], 3, 1), nn.ReLU()]
    c_in = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_BasicBlock(c_in, width, stride))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _resnet8(shape: Shape, num_classes: int) -> nn.Module:
    """ResNet-8: 3 stages of 1 block at widths 16/32/64."""
    return _resnet(shape, num_classes, (16, 32, 64), 1)


def _resnet18(shape: Shape, num_classes: int) -> nn.Module:
    """ResNet-18: 4 stages of 2 blocks at widths 64/128/256/512."""
    return _resnet(shape, num_classes, (64, 128, 256, 512), 2)


_BUILDERS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp": _mlp,
    "lenet5": _lenet5,
    "cnn": _cnn,
    "cnn5": _cnn5,
    "resnet8": _resnet8,
    "resnet18": _resnet18,
}
assert tuple(_BUILDERS) == MODELS, "fmlray.config.MODELS and the model registry disagree"


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` ((C, H, W) or (D,)) and ``num_classes``."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ConfigError(f"model {name!r} needs num_classes >= 2, got {num_classes}")
    shape = tuple(int(side) for side in input_shape)
    if len(shape) not in (1, 3) or min(shape, default=0) < 1:
        raise ConfigError(f"model {name!r} needs input shape (C, H, W) or (D,), got {shape}")
    if name != "mlp" and len(shape) == 1:
        raise ConfigError(
            f"model {name!r} needs image input (C, H, W) but the dataset gives flat features "
            f"of shape {shape}; use 'mlp'"
        )
    try:
        return _BUILDERS[name](shape, num_classes)
    except RuntimeError as exc:  # the dummy forward fails when the image is too small to pool
        raise ConfigError(f"model {name!r} cannot handle images of shape {shape}; use 'mlp' or 'resnet8'") from exc
