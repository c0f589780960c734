"""The batched client update (fmlray/engine/batched.py) against the sequential loop it replaces: the same
models within float tolerance for every algorithm that batches, the fallbacks, the auto rule, resume, and
the GPU-path pieces that run on the CPU (device-resident rows, bf16 autocast, CUDA determinism switches)."""

import dataclasses
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fmlray import checkpoint
from fmlray.cli import main
from fmlray.config import load_config
from fmlray.engine import batched
from fmlray.engine.batched import auto_batches, loss_is_sample_mean, masked_sgd, sgd
from fmlray.engine.device import cuda_determinism
from fmlray.engine.host import ClientHost, initial_global_state
from fmlray.engine.serial import SerialEngine
from fmlray.models import build_model
from fmlray.simulation import prepare, simulate

MLP = "clients.groups=[{name='all', share=1.0, local_model='mlp'}]"
# 6 Dirichlet clients of unequal sizes (3 to 9 batches of 16 over 2 epochs, last batches shorter), half a round
SMALL = ["run.rounds=2", "training.epochs=2", "clients.num_clients=6", "clients.fraction=0.5",
         "data.max_train_samples=400", "data.min_samples=5", "engine.kind=serial"]


def run(overrides, batching):
    cfg = load_config(None, [*SMALL, *overrides, f"training.batching={batching!r}"])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        result = simulate(cfg, prepared.dataset, prepared.partition, engine)
        rows = {cid: store.get(cid).copy() for store in engine.host.stores.values() for cid in store.rows}
        return result, rows, engine.host
    finally:
        engine.close()


@pytest.fixture(params=["prefix", "whole"])
def steps(request, monkeypatch):
    """The batched steps as the CPU runs them (on the clients still training) and as a GPU does (on the whole
    stack at a fixed shape, finished clients masked: the shape a CUDA graph replays; here run eagerly)."""
    if request.param == "whole":
        monkeypatch.setattr(batched, "WHOLE_STACK", ("cpu", "cuda"))
    other = "_prefix_steps" if request.param == "whole" else "_whole_steps"

    def not_here(*args, **kwargs):
        raise AssertionError(f"{other} ran where the {request.param} steps should")
    monkeypatch.setattr(batched.Batcher, other, not_here)  # so the parametrisation cannot silently run one way twice
    return request.param


def assert_close(a, b, atol=2e-6):
    """Same global model, same private rows (as float32 where they hold floats), same metrics rows."""
    (ra, rows_a, _), (rb, rows_b, _) = a, b
    assert (ra.global_state is None) == (rb.global_state is None)
    for k in ra.global_state or {}:
        np.testing.assert_allclose(ra.global_state[k], rb.global_state[k], rtol=0, atol=atol, err_msg=k)
    assert rows_a.keys() == rows_b.keys()
    for cid in rows_a:
        np.testing.assert_allclose(rows_a[cid].view(np.float32), rows_b[cid].view(np.float32), rtol=0, atol=atol)
    key = lambda r: (r["round"], r["client"], r["model"], r["split"])  # noqa: E731
    xa, xb = sorted(ra.rows, key=key), sorted(rb.rows, key=key)
    assert [key(r) for r in xa] == [key(r) for r in xb]
    np.testing.assert_allclose([r["loss"] for r in xa], [r["loss"] for r in xb], atol=1e-5)
    np.testing.assert_allclose([r["accuracy"] for r in xa], [r["accuracy"] for r in xb], atol=1e-9)


@pytest.mark.parametrize("algorithm", ["fml", "fedavg", "fedprox", "local", "ditto", "dml", "fedper", "lgfedavg"])
def test_every_algorithm_that_batches_trains_the_models_the_sequential_loop_does(algorithm, steps):
    overrides = [MLP, f"algorithm.name={algorithm}"]
    seq, vm = run(overrides, "sequential"), run(overrides, "vmap")
    assert_close(seq, vm)
    assert not vm[2].batcher.noted  # it did batch (nothing fell back)


