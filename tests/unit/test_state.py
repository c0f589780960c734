"""The client state store: rows in memory or on disk, workspaces, the `auto` choice, streaming evaluation."""

import os

import numpy as np
import pytest
import torch

from fmlray.config import load_config
from fmlray.engine.host import ClientHost, initial_global_state
from fmlray.engine.resources import GiB, check_memory, plan_store
from fmlray.engine.serial import SerialEngine
from fmlray.engine.state import DiskStore, Layout, MemoryStore, Workspace
from fmlray.errors import ResourceError
from fmlray.models import build_model
from fmlray.simulation import eval_clients, prepare, simulate


def trained_workspace(arch, optimizer):
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 10)
    opt = (torch.optim.Adam(model.parameters(), lr=0.1) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    model.train()
    return Workspace(Layout(arch, model, optimizer, 0.9), model, opt, torch.device("cpu"))


@pytest.mark.parametrize("store_cls", [MemoryStore, DiskStore])
@pytest.mark.parametrize("arch, optimizer", [("lenet5", "sgd"), ("resnet8", "sgd"), ("mlp", "adam")])
def test_a_row_holds_the_model_and_the_optimiser_exactly(tmp_path, store_cls, arch, optimizer):
    # resnet8: BatchNorm's integer counters ride in the same row as the float tensors
    src = trained_workspace(arch, optimizer)
    store = store_cls(src.layout, tmp_path)
    src.store(store.put(7))
    store.done(7)
    dst = Workspace(src.layout, build_model(arch, (1, 8, 8), 10), None, torch.device("cpu"))
    dst.opts["local"] = (torch.optim.Adam(dst.model.parameters(), lr=0.1) if optimizer == "adam"
               else torch.optim.SGD(dst.model.parameters(), lr=0.1, momentum=0.9))
    dst.load(store.get(7), 0, 7)
    for (k, a), b in zip(src.model.state_dict().items(), dst.model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    for p, q in zip(src.params, dst.params):
        for name, t in src.opt.state[p].items():
            assert torch.equal(t, dst.opt.state[q][name]), name
    # a step from the restored state equals a step from the original
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for ws in (src, dst):
        ws.opt.zero_grad()
        torch.nn.functional.cross_entropy(ws.model(x), y).backward()
        ws.opt.step()
    for a, b in zip(src.model.state_dict().values(), dst.model.state_dict().values()):
        assert torch.equal(a, b)
    store.close()


@pytest.mark.parametrize("arch", ["mlp", "lenet5", "cnn", "cnn5", "resnet8", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_initialising_in_place_equals_building_from_the_seed(arch, shape):
    from fmlray.engine.host import seeded_model
    from fmlray.engine.state import initialise
    from fmlray.data import Dataset
    data = Dataset("toy", np.zeros((2, *shape), np.float32), np.zeros(2, np.int64), np.zeros((2, *shape), np.float32),
                   np.zeros(2, np.int64), 10)
    model = build_model(arch, shape, 10)
    with torch.no_grad():  # a used workspace: trained weights and BatchNorm statistics to be reset
        for t in model.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.fill_(7)
    for seed in (3, 12345):
        initialise(model, seed)
        fresh = seeded_model(arch, data, seed)
        for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), (arch, k)


def test_the_disk_store_keeps_rows_on_disk_and_deletes_its_file(tmp_path):
    layout = trained_workspace("lenet5", "sgd").layout
    store = DiskStore(layout, tmp_path)
    for cid in range(40):
        store.put(cid)[:] = cid
        store.done(cid)
    store.put(7)[:] = 99  # a row written again stays in its place
    store.done(7)
    assert len(store) == 40 and store.get(40) is None
    assert all((store.get(cid) == (99 if cid == 7 else cid)).all() for cid in range(40))
    assert store.path.stat().st_size == 40 * store.stride and store.stride % 4096 == 0
    store.close()
    assert not store.path.exists()


def test_rows_read_ahead_are_never_stale(tmp_path):
    # random puts, gets and read-aheads against a plain dict: a read-ahead row overwritten before its `get`,
    # one asked for while its write is under way, one never used, one of a client with no row yet
    layout = trained_workspace("lenet5", "sgd").layout
    store, want = DiskStore(layout, tmp_path), {}
    for cid, value in ((1, 10), (2, 20)):
        store.put(cid)[:] = value
        store.done(cid)
    store.prefetch(1)
    store.put(1)[:] = 11  # overwritten after its read-ahead was asked for
    store.done(1)
    assert (store.get(1) == 11).all()
    store.done(1)
    store.put(2)[:] = 21
    store.done(2)
    store.prefetch(2)  # asked for while its write may be under way
    assert (store.get(2) == 21).all()
    store.done(2)
    store.prefetch(1)
    assert (store.get(2) == 21).all()  # not the row read ahead
    store.done(2)
    want = {1: 11, 2: 21}
    rng = np.random.default_rng(0)
    for step in range(2000):
        op, cid = rng.integers(0, 3), int(rng.integers(0, 4))
        if op == 0:
            store.put(cid)[:] = step % 251
            want[cid] = step % 251
            store.done(cid)
        elif op == 1:
            row = store.get(cid)
            assert (row is None) if cid not in want else (row == want[cid]).all(), (step, cid)
            store.done(cid)
        else:
            store.prefetch(cid)
    store.prefetch(3)
    store.close()  # with a read ahead still in flight
    assert not store.path.exists()


def test_checkpoint_row_files_are_npy_tables_of_page_padded_rows(tmp_path):
    import os
    from fmlray.engine.state import PAGE, crc, open_rows, write_rows
    layout = trained_workspace("lenet5", "sgd").layout
    for store in (MemoryStore(layout), DiskStore(layout, tmp_path / "rows")):
        rows = {}
        for cid in (3, 1, 8):
            row = store.put(cid)
            row[:] = np.random.default_rng(cid).integers(0, 256, layout.nbytes, dtype=np.uint8)
            rows[cid] = row.copy()
            store.done(cid)
        path = tmp_path / f"{store.kind}.npy"
        crcs = write_rows(path, store, [1, 3])
        table = np.load(path, allow_pickle=False)  # numpy's own reader takes the page-long header
        assert table.shape == (2, layout.padded) and layout.padded % PAGE == 0
        assert (table[0, :layout.nbytes] == rows[1]).all() and (table[1, :layout.nbytes] == rows[3]).all()
        assert not table[:, layout.nbytes:].any() and crcs == [crc(rows[1]), crc(rows[3])]
        assert (open_rows(path) == table).all() and not list(tmp_path.glob(".*.tmp"))
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a run's file as any other, not 0600 scratch
        store.close()


def test_a_scratch_folder_another_run_removes_while_it_is_listed_does_not_fail_a_runs_start(tmp_path, monkeypatch):
    # two runs on one machine: one's end removed /tmp/fmlray-state-<token> while the other's start listed /tmp
    from pathlib import Path

    from fmlray.engine.state import tidy_rows

    def gone(self, pattern):
        yield from ()
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "fmlray-state-x"))
    monkeypatch.setattr(Path, "glob", gone)
    tidy_rows(tmp_path, "fmlray-state-")  # best effort: no error


def test_scratch_rows_a_killed_run_left_are_tidied_and_a_live_stores_are_not(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fmlray.engine.state import tidy_rows
    layout = trained_workspace("lenet5", "sgd").layout
    live = DiskStore(layout, tmp_path / "fmlray-state-0000aaaa" / "actor-0")
    live.put(0)[:] = 1
    live.done(0)
    # a store in another process, killed with SIGKILL: its file stays, its lock goes with the process
    code = ("import sys; from fmlray.engine.state import DiskStore, Layout; from tests.unit.test_state import "
            "trained_workspace as t; s = DiskStore(t('lenet5', 'sgd').layout, sys.argv[1]); s.put(0); s.done(0); "
            "print('ready', flush=True); sys.stdin.read()")
    dead = tmp_path / "fmlray-state-0000dead" / "actor-1"
    proc = subprocess.Popen([sys.executable, "-c", code, str(dead)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline().strip() == "ready"
    tidy_rows(tmp_path, "fmlray-state-", min_age_s=0)
    [rows] = dead.glob("*.rows")
    assert rows.exists()  # its owner lives
    proc.kill()
    proc.wait()
    old = tmp_path / "fmlray-state-0000beef" / "actor-2" / "lenet5-0123456789.rows"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")  # unlocked but new: its owner may be about to lock it
    tidy_rows(tmp_path, "fmlray-state-", min_age_s=60)
    assert old.exists() and rows.exists()  # both too young to judge
    os.utime(rows, (0, 0))
    tidy_rows(tmp_path, "fmlray-state-", min_age_s=60)
    assert not (tmp_path / "fmlray-state-0000dead").exists()  # the rows, then the emptied folders
    assert live.path.exists() and (live.get(0) == 1).all() and old.exists()
    live.close()


def test_rows_a_killed_run_left_in_a_user_set_state_dir_are_tidied_by_the_next_run_there(tmp_path):
    # they were never removed: only the default scratch folder was tidied
    from fmlray.engine.state import state_folder
    dead = tmp_path / "fmlray-0123abcd" / "actor-1" / "lenet5-0123456789.rows"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"x")
    os.utime(dead, (0, 0))  # unlocked, and old: its run was killed
    mine = [tmp_path / "notes.rows", tmp_path / "fmlray-mine" / "a" / "b-0123456789.rows",
            tmp_path / "fmlray-0123abcd" / "actor-1" / "notes.rows", tmp_path / "data" / "a" / "b.rows"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a user's")
        os.utime(path, (0, 0))
    folder, scratch = state_folder(str(tmp_path), "89abcdef", "actor-0")
    assert folder == tmp_path / "fmlray-89abcdef" / "actor-0" and scratch is None
    assert not dead.exists() and all(p.read_text() == "a user's" for p in mine)


def run(overrides, engine=None):
    cfg = load_config(None, ["engine.kind=serial", "run.rounds=3", "training.epochs=1", *overrides])
    prepared = prepare(cfg)
    engine = engine or SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine), engine
    finally:
        engine.close()


# A disk store on the CPU lends its buffers and the workspace trains in them (no copies): every kind of
# private state must come out as the memory store's copies give it.
@pytest.mark.parametrize("setting", [[], ["training.optimizer='adam'"], ["algorithm.name=fedper"],
                                     ["algorithm.name=apfl"], ["algorithm.name=dml"], ["algorithm.name=ditto"],
                                     ["model.meme='resnet8'", "clients.groups=[{name='r', share=1.0, local_model='resnet8'}]",
                                      "algorithm.name=fedbn", "run.rounds=2"]],
                         ids=["fml", "adam", "fedper", "apfl", "dml", "ditto", "fedbn-batchnorm"])
def test_memory_and_disk_stores_give_the_same_run_bit_for_bit(setting):
    sampled = ["clients.fraction=0.3", *setting]
    a, _ = run([*sampled, "engine.state_store=memory"])
    b, engine = run([*sampled, "engine.state_store=disk"])
    assert engine.plan.kind == "disk"
    assert (a.global_state is None) == (b.global_state is None)  # DML shares no model
    for k in a.global_state or {}:
        np.testing.assert_array_equal(a.global_state[k], b.global_state[k])
    key = lambda r: (r["round"], r["client"], r["model"], r["split"], r["loss"], r["accuracy"])  # noqa: E731
    assert [key(r) for r in a.rows] == [key(r) for r in b.rows]


def test_a_client_that_fails_in_a_lent_buffer_keeps_its_row_as_it_was(monkeypatch, tmp_path):
    import fmlray.engine.host as host_module
    from fmlray.errors import TrainingError
    cfg = load_config(None, ["clients.num_clients=4", "training.epochs=1"])
    prepared = prepare(cfg)
    host = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3], store="disk", state_dir=tmp_path)
    g = initial_global_state(cfg, prepared.dataset)
    host.train(1, [0, 1], g)
    key = host._archs(host.clients[0])
    assert key in host._lendable  # the zero-copy path is the one under test
    store = host.stores[key]
    before = store.get(0).copy()
    store.done(0)
    evaluated = host.evaluate(g, [0])
    real = host_module.train_client

    def ruin_then_fail(algo, models, *args, **kwargs):
        real(algo, models, *args, **kwargs)  # the bound row has changed in place by now
        raise TrainingError("loss is not finite")

    monkeypatch.setattr(host_module, "train_client", ruin_then_fail)
    _, results = host.train(2, [0, 1], g)
    assert all("loss is not finite" in r["excluded"] for r in results)
    assert host._lent == {}
    np.testing.assert_array_equal(store.get(0), before)
    store.done(0)
    scores = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]  # noqa: E731
    assert scores(host.evaluate(g, [0])) == scores(evaluated)
    host.close()


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_client_handed_to_another_host_goes_on_as_if_it_never_moved(tmp_path, store):
    # the Ray engine moves a client with private state to a less busy actor (RayEngine._migrate): its row goes
    # with it, and it trains and evaluates exactly as it would have where it was; moved back, the old host's
    # workspace (which held it before) is not trusted
    cfg = load_config(None, ["clients.num_clients=4", "training.epochs=1"])
    prepared = prepare(cfg)

    def host(ids, name):
        return ClientHost(cfg, prepared.dataset, prepared.partition, ids, store=store,
                          state_dir=tmp_path / name if store == "disk" else None)

    one, a, b = host([0, 1, 2, 3], "one"), host([0, 1], "a"), host([2, 3], "b")
    g = initial_global_state(cfg, prepared.dataset)
    one.train(1, [0, 1, 2, 3], g)
    a.train(1, [0, 1], g)
    b.train(1, [2, 3], g)
    b.take([1], a.give([1]))
    assert a.stored() == 1 and b.stored() == 3 and 1 in b.dirty and 1 not in a.dirty
    one.train(2, [0, 1, 2, 3], g)
    a.train(2, [0], g)
    b.train(2, [1, 2, 3], g)
    a.take([1], b.give([1]))  # back where it trained in round 1
    scores = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]  # noqa: E731
    assert scores(a.evaluate(g, [0, 1]) + b.evaluate(g, [2, 3])) == scores(one.evaluate(g))
    a.take([3], b.give([3]))
    a.train(3, [1, 3], g)
    one.train(3, [1, 3], g)
    assert scores(a.evaluate(g, [1, 3])) == scores(one.evaluate(g, [1, 3]))
    for h in (one, a, b):
        h.close()


