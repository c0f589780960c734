"""Unit tests for the model registry in fmlray.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmlray import config
from fmlray.errors import ConfigError
from fmlray.models import MODELS, build_model

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CONV_MODELS = [name for name in MODELS if name != "mlp"]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_models_tuple_is_the_config_one() -> None:
    assert MODELS is config.MODELS
    assert MODELS == ("mlp", "lenet5", "cnn", "cnn5", "resnet8", "resnet18")


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_on_images(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    batch = 2 if name == "resnet18" and shape[-1] > 8 else 4  # keeps resnet18 fast on CPU
    logits = model(torch.randn(batch, *shape))
    assert logits.shape == (batch, 10)
    nn.functional.cross_entropy(logits, torch.arange(batch)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cnn5_is_the_fedavg_papers_cnn() -> None:
    # McMahan et al. (2017), section 3: "1,663,370 total parameters" on 28x28 MNIST
    model = build_model("cnn5", (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]


def test_mlp_on_flat_features() -> None:
    model = build_model("mlp", (60,), 2)
    assert model(torch.randn(4, 60)).shape == (4, 2)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_models_reject_flat_input(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, (60,), 2)
    message = str(info.value)
    assert "mlp" in message and name in message and "(60,)" in message
    assert "\n" not in message


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("vgg16", (1, 28, 28), 10)
    assert "vgg16" in str(info.value)
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_num_classes_below_two_rejected(num_classes: int) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mlp", (1, 8, 8), num_classes)


def test_image_too_small_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cnn"):
        build_model("cnn", (1, 2, 2), 10)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_params_different_seed_different(name: str) -> None:
    def built(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return _params(build_model(name, (1, 8, 8), 10))

    first, again, other = built(1), built(1), built(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_build_uses_no_rng_beyond_init() -> None:
    # Building twice from one seed must leave the global RNG in the same state both times.
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        build_model("lenet5", (1, 8, 8), 10)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("name", MODELS)
def test_no_dropout(name: str) -> None:
    model = build_model(name, (1, 8, 8), 10)
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def test_resnet8_has_batchnorm_buffers() -> None:
    buffers = dict(build_model("resnet8", (3, 32, 32), 10).named_buffers())
    counters = [key for key in buffers if key.endswith("num_batches_tracked")]
    assert counters and all(buffers[key].dtype == torch.long for key in counters)
    assert any(key.endswith("running_mean") for key in buffers)
    assert any(key.endswith("running_var") for key in buffers)


def test_mlp_digits_parameter_count() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    expected = 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected


def test_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", (1, 8, 8), 10).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), model(x))


def _relu_then_pool(model: nn.Module) -> nn.Module:
    """The same model with the classic order, ReLU before each max-pooling, its parameters shared."""
    body = model[0]
    layers = list(body)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layer
    return nn.Sequential(nn.Sequential(*layers), *list(model)[1:])


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 8, 8)), ("lenet5", (1, 28, 28)), ("cnn", (3, 32, 32)),
                                         ("cnn5", (1, 28, 28)), ("cnn5", (3, 32, 32))])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_pooling_before_relu_gives_the_classic_orders_values_and_gradients_bit_for_bit(name, shape, layout):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model[0]) == 2
    classic = _relu_then_pool(model)
    assert [type(m) for m in classic[0]] != [type(m) for m in model[0]]
    x = torch.randn(16, *shape) - 0.5  # many pooling windows all <= 0
    x[0] = 0.0  # and windows of ties at exactly 0
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    grads = []
    for m in (model, classic):
        m.zero_grad()
        z = m(x)
        nn.functional.cross_entropy(z, y).backward()
        grads.append((z.detach(), [p.grad.clone() for p in m.parameters()]))
    (z0, g0), (z1, g1) = grads
    assert torch.equal(z0, z1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert all(g.abs().sum() > 0 for g in g0)