def test_heterogeneous_groups_batch_group_by_group(steps):
    # the default groups: mlp and lenet5 local models beside an mlp meme, 12 clients, a third a round
    overrides = ["clients.num_clients=12", "clients.fraction=0.35"]
    seq, vm = run(overrides, "sequential"), run(overrides, "vmap")
    assert_close(seq, vm, atol=5e-6)


def test_a_client_with_fewer_steps_keeps_its_parameters_and_momentum_while_the_others_step(steps):
    # clients of 40 and 8 rows: 3 batches and 1; the short one must end as if trained alone
    cfg = load_config(None, [MLP, "clients.num_clients=2", "data.max_train_samples=300", "training.epochs=1",
                             "training.batch_size=16", "algorithm.name=local", "training.batching=vmap"])
    prepared = prepare(cfg)
    part = dataclasses.replace(prepared.partition, train=[prepared.partition.train[0][:40],
                                                          prepared.partition.train[1][:8]])
    hosts = {b: ClientHost(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batching=b)),
                           prepared.dataset, part, [0, 1]) for b in ("sequential", "vmap")}
    for host in hosts.values():
        host.train(1, [0, 1], None)
    rows = {b: [h.stores[next(iter(h.stores))].get(c).view(np.float32) for c in (0, 1)] for b, h in hosts.items()}
    for c in (0, 1):
        np.testing.assert_allclose(rows["vmap"][c], rows["sequential"][c], rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_on_stacks_is_torch_sgd_with_momentum_and_weight_decay(momentum):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, weight_decay=0.01)
    stacked, buf = [w.clone()[None]], [torch.zeros(1, 3, 4)] if momentum else None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sgd(stacked, [g[None]], buf, 0.1, momentum, 0.01)
    torch.testing.assert_close(stacked[0][0], p.detach(), rtol=0, atol=1e-6)  # a fused multiply-add may round once less
    if momentum:
        torch.testing.assert_close(buf[0][0], opt.state[p]["momentum_buffer"], rtol=0, atol=1e-6)


def test_masked_sgd_steps_the_live_clients_as_sgd_does_and_leaves_the_others_as_they_were():
    gen = torch.Generator().manual_seed(1)
    p0, b0 = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    g = torch.randn(3, 4, 5, generator=gen)
    g[2] = float("nan")  # a finished client's gradient may be anything: it must not leak into its state
    live = torch.tensor([True, False, False])
    p, b = [p0.clone()], [b0.clone()]
    masked_sgd(p, [g], b, live, 0.1, 0.9, 0.01)
    want_p, want_b = [p0[:1].clone()], [b0[:1].clone()]
    sgd(want_p, [g[:1]], want_b, 0.1, 0.9, 0.01)
    torch.testing.assert_close(p[0][:1], want_p[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b[0][:1], want_b[0], rtol=0, atol=1e-6)
    assert torch.equal(p[0][1:], p0[1:]) and torch.equal(b[0][1:], b0[1:])
    p = [p0.clone()]
    masked_sgd(p, [g], None, live, 0.1, 0.0, 0.0)  # no momentum
    torch.testing.assert_close(p[0][0], p0[0] - 0.1 * g[0])
    assert torch.equal(p[0][1:], p0[1:])


def reason(host):
    return host.batcher._why(host._archs(host.clients[0]))


def test_fallbacks_say_why_once_and_train_sequentially():
    overrides = ["clients.groups=[{name='r', share=1.0, local_model='resnet8'}]", "model.meme=resnet8",
                 "algorithm.name=fedavg", "clients.num_clients=4", "clients.fraction=1.0", "run.rounds=2",
                 "training.epochs=1", "data.max_train_samples=120"]
    cfg = load_config(None, [*SMALL, *overrides, "training.batching=vmap"])
    prepared = prepare(cfg)
    host = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3])
    g = initial_global_state(cfg, prepared.dataset)
    with pytest.warns(UserWarning, match="BatchNorm") as caught:
        host.train(1, [0, 1, 2, 3], g)
        host.train(2, [0, 1, 2, 3], g)
    assert len([w for w in caught if "BatchNorm" in str(w.message)]) == 1
    for algorithm, why in [("apfl", "own forward"), ("fedrep", "freezes")]:
        cfg = load_config(None, [*SMALL, MLP, f"algorithm.name={algorithm}", "training.batching=vmap"])
        assert why in reason(ClientHost(cfg, prepared.dataset, prepared.partition, [0]))
    cfg = load_config(None, [*SMALL, MLP, "training.optimizer=adam", "training.batching=vmap"])
    assert "SGD" in reason(ClientHost(cfg, prepared.dataset, prepared.partition, [0]))


