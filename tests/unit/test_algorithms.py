"""Client updates checked by hand on toy numbers, and the invariants DESIGN.md §1 promises."""

import copy
import math

import pytest
import torch
from torch import nn

from fmlray.algorithms import fedavg, fedprox, fml, local
from fmlray.algorithms.base import batches, cpu_layout, cross_entropy, evaluate, train_client
from fmlray.optim import make_optimizer
from fmlray.errors import TrainingError


def sgd(model, lr=1.0, momentum=0.0, weight_decay=0.0):
    return make_optimizer(model.parameters(), name="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)


def linear(seed=0, zero=False):
    torch.manual_seed(seed)
    m = nn.Linear(2, 2)
    if zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    return m


def toy_data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g)


def run(algo, models, x, y, lr=0.1, seed=3, **kw):
    opts = {name: sgd(m, lr=lr, momentum=0.9) for name, m in models.items()}
    return train_client(algo, models, opts, x, y, epochs=2, batch_size=4, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per-sample"])
def test_cross_entropy_is_torchs_bit_for_bit_also_under_vmap(per_sample):
    # under vmap fmlray writes the loss out (no sympy import); values and gradients must not move by a bit
    from torch.func import vmap
    gen = torch.Generator().manual_seed(3)
    for batch, classes in ((1, 2), (16, 10), (33, 7)):
        z = (torch.randn(5, batch, classes, generator=gen) * 4).requires_grad_()
        y = torch.randint(0, classes, (5, batch), generator=gen)
        got = []
        for f in (nn.functional.cross_entropy, cross_entropy):
            if per_sample:  # as the batched update's padded batches take it: one sample at a time, inside vmap
                out = vmap(lambda zz, yy, f=f: vmap(lambda z1, y1: f(z1[None], y1[None]))(zz, yy))(z, y)
            else:
                out = vmap(f)(z, y)
            got.append((out, *torch.autograd.grad((out * torch.arange(1.0, out.numel() + 1).view(out.shape)).sum(), z)))
        for a, b in zip(*got):
            assert torch.equal(a, b)
    z0, y0 = z[0].detach(), y[0]
    assert torch.equal(cross_entropy(z0, y0), nn.functional.cross_entropy(z0, y0))


def test_distill_matches_hand_computed_kl():
    # p_teacher = softmax([ln 3, 0]) = [3/4, 1/4]; p_student = [1/2, 1/2]
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert fml.distill(student, teacher, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 2: softmax of logits / 2, and the KL multiplied by T² = 4
    q = 3 ** 0.5 / (3 ** 0.5 + 1)
    expected_t2 = 4 * (q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5))
    assert fml.distill(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-6)


def test_distill_is_batch_mean():
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    one = fml.distill(student[:1], teacher[:1], 1.0).item()
    assert fml.distill(student, teacher, 1.0).item() == pytest.approx(one / 2, abs=1e-7)


def test_mutual_losses_weights_label_and_peer():
    z_local, z_meme = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    ce = nn.functional.cross_entropy
    l_local, l_meme = fml.mutual_losses(z_local, z_meme, y, alpha=0.3, beta=0.8)
    assert l_local.item() == pytest.approx(0.3 * ce(z_local, y).item() + 0.7 * fml.distill(z_local, z_meme, 1).item())
    assert l_meme.item() == pytest.approx(0.8 * ce(z_meme, y).item() + 0.2 * fml.distill(z_meme, z_local, 1).item())


def test_kl_term_sends_no_gradient_into_the_peer():
    z_local = torch.randn(4, 3, requires_grad=True)
    z_meme = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    l_local, _ = fml.mutual_losses(z_local, z_meme, y, alpha=0.0, beta=0.5)  # pure KL for the local model
    l_local.backward()
    assert z_meme.grad is None
    assert z_local.grad is not None and z_local.grad.abs().sum() > 0


def test_one_sgd_step_by_hand():
    # zero weights → p = [1/2, 1/2]; CE gradient = (p − onehot(y)) xᵀ; lr 1 subtracts it
    model = linear(zero=True)
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    train_client(fedavg.make(), {"meme": model}, {"meme": sgd(model)}, x, y, epochs=1, batch_size=1,
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.weight, torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))
    assert torch.allclose(model.bias, torch.tensor([0.5, -0.5]))


