"""The personalised-FL baselines: one step of each checked by hand on toy numbers, what each shares,
and the compositions that tie them to FedAvg, Local and FML (exact, to float tolerance)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fmlray.aggregate import Server, weighted
from fmlray.algorithms import apfl, ditto, dml, fedavg, fedbn, fedper, fedprox, fedrep, fml, lgfedavg, local
from fmlray.algorithms.base import all_keys, layers, train_client
from fmlray.optim import make_optimizer
from fmlray.config import load_config
from fmlray.engine.serial import SerialEngine
from fmlray.models import build_model
from fmlray.simulation import prepare, simulate


def sgd(model, lr=1.0, momentum=0.0):
    return make_optimizer(model.parameters(), name="sgd", lr=lr, momentum=momentum, weight_decay=0.0)


def step(algo, models, x, y, *, epochs=1, lr=1.0, anchor=None, scalars=None, momentum=0.0, batch_size=None, seed=0):
    opts = {n: sgd(m, lr, momentum) for n, m in models.items()}
    return train_client(algo, models, opts, x, y, epochs=epochs, batch_size=batch_size or len(y),
                        generator=torch.Generator().manual_seed(seed), anchor=anchor, scalars=scalars)


def linear(weight, bias=None):
    m = nn.Linear(2, 2, bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight))
        if bias is not None:
            m.bias.copy_(torch.tensor(bias))
    return m


def two_layers(w1, w2):
    """Linear(2, 2) -> Linear(2, 2), no biases: layer "0" (the body) and layer "1" (the head)."""
    return nn.Sequential(linear(w1), linear(w2))


X, Y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
EYE = [[1.0, 0.0], [0.0, 1.0]]


def ce_grad(z):
    """d CE / d logits for label 0: softmax(z) − e₀."""
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    return [p[0] - 1.0, p[1]]


# --- one step of each, by hand ------------------------------------------------------------------------


def test_ditto_step_by_hand_personal_model_pulled_to_the_received_global():
    # personal v = 0: p = [1/2, 1/2], CE gradient [[-1/2, 0], [1/2, 0]] (bias [-1/2, 1/2]); the penalty
    # (λ/2)‖v − w₀‖² adds λ(v − w₀) = −λ·w₀. The meme starts at w₀ and takes a plain CE step.
    w0, b0 = [[1.0, 2.0], [3.0, 4.0]], [1.0, -1.0]
    v, w = linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]), linear(w0, b0)
    anchor = [p.detach().clone() for p in w.parameters()]
    step(ditto.make(lam=0.5), {"local": v, "meme": w}, X, Y, anchor=anchor)
    assert torch.allclose(v.weight, torch.tensor([[0.5 + 0.5, 1.0], [-0.5 + 1.5, 2.0]]))
    assert torch.allclose(v.bias, torch.tensor([0.5 + 0.5, -0.5 - 0.5]))
    g = ce_grad([1.0 + 1.0, 3.0 - 1.0])  # w₀x + b₀ = [2, 2]: p = [1/2, 1/2] again
    assert torch.allclose(w.weight, torch.tensor([[1.0 - g[0], 2.0], [3.0 - g[1], 4.0]]))


def test_fedper_shares_all_but_its_head_and_steps_both_by_hand():
    # W1 = W2 = I, x = [1, 0]: z = [1, 0], dz = softmax(z) − e₀ = [−q, q]; both layers get dz ⊗ [1, 0]
    algo = fedper.make(head_layers=1)
    model = two_layers(EYE, EYE)
    assert algo.shared_keys(model) == ["0.weight"] and algo.shares == "local"
    step(algo, {"local": model}, X, Y)
    q = -ce_grad([1.0, 0.0])[0]
    for layer in (model[0], model[1]):
        assert torch.allclose(layer.weight, torch.tensor([[1.0 + q, 0.0], [-q, 1.0]]))


def test_fedrep_trains_the_head_then_the_body_by_hand():
    # epoch 1 (head): W2 ← I − dz⊗h with h = x, body fixed; epoch 2 (body): z = W2·x, W1 ← I − (W2ᵀdz)⊗x, head fixed
    algo = fedrep.make(head_layers=1, body_epochs=1)
    model = two_layers(EYE, EYE)
    assert algo.shared_keys(model) == ["0.weight"]
    step(algo, {"local": model}, X, Y, epochs=2)
    q = -ce_grad([1.0, 0.0])[0]
    w2 = [[1.0 + q, 0.0], [-q, 1.0]]
    dz = ce_grad([w2[0][0], w2[1][0]])
    back = [w2[0][0] * dz[0] + w2[1][0] * dz[1], w2[0][1] * dz[0] + w2[1][1] * dz[1]]  # W2ᵀ dz
    assert torch.allclose(model[1].weight, torch.tensor(w2))
    assert torch.allclose(model[0].weight, torch.tensor([[1.0 - back[0], 0.0], [-back[1], 1.0]]))


def test_fedrep_with_every_epoch_on_the_body_leaves_the_head_untouched():
    model = two_layers(EYE, EYE)
    step(fedrep.make(head_layers=1, body_epochs=2), {"local": model}, X, Y, epochs=2)
    assert torch.equal(model[1].weight, torch.tensor(EYE)) and not torch.equal(model[0].weight, torch.tensor(EYE))


def test_fedbn_keeps_batchnorm_private_and_its_statistics_by_hand():
    model = nn.Sequential(linear(EYE), nn.BatchNorm1d(2))
    algo = fedbn.make()
    assert algo.shared_keys(model) == ["0.weight"]  # weight, bias, running stats and counter of "1" stay
    step(algo, {"local": model}, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    # BatchNorm saw h = x (W = I): mean [1/2, 1/2], unbiased variance [1/2, 1/2]; momentum 0.1
    assert torch.allclose(model[1].running_mean, torch.tensor([0.05, 0.05]))
    assert torch.allclose(model[1].running_var, torch.tensor([0.95, 0.95]))
    resnet = build_model("resnet8", (1, 8, 8), 10)
    shared, every = set(algo.shared_keys(resnet)), set(all_keys(resnet))
    bn = {k for k in every if any(s in k for s in ("running_", "num_batches", ".1.weight", ".1.bias"))}
    assert shared == every - bn and {"7.weight", "7.bias"} <= shared  # convolutions and the classifier are averaged
    assert algo.shared_keys(build_model("lenet5", (1, 8, 8), 10)) == all_keys(build_model("lenet5", (1, 8, 8), 10))


def test_apfl_step_by_hand_mixes_parameters_and_learns_alpha():
    # v = 0, w₀ = [[0, 0], [1, 0]], α = 1/2: v̄ = w₀/2, z = v̄x = [0, 1/2], ∇f(v̄) = dz ⊗ x.
    # v ← v − α∇f(v̄); α ← α − η_α⟨v − w₀, ∇f(v̄)⟩ = α + η_α·dz[1]; w takes a plain CE step on z = w₀x = [0, 1].
    w0 = [[0.0, 0.0], [1.0, 0.0]]
    v, w = linear([[0.0, 0.0], [0.0, 0.0]]), linear(w0)
    alpha = {"alpha": torch.tensor(0.5, requires_grad=True)}
    step(apfl.make(alpha=0.5, alpha_lr=0.1), {"local": v, "meme": w}, X, Y, scalars=alpha)
    dz = ce_grad([0.0, 0.5])
    assert torch.allclose(v.weight, torch.tensor([[-0.5 * dz[0], 0.0], [-0.5 * dz[1], 0.0]]))
    assert alpha["alpha"].item() == pytest.approx(0.5 + 0.1 * dz[1], abs=1e-6)
    g = ce_grad([0.0, 1.0])
    assert torch.allclose(w.weight, torch.tensor([[-g[0], 0.0], [1.0 - g[1], 0.0]]))


def test_apfl_alpha_stays_in_the_unit_interval_and_is_fixed_when_not_adaptive():
    for adaptive, start, expected in ((True, 0.999, 1.0), (False, 0.5, 0.5)):
        v, w = linear([[0.0, 0.0], [0.0, 0.0]]), linear([[0.0, 0.0], [1.0, 0.0]])
        alpha = {"alpha": torch.tensor(start, requires_grad=True)}
        step(apfl.make(alpha=start, adaptive=adaptive, alpha_lr=10.0), {"local": v, "meme": w}, X, Y, scalars=alpha)
        assert alpha["alpha"].item() == pytest.approx(expected)


def test_lgfedavg_shares_only_its_top_layers_and_steps_by_hand():
    algo = lgfedavg.make(global_layers=1)
    model = two_layers(EYE, EYE)
    assert algo.shared_keys(model) == ["1.weight"]
    mlp = build_model("mlp", (1, 8, 8), 10)
    assert algo.shared_keys(mlp) == ["5.weight", "5.bias"] and layers(mlp)[-1] == ["5.weight", "5.bias"]
    step(algo, {"local": model}, X, Y)
    q = -ce_grad([1.0, 0.0])[0]
    assert torch.allclose(model[1].weight, torch.tensor([[1.0 + q, 0.0], [-q, 1.0]]))


def test_dml_with_alpha_beta_one_is_two_plain_steps_by_hand_and_shares_nothing():
    a, b = linear(EYE), linear([[0.0, 0.0], [0.0, 0.0]])
    algo = dml.make(alpha=1.0, beta=1.0)
    assert algo.shares is None and algo.trains == ("local", "peer") and algo.evaluates == ("local", "peer")
    step(algo, {"local": a, "peer": b}, X, Y)
    q = -ce_grad([1.0, 0.0])[0]
    assert torch.allclose(a.weight, torch.tensor([[1.0 + q, 0.0], [-q, 1.0]]))
    assert torch.allclose(b.weight, torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))


def test_server_learning_rate_by_hand():
    previous = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(3)}
    mean_of = weighted({"w": np.array([3.0, -1.0], np.float32), "n": np.array(5)}, 2.0)
    assert Server().next_global(previous, mean_of)["w"].tolist() == [3.0, -1.0]
    half = Server(lr=0.5).next_global(previous, mean_of)
    assert half["w"].tolist() == [2.0, 0.0] and half["w"].dtype == np.float32 and int(half["n"]) == 5
    assert Server(weighting="uniform").weight(17) == 1.0 and Server().weight(17) == 17.0


# --- compositions, on the training loop ------------------------------------------------------------------


def toy(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(algo, models, **kw):
    x, y = data()
    return step(algo, models, x, y, epochs=3, lr=0.1, momentum=0.9, batch_size=4, seed=5, **kw)


def assert_same_params(a, b):
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), k


def test_ditto_with_lambda_zero_is_local_beside_fedavg():
    v, w = toy(1), toy(2)
    run(ditto.make(lam=0.0), {"local": v, "meme": w}, anchor=[p.detach().clone() for p in toy(2).parameters()])
    alone_v, alone_w = toy(1), toy(2)
    run(local.make(), {"local": alone_v})
    run(fedavg.make(), {"meme": alone_w})
    assert_same_params(v, alone_v)
    assert_same_params(w, alone_w)


def test_fedper_with_an_empty_head_is_fedavg():
    m, alone = toy(3), toy(3)
    algo = fedper.make(head_layers=0)
    assert algo.shared_keys(m) == all_keys(m)
    run(algo, {"local": m})
    run(fedavg.make(), {"meme": alone})
    assert_same_params(m, alone)


def test_fml_with_alpha_beta_one_is_local_beside_fedavg():
    a, b = toy(1), toy(2)
    run(fml.make(alpha=1.0, beta=1.0), {"local": a, "meme": b})
    alone_a, alone_b = toy(1), toy(2)
    run(local.make(), {"local": alone_a})
    run(fedavg.make(), {"meme": alone_b})
    assert_same_params(a, alone_a)
    assert_same_params(b, alone_b)


def test_dml_is_fml_with_the_peer_in_the_memes_place():
    a, b = toy(1), toy(2)
    run(dml.make(alpha=0.3, beta=0.7, temperature=2.0), {"local": a, "peer": b})
    fa, fb = toy(1), toy(2)
    run(fml.make(alpha=0.3, beta=0.7, temperature=2.0), {"local": fa, "meme": fb})
    assert_same_params(a, fa)
    assert_same_params(b, fb)


def test_fedprox_with_mu_zero_is_fedavg_with_momentum_and_several_epochs():
    a, b = toy(4), toy(4)
    run(fedprox.make(mu=0.0), {"meme": a}, anchor=[p.detach().clone() for p in toy(4).parameters()])
    run(fedavg.make(), {"meme": b})
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# --- compositions, whole runs on the serial engine --------------------------------------------------------

SMALL = ["engine.kind=serial", "clients.num_clients=4", "run.rounds=2", "training.epochs=1",
         "data.max_train_samples=300", "clients.groups=[{name='all', share=1.0, local_model='mlp'}]"]


def whole_run(*overrides):
    cfg = load_config(None, [*SMALL, *overrides])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine)
    finally:
        engine.close()


def figures(result, model, split="test"):
    return [(r["round"], r["client"], r["loss"], r["accuracy"]) for r in result.rows
            if r["model"] == model and r["split"] == split]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def fedavg_run():
    return whole_run("algorithm.name=fedavg")


def test_whole_run_fedper_with_an_empty_head_is_fedavg(fedavg_run):
    other = whole_run("algorithm.name=fedper", "algorithm.fedper.head_layers=0")
    assert_same_state(other.global_state, fedavg_run.global_state)
    assert figures(other, "global") == figures(fedavg_run, "global")
    assert figures(other, "local") == figures(fedavg_run, "global")  # its personal model is the global one


def test_whole_run_ditto_with_lambda_zero_has_fedavgs_global_model(fedavg_run):
    other = whole_run("algorithm.name=ditto", "algorithm.ditto.lam=0.0")
    assert_same_state(other.global_state, fedavg_run.global_state)
    assert figures(other, "global") == figures(fedavg_run, "global")


def test_whole_run_fedprox_with_mu_zero_is_fedavg(fedavg_run):
    other = whole_run("algorithm.name=fedprox", "algorithm.fedprox.mu=0.0")
    assert_same_state(other.global_state, fedavg_run.global_state)
    assert figures(other, "global") == figures(fedavg_run, "global")


def test_whole_run_fml_with_alpha_beta_one_is_local_beside_fedavg(fedavg_run):
    other = whole_run("algorithm.name=fml", "algorithm.fml.alpha=1.0", "algorithm.fml.beta=1.0")
    alone = whole_run("algorithm.name=local")
    assert_same_state(other.global_state, fedavg_run.global_state)
    assert figures(other, "global") == figures(fedavg_run, "global")
    assert figures(other, "local") == figures(alone, "local")
    assert figures(other, "local", "train") == figures(alone, "local", "train")


def test_whole_run_dml_equals_fml_in_its_first_round():
    # every client trains in round 1 from the same initial models (peer and meme: the round-0 global one)
    a, b = whole_run("algorithm.name=dml", "run.rounds=1"), whole_run("algorithm.name=fml", "run.rounds=1")
    assert figures(a, "local") == figures(b, "local") and figures(a, "peer", "train") == figures(b, "meme", "train")
    assert a.global_state is None


@pytest.mark.parametrize("name, private", [("fedper", {"5.weight", "5.bias"}), ("lgfedavg", None),
                                           ("fedrep", {"5.weight", "5.bias"}), ("fedbn", set())])
def test_partially_shared_algorithms_send_only_their_shared_keys(name, private):
    result = whole_run(f"algorithm.name={name}", *(["training.epochs=2"] if name == "fedrep" else []))  # head, body
    every = set(all_keys(build_model("mlp", (1, 8, 8), 10)))
    if private is None:  # lgfedavg: only the top layer travels
        assert set(result.global_state) == {"5.weight", "5.bias"}
    else:
        assert set(result.global_state) == every - private
    has_global = {r["model"] for r in result.rows if r["split"] in ("test", "global_test")}
    assert has_global == ({"local", "global"} if set(result.global_state) == every else {"local"})