def test_a_loss_that_is_not_a_batch_mean_is_found_out():
    from fmlray.algorithms import fedavg
    algo = fedavg.make()
    assert loss_is_sample_mean(algo, 10)
    summed = dataclasses.replace(algo, loss=lambda z, y, rnd: {"meme": torch.nn.functional.cross_entropy(
        z["meme"], y, reduction="sum")})
    assert not loss_is_sample_mean(summed, 10)


def test_auto_batches_linear_models_on_the_cpu_and_not_large_convolutions_and_every_model_on_a_gpu():
    cpu = torch.device("cpu")
    mlp, cnn5 = build_model("mlp", (1, 28, 28), 10), build_model("cnn5", (1, 28, 28), 10)
    assert auto_batches([mlp, mlp], (1, 28, 28), cpu, 20)
    assert not auto_batches([mlp], (1, 28, 28), cpu, batched.AUTO_MIN_CLIENTS - 1)  # too few to pay
    assert not auto_batches([cnn5, mlp], (1, 28, 28), cpu, 20)
    assert auto_batches([build_model("lenet5", (1, 8, 8), 10)], (1, 8, 8), cpu, 20)  # digits' 8x8 images
    assert not auto_batches([mlp], (1, 28, 28), torch.device("meta"), 20)  # unmeasured devices stay sequential
    gpu = torch.device("cuda")  # measured on an H100: batching wins there for convolutions too
    assert auto_batches([cnn5, mlp], (1, 28, 28), gpu, 20)
    assert not auto_batches([cnn5], (1, 28, 28), gpu, batched.AUTO_MIN_CLIENTS - 1)
    cfg = load_config(None, [*SMALL, "clients.num_clients=20", "clients.fraction=1.0"])  # mlp + lenet5 groups
    prepared = prepare(cfg)
    host = ClientHost(cfg, prepared.dataset, prepared.partition, list(range(20)))
    units = host.batcher.units(list(range(20)), True)
    assert units[0] == (list(range(10)), True)  # the mlp group, one unit; lenet5 on 8x8 digits batches too
    assert [u for u, _ in units] == [list(range(10)), list(range(10, 20))]


def test_the_cap_splits_a_group_into_units_and_a_lone_client_trains_alone():
    cfg = load_config(None, [*SMALL, MLP, "clients.num_clients=7", "training.batching=vmap",
                             "training.max_batched_clients=3"])
    prepared = prepare(cfg)
    host = ClientHost(cfg, prepared.dataset, prepared.partition, list(range(7)))
    assert host.batcher.units(list(range(7)), True) == [([0, 1, 2], True), ([3, 4, 5], True), ([6], False)]