def test_a_disk_store_reuses_the_slot_of_a_row_that_moved_away(tmp_path):
    layout = trained_workspace("mlp", "sgd").layout
    store = DiskStore(layout, tmp_path)
    for cid in (5, 6, 7):
        store.put(cid)[:] = cid
        store.done(cid)
    store.drop(6)
    assert 6 not in store and len(store) == 2
    store.put(9)[:] = 9
    store.done(9)
    assert store.slot[9] == 1 and store.path.stat().st_size == 3 * layout.padded  # the file did not grow
    for cid in (5, 7, 9):
        assert (store.get(cid) == cid).all()
        store.done(cid)
    store.close()


def test_only_clients_that_trained_have_a_row_and_the_scratch_folder_goes():
    cfg = load_config(None, ["engine.kind=serial", "clients.fraction=0.25", "training.epochs=1",
                             "engine.state_store=disk"])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    g = initial_global_state(cfg, prepared.dataset)
    engine.train_round(1, [0, 3, 12], g)
    engine.evaluate(g)  # evaluating every client makes no rows: untrained ones come from (seed, client)
    assert engine.host.stored() == 3 and sorted(engine.host.dirty) == [0, 3, 12]
    folder = engine.host.state_dir
    assert folder.is_dir() and engine.scratch in folder.parents
    engine.close()
    assert not engine.scratch.exists()