def test_fml_with_alpha_beta_one_trains_each_model_as_plain_cross_entropy():
    x, y = toy_data()
    local_m, meme_m = linear(1), linear(2)
    run(fml.make(alpha=1.0, beta=1.0), {"local": local_m, "meme": meme_m}, x, y)
    alone_local, alone_meme = linear(1), linear(2)
    run(local.make(), {"local": alone_local}, x, y)
    run(fedavg.make(), {"meme": alone_meme}, x, y)
    for a, b in ((local_m, alone_local), (meme_m, alone_meme)):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6)


def test_fml_models_do_learn_from_each_other():
    x, y = toy_data()
    local_m, meme_m = linear(1), linear(2)
    run(fml.make(alpha=0.5, beta=0.5), {"local": local_m, "meme": meme_m}, x, y)
    alone = linear(1)
    run(local.make(), {"local": alone}, x, y)
    assert not torch.allclose(local_m.weight, alone.weight)


def test_fml_schedule_is_used_per_round():
    seen = []
    algo = fml.make(alpha=0.5, beta=0.5, schedule=lambda rnd: seen.append(rnd) or (1.0, 1.0))
    x, y = toy_data(4)
    run(algo, {"local": linear(1), "meme": linear(2)}, x, y, rnd=7)
    assert set(seen) == {7}


def test_fedprox_with_mu_zero_equals_fedavg():
    x, y = toy_data()
    a, b = linear(5), linear(5)
    run(fedavg.make(), {"meme": a}, x, y)
    run(fedprox.make(mu=0.0), {"meme": b}, x, y, anchor=[p.detach().clone() for p in linear(5).parameters()])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_fedprox_penalty_by_hand_and_pulls_toward_anchor():
    m = linear(zero=True)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    anchor = [torch.zeros(2, 2), torch.zeros(2)]
    assert fedprox.proximal(0.5)(m, anchor).item() == pytest.approx(0.25 * 5)
    x, y = toy_data()
    start = linear(5)
    anchor = [p.detach().clone() for p in start.parameters()]
    plain, prox = copy.deepcopy(start), copy.deepcopy(start)
    run(fedavg.make(), {"meme": plain}, x, y, lr=0.1)
    run(fedprox.make(mu=1.0), {"meme": prox}, x, y, lr=0.1, anchor=anchor)
    drift = lambda m: sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(m.parameters(), anchor))  # noqa: E731
    assert drift(prox) < drift(plain)


def test_nan_loss_is_a_training_error():
    x, y = toy_data()
    x[0, 0] = float("nan")
    m = linear()
    with pytest.raises(TrainingError, match="not finite"):
        train_client(fedavg.make(), {"meme": m}, {"meme": sgd(m)}, x, y, epochs=1, batch_size=len(y),
                     generator=torch.Generator().manual_seed(0))