def test_a_resumed_batched_run_equals_the_uninterrupted_one_and_the_sequential_one(tmp_path, capsys):
    base = ["run", "--set", "engine.kind=serial", "--set", "training.epochs=1", "--set", f"run.output_dir={tmp_path}",
            "--set", "clients.fraction=0.5", "--set", "training.batching='vmap'"]
    assert main([*base, "--set", "run.rounds=3", "--set", "run.name=whole"]) == 0
    assert main([*base, "--set", "run.rounds=1", "--set", "run.name=split"]) == 0
    assert main(["run", "--resume", str(tmp_path / "split"), "--set", "run.rounds=3"]) == 0
    assert main([*base[:-2], "--set", "training.batching='sequential'", "--set", "run.rounds=3",
                 "--set", "run.name=seq"]) == 0
    capsys.readouterr()
    whole, split, seq = (checkpoint.load(tmp_path / n) for n in ("whole", "split", "seq"))
    for k in whole.global_state:
        np.testing.assert_array_equal(whole.global_state[k], split.global_state[k])
        np.testing.assert_allclose(whole.global_state[k], seq.global_state[k], rtol=0, atol=5e-6)


@pytest.mark.parametrize("broken", ["every row", "one row"])
def test_a_client_whose_loss_goes_non_finite_is_left_out_with_the_sequential_message(broken, steps):
    cfg = load_config(None, [*SMALL, MLP, "clients.num_clients=4", "clients.fraction=1.0", "algorithm.name=fml"])
    prepared = prepare(cfg)
    x = prepared.dataset.x_train.copy()
    rows = prepared.partition.train[2]
    x[rows if broken == "every row" else rows[len(rows) // 2]] = np.inf  # client 2's data is broken (from a step on)
    ds = dataclasses.replace(prepared.dataset, x_train=x)
    out = {}
    for b in ("sequential", "vmap"):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batching=b))
        host = ClientHost(c, ds, prepared.partition, [0, 1, 2, 3])
        partial, rows = host.train(1, [0, 1, 2, 3], initial_global_state(c, ds))
        out[b] = (partial, rows, {cid: host.stores[next(iter(host.stores))].get(cid) for cid in range(4)})
    for b in out:
        partial, rows, stored = out[b]
        assert partial.count == 3 and stored[2] is None, b
        assert "client 2 (group all), round 1, training: loss is not finite" in rows[2]["excluded"], b
    assert out["vmap"][1][2]["excluded"] == out["sequential"][1][2]["excluded"]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_client_whose_shared_model_goes_non_finite_is_left_out_of_its_private_state_too(store, tmp_path, steps):
    # one step a client; client 2's inputs are huge: its losses stay finite, but its step throws the meme (and its
    # local model) past ~1e19, so its update is left out, and its row must stay as it was (README, Reliability)
    cfg = load_config(None, [*SMALL, MLP, "clients.num_clients=4", "clients.fraction=1.0", "algorithm.name=fml",
                             "training.epochs=1", "training.batch_size=100000", "training.lr=10.0"])
    prepared = prepare(cfg)
    x = prepared.dataset.x_train.copy()
    x[prepared.partition.train[2]] *= 1e30
    ds = dataclasses.replace(prepared.dataset, x_train=x)
    out = {}
    for b in ("sequential", "vmap"):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batching=b))
        host = ClientHost(c, ds, prepared.partition, [0, 1, 2, 3], store=store, state_dir=tmp_path / b)
        partial, rows = host.train(1, [0, 1, 2, 3], initial_global_state(c, ds))
        host._release_all()
        kept = host.stores[next(iter(host.stores))]
        out[b] = (partial, rows, {cid: cid in kept for cid in range(4)})
        host.close()
    for b, (partial, rows, has_row) in out.items():
        assert "loss" not in rows[2]["excluded"] and "parameters are not finite" in rows[2]["excluded"], b
        assert partial.count == 3 and has_row == {0: True, 1: True, 2: False, 3: True}, b
    assert out["vmap"][1][2]["excluded"] == out["sequential"][1][2]["excluded"]