def test_a_user_state_dir_is_kept_and_left_as_it_was(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    run(["engine.state_store=disk", f"engine.state_dir={str(tmp_path)!r}", "run.rounds=1"])
    # the stores' files and the folders they made go at the end (the checkpoint holds the rows); the folder stays
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_evaluating_an_untrained_client_equals_its_initial_model():
    cfg = load_config(None, ["clients.num_clients=4", "training.epochs=1"])
    prepared = prepare(cfg)
    a = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3])
    b = ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3])
    g = initial_global_state(cfg, prepared.dataset)
    b.train(1, [1], g)  # client 1 trains on b only; the others must evaluate alike on both hosts
    ra, rb = a.evaluate(g), b.evaluate(g)
    assert [r["local_loss"] for r in ra if r["client"] != 1] == [r["local_loss"] for r in rb if r["client"] != 1]
    assert ra[1]["local_loss"] != rb[1]["local_loss"]


@pytest.mark.parametrize("how", ["sampled", 5])
def test_eval_clients_picks_the_trained_and_a_seeded_sample(how):
    cfg = load_config(None, ["clients.fraction=0.2", "run.rounds=2", f"run.eval_clients={how!r}"
                             if isinstance(how, str) else f"run.eval_clients={how}"])
    trained = [1, 4, 9, 10]
    picked = eval_clients(cfg, 2, trained)
    assert set(trained) <= set(picked) and picked == sorted(picked)
    assert len(picked) == (4 if how == "sampled" else 9)
    assert picked == eval_clients(cfg, 2, trained)  # seeded
    if how == 5:
        assert picked != eval_clients(cfg, 3, trained)
    assert eval_clients(load_config(None), 2, trained) is None  # "all"