def test_a_loss_gone_non_finite_mid_training_names_the_first_bad_steps_losses():
    # a row of inf reaches the loss only in the batch that holds it; training goes on to the end (the
    # client is left out all the same) and the error gives the losses of the first step that went bad
    x, y = toy_data(n=12)
    x[5] = float("inf")
    m = linear()
    with pytest.raises(TrainingError, match=r"loss is not finite \(meme=nan\)"):
        train_client(fedavg.make(), {"meme": m}, {"meme": sgd(m, lr=0.1)}, x, y, epochs=2, batch_size=4,
                     generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(m.weight).all()  # it trained on past the bad step: nothing was read before the end


@pytest.mark.parametrize("n", [16, 160])
def test_training_reads_from_the_device_a_fixed_number_of_times_whatever_the_steps(monkeypatch, n):
    # each read of a tensor's value makes the host wait for a GPU: train_client reads losses and hits once at
    # the end, not once a step (the old loop read 3 values a step: 120 reads for n=160 here)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name: reads.append(_name) or _real(t, *a))
    x, y = toy_data(n=n)
    models = {"local": linear(1), "meme": linear(2)}
    out = run(fml.make(alpha=0.5, beta=0.5), models, x, y)
    assert sorted(reads) == ["tolist", "tolist"], reads
    assert 0 <= out["local_accuracy"] <= 1
    reads.clear()
    loss, accuracy = evaluate(models["meme"], x, y, batch_size=4)
    assert sorted(reads) == ["__int__", "tolist"], reads
    assert loss > 0 and 0 <= accuracy <= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_cpu_layout_is_the_same_batch_in_the_layout_cpu_convolutions_run_fastest_on(channels):
    x = torch.randn(6, channels, 5, 7, generator=torch.Generator().manual_seed(0))
    got = cpu_layout(x)
    assert torch.equal(got, x) and got.shape == x.shape
    assert got.stride() == (35 * channels, 1, 7 * channels, channels)  # NHWC in memory
    if channels == 1:
        assert got.data_ptr() == x.data_ptr()  # a view, not a copy
    conv = nn.Conv2d(channels, 4, 3, padding=1)
    out = conv(got)  # the convolution takes it as channels-last (a one-channel NCHW batch would stay NCHW)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, conv(x), atol=1e-5)
    for other in (torch.randn(6, 3), torch.randn(2, 6, 3)):  # not a batch of images: as it is
        assert cpu_layout(other) is other


def test_models_that_convolve_train_and_evaluate_on_channels_last_batches_and_others_on_the_batch_as_is():
    def first_layer_sees(model):
        seen = []
        model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
        return seen
    x, y = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))  # an MLP on images gains nothing from the layout
    for model, strides in ((conv, (36, 1, 6, 1)), (flat, (36, 36, 6, 1))):
        seen = first_layer_sees(model)
        run(fedavg.make(), {"meme": model}, x, y)
        evaluate(model, x, y, batch_size=4)
        assert seen == [strides] * (4 + 2), seen  # 2 epochs of 2 steps, then 2 evaluation batches
        seen.clear()  # a function of the batch (the host's evaluation): as asked
        evaluate(lambda xb, model=model: model(xb), x, y, batch_size=8)
        evaluate(lambda xb, model=model: model(xb), x, y, batch_size=8, channels_last=True)
        assert seen == [(36, 36, 6, 1), (36, 1, 6, 1)], seen
    # where one of a client's models convolves, they all get the layout (FML: a CNN beside an MLP meme)
    seen = first_layer_sees(flat)
    run(fml.make(alpha=0.5, beta=0.5), {"local": conv, "meme": flat}, x, y)
    assert seen == [(36, 1, 6, 1)] * 4, seen


def test_batches_cover_every_row_once_and_never_leave_a_single_row():
    for n, bs in ((10, 3), (9, 4), (5, 5), (1, 4), (33, 32)):
        got = list(batches(n, bs, torch.Generator().manual_seed(0)))
        assert sorted(torch.cat(got).tolist()) == list(range(n))
        assert all(len(b) > 1 for b in got) or n == 1


def test_train_metrics_report_each_trained_model():
    x, y = toy_data()
    out = run(fml.make(alpha=0.5, beta=0.5), {"local": linear(1), "meme": linear(2)}, x, y)
    assert set(out) == {"local_loss", "local_accuracy", "meme_loss", "meme_accuracy"}
    assert 0 <= out["local_accuracy"] <= 1 and out["meme_loss"] > 0


@pytest.mark.parametrize("name, stateless", [
    ("fedavg", True), ("fedprox", True), ("fml", False), ("local", False), ("ditto", False), ("fedper", False),
    ("fedrep", False), ("fedbn", False), ("lgfedavg", False), ("apfl", False), ("dml", False)])
def test_only_algorithms_whose_clients_keep_nothing_are_stateless(name, stateless):
    # a stateless algorithm's clients may be trained by any actor, dealt anew each round (RayEngine._deal)
    from fmlray.algorithms import build_algorithm
    from fmlray.config import load_config
    cfg = load_config(None, [f"algorithm.name={name}"])
    assert build_algorithm(cfg.algorithm, cfg.run.rounds).stateless is stateless