def test_resident_rows_and_bf16_autocast_on_the_cpu(steps):
    # the GPU path's pieces, on the CPU: every hosted client's rows gathered once (views after), and bf16
    cfg = load_config(None, [*SMALL, MLP, "clients.num_clients=4", "clients.fraction=1.0", "algorithm.name=fml",
                             "training.batching=vmap"])
    prepared = prepare(cfg)
    g = initial_global_state(cfg, prepared.dataset)
    plain = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3])
    resident = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3], resident=True)
    x, y = resident._rows(resident.clients[1])
    assert x._base is resident.train_rows.source()[0]  # a view of the one copy
    torch.testing.assert_close(x, plain._rows(plain.clients[1])[0])
    for a, b in zip(plain.train(1, [0, 1, 2, 3], g)[0].sums.values(), resident.train(1, [0, 1, 2, 3], g)[0].sums.values()):
        np.testing.assert_array_equal(a, b)
    bf16 = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="bf16", epochs=1))
    for b in ("sequential", "vmap"):
        c = dataclasses.replace(bf16, training=dataclasses.replace(bf16.training, batching=b))
        partial, rows = ClientHost(c, prepared.dataset, prepared.partition, [0, 1, 2, 3]).train(1, [0, 1, 2, 3], g)
        assert partial.count == 4 and all(0 < r["meme_loss"] < 5 for r in rows)


# 30 steps of one process freeing a 40 MiB block and asking for another (glibc maps blocks over 32 MiB afresh each
# time, whatever its own adjustment); prints the pages faulted in over the last 20
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from fmlray.engine.device import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        sys.exit("keep_freed_memory did not take")
    def step():
        block = torch.ones(40 * 2**20 // 4)
        del block
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_process_that_keeps_freed_memory_reuses_a_large_block_instead_of_faulting_it_in_again():
    faults = {}
    for way in ("plain", "keep"):
        done = subprocess.run([sys.executable, "-c", FAULTS, way], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[way] = int(done.stdout.split()[-1])
    per_step = 40 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert faults["plain"] >= 18 * per_step  # every block faulted in anew
    assert faults["keep"] <= 4 * per_step, faults  # reused (a few steps may still grow the heap past fragments)


def test_a_host_keeps_freed_memory_once_it_trains_clients_batched_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(batched, "keep_freed_memory", lambda: calls.append(1))
    run([MLP], "sequential")
    assert not calls
    run([MLP], "vmap")
    assert calls


def test_cuda_determinism_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # and restored after
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        cuda_determinism()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_clients_with_a_task_train_one_after_another_and_the_others_still_batch():
    groups = ("clients.groups=[{name='fine', share=0.5, local_model='mlp'}, "
              "{name='odd', share=0.5, local_model='mlp', task='parity'}]")
    overrides = [groups, "clients.num_clients=8", "clients.fraction=1.0"]
    seq, vm = run(overrides, "sequential"), run(overrides, "vmap")
    assert_close(seq, vm)
    host = vm[2]
    units = host.batcher.units(sorted(host.clients), True)
    tasked = {cid for cid, c in host.clients.items() if c.task is not None}
    assert tasked and all(not batched for cids, batched in units if set(cids) & tasked)
    assert any(batched for _, batched in units)


def test_a_batched_run_on_the_disk_store_equals_one_in_memory(tmp_path):
    # the disk store hands out one buffer per read: the batched path must copy each row before the next read
    overrides = [MLP, "run.rounds=3", "clients.fraction=1.0", "training.momentum=0.9"]
    results = []
    for store in ("memory", "disk"):
        cfg = load_config(None, [*SMALL, *overrides, "training.batching='vmap'", f"engine.state_store={store!r}",
                                 f"engine.state_dir={str(tmp_path)!r}"])
        prepared = prepare(cfg)
        engine = SerialEngine()
        engine.start(cfg, prepared.dataset, prepared.partition)
        try:
            results.append(simulate(cfg, prepared.dataset, prepared.partition, engine).global_state)
        finally:
            engine.close()
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)