def test_a_run_evaluates_only_the_chosen_clients():
    result, _ = run(["clients.fraction=0.2", "run.eval_clients=3"])
    for rnd in (1, 2, 3):
        trained = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"}
        tested = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "test"}
        assert len(trained) == 4 and trained <= tested and len(tested) == 7


def test_auto_keeps_small_runs_in_memory_and_large_ones_on_disk():
    cfg = load_config(None, ["clients.num_clients=100", "data.partition=iid"])
    prepared = prepare(cfg)
    small = plan_store(cfg, prepared.dataset, node_memory=24 * GiB)
    assert small.kind == "memory" and "kept in memory (engine.state_store = auto)" in small.line
    model = build_model("mlp", prepared.dataset.input_shape, prepared.dataset.num_classes)
    exact = sum(v.nbytes for v in model.state_dict().values()) + sum(p.nbytes for p in model.parameters())
    tensors = len(model.state_dict()) + len(list(model.parameters()))
    assert exact <= small.row_bytes["mlp"] < exact + 64 * tensors  # the model and its momentum buffers, aligned
    big = plan_store(cfg, prepared.dataset, node_memory=small.estimate * 3)  # a quarter of it is too little
    assert big.kind == "disk" and "on disk" in big.line
    fixed = plan_store(load_config(None, ["clients.num_clients=100", "data.partition=iid", "engine.state_store=memory"]), prepared.dataset,
                       node_memory=1)
    assert fixed.kind == "memory"
    assert plan_store(load_config(None, ["algorithm.name=fedavg"]), prepared.dataset, 1).estimate == 0


def test_a_run_that_cannot_fit_a_node_is_refused_with_the_setting_to_change():
    cfg = load_config(None, ["clients.num_clients=100", "data.partition=iid", "engine.state_store=memory"])
    prepared = prepare(cfg)
    plan = plan_store(cfg, prepared.dataset, node_memory=1)
    with pytest.raises(ResourceError, match=r"engine.state_store = \"disk\""):
        check_memory(cfg, plan, prepared.dataset.nbytes, 0, plan.estimate * 0.9)
    with pytest.raises(ResourceError, match="lower engine.num_actors"):
        check_memory(cfg, plan_store(cfg.replace(engine=cfg.engine.__class__(state_store="disk")), prepared.dataset, 1),
                     prepared.dataset.nbytes, 64, 8 * GiB)


def test_a_disk_store_that_cannot_write_says_where_and_what_to_change(tmp_path, monkeypatch):
    import errno
    import os

    from fmlray.errors import ResourceError
    store = DiskStore(trained_workspace("lenet5", "sgd").layout, tmp_path)
    store.put(0)[:] = 1

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", full)
    store.done(0)  # the write goes on in a thread: its error comes with the next use of the row, or at close
    message = f"cannot write client state to {store.path}.*No space left.*engine.state_dir"
    with pytest.raises(ResourceError, match=message):
        store.get(0)
    store.put(1)
    store.done(1)
    with pytest.raises(ResourceError, match=message):
        store.close()
    assert not store.path.exists()


def test_a_write_direct_io_refuses_goes_on_buffered(tmp_path, monkeypatch):
    import errno
    import fcntl
    import os

    from fmlray.engine.state import _open_direct, _pwrite
    fd = _open_direct(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)  # tmpfs may refuse it: then buffered from the start
    real, calls = os.pwrite, []

    def refuse_direct(fd, buf, offset):
        calls.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        if calls[-1]:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bytes(buf[:3]), offset)  # a short write, as a file-size limit gives
    monkeypatch.setattr(os, "pwrite", refuse_direct)
    _pwrite(fd, b"abcdefgh", 0)
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abcdefgh" and calls == [direct] * direct + [False] * 3


@pytest.mark.parametrize("failing", [8, 5])
def test_a_failed_store_write_is_never_checkpointed_as_the_clients_row(tmp_path, capsys, monkeypatch, failing):
    # 8: round 2's last client's store write, still in flight when the checkpoint read its row back: the checkpoint
    # kept its round-1 row with a good checksum and a resume went on from it (audit 50); 5: round 2's first
    import errno
    import json

    from fmlray import cli
    from fmlray.engine import state
    real, writes = state._pwrite, []

    def pwrite(fd, buf, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".rows"):
            writes.append(offset)
            if len(writes) == failing:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, offset)
    monkeypatch.setattr(state, "_pwrite", pwrite)
    run = tmp_path / "r"
    assert cli.main(["run", "--set", "engine.kind=serial", "--set", "engine.state_store='disk'", "--set", "run.rounds=2",
                     "--set", "training.epochs=1", "--set", "clients.num_clients=4", "--set", f"run.output_dir={tmp_path}",
                     "--set", "run.name=r", "--set", "clients.groups=[{name='a', share=1.0}]"]) == 2
    assert "cannot write client state to" in capsys.readouterr().err
    assert json.loads((run / "checkpoint" / "manifest.json").read_text())["round"] == 1  # round 2 never checkpointed
    assert not list(run.rglob("*.tmp"))
    assert not [path for path in open_files() if ".tmp" in path]


def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, closed since
            pass
    return out


def test_a_store_error_while_a_checkpoint_file_is_written_leaves_no_file_open_or_behind(tmp_path, monkeypatch):
    # only an OSError was cleaned up: the store's ResourceError left the .tmp file, open for the process's life
    from fmlray.engine.state import write_rows
    store = DiskStore(trained_workspace("lenet5", "sgd").layout, tmp_path / "rows")
    for cid in range(3):
        store.put(cid)[:] = cid
        store.done(cid)

    def cut_short(cid):
        raise ResourceError("the row file was cut short")
    monkeypatch.setattr(store, "get", cut_short)
    with pytest.raises(ResourceError, match="cut short"):
        write_rows(tmp_path / "rows-r000001-x.npy", store, [0, 1, 2])
    assert [p.name for p in tmp_path.iterdir()] == ["rows"]
    assert not [path for path in open_files() if ".tmp" in path]
    store.close()
