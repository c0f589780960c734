"""The Ray engine against the serial reference, on a real local Ray: parity, placement, scale, resources."""

import os
import signal
import textwrap
import time

import numpy as np
import pytest

from fmlray.cli import main
from fmlray.config import load_config
from fmlray.engine.ray_engine import RayEngine
from fmlray.engine.serial import SerialEngine
from fmlray.errors import ResourceError
from fmlray.simulation import Result, prepare, simulate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("reused_actors")]

ONE_GROUP = "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=0.5}]"
QUICK = ["run.rounds=3", "training.epochs=1"]


def simulate_with(engine, overrides):
    cfg = load_config(None, overrides)
    prepared = prepare(cfg)
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine), engine
    finally:
        engine.close()


def assert_same(a, b):
    for k in a.global_state:
        np.testing.assert_allclose(a.global_state[k], b.global_state[k], rtol=0, atol=1e-6, err_msg=k)
    key = lambda r: (r["round"], r["client"], r["model"], r["split"])  # noqa: E731
    ra, rb = sorted(a.rows, key=key), sorted(b.rows, key=key)
    assert [key(r) for r in ra] == [key(r) for r in rb]
    acc_a = np.array([r["accuracy"] for r in ra])
    acc_b = np.array([r["accuracy"] for r in rb])
    np.testing.assert_allclose(acc_a, acc_b, atol=1e-6)


@pytest.fixture(scope="module")
def serial_one_group():
    return simulate_with(SerialEngine(), [*QUICK, ONE_GROUP])[0]


@pytest.mark.parametrize("actors, store", [(1, "memory"), (2, "memory"), (3, "memory"), (2, "disk")])
def test_ray_matches_serial_whatever_the_number_of_actors_and_the_store(ray_session, serial_one_group, actors, store):
    result, engine = simulate_with(RayEngine(), [*QUICK, ONE_GROUP, "engine.kind=ray", f"engine.num_actors={actors}",
                                                 f"engine.state_store={store!r}"])
    assert len(engine.specs) == actors and engine.plan.kind == store
    assert_same(serial_one_group, result)


def test_runs_in_a_reusing_scope_take_the_actors_before_them_and_give_the_same_results(ray_session, fresh_actors,
                                                                                       serial_one_group):
    # a sequential sweep or `fmlray compare`: each run after the first takes the actors of the run before
    # (no torch import per actor and run), with results as from fresh actors; other shapes get new ones
    import ray

    from fmlray.engine import ray_engine

    two = [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2"]
    pids = lambda engine: sorted(i["pid"] for i in engine.infos)  # noqa: E731
    with ray_engine.reusing_actors():
        first, e1 = simulate_with(RayEngine(), two)
        aggregator = ray_engine._parked["aggregators"][0]._actor_id  # e1's, parked by its close
        second, e2 = simulate_with(RayEngine(), two)
        assert pids(e2) == pids(e1) and "(2 reused from the run before)" in e2.notes[0]
        assert_same(serial_one_group, first) and assert_same(serial_one_group, second)
        fml = [*QUICK, "engine.kind=ray", "engine.num_actors=2"]  # two groups (mlp, lenet5), one actor each
        third, e3 = simulate_with(RayEngine(), fml)
        assert {s.num_cpus for s in e3.specs} == {1.0} and not set(pids(e3)) & set(pids(e1))  # 1 CPU, not 0.5
        parked = [h for _, _, h in ray_engine._parked["clients"]] + ray_engine._parked["aggregators"]
        assert len(parked) == 3 and aggregator in {h._actor_id for h in parked}  # one aggregator for all three
    assert ray_engine._parked is None
    time.sleep(1)
    for handle in parked:  # the scope's end killed what it kept
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.__ray_ready__.remote(), timeout=30)
    assert_same(simulate_with(SerialEngine(), fml[:-2])[0], third)
    fresh, e4 = simulate_with(RayEngine(), two)  # outside a scope: new actors, ended with the engine
    assert not set(pids(e4)) & set(pids(e1)) and ray_engine._parked is None


def test_the_test_sessions_ray_runs_no_log_monitor(ray_session):
    # it started with log_to_driver=False, so nothing reads what the log monitor would forward; a run's private
    # Ray keeps its own (test_private_ray), which brings the actors' warnings into the run's output
    import psutil
    words = set()
    for p in psutil.Process().children(recursive=True):
        try:
            words |= {os.path.basename(part) for part in p.cmdline()[:3]}
        except psutil.Error:  # an actor an earlier test killed, gone or not yet reaped (a zombie has no cmdline)
            pass
    assert {"raylet", "gcs_server"} <= words and "log_monitor.py" not in words, words


def _imported(actor, module: str) -> bool:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: __import__("sys").modules.get(module) is not None))


def test_the_aggregator_process_never_imports_torch_nor_an_actor_dynamo_or_sympy(ray_session, fresh_actors):
    # torch costs ~450 MiB per process; the aggregator only averages numpy arrays (issue 4's memory target).
    # torch.optim would import Dynamo in every client actor (~2 s of CPU, ~150 MiB): fmlray.optim does not; nor
    # does the batched update import sympy (F.cross_entropy under vmap would: algorithms.base.cross_entropy).
    cfg = load_config(None, [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2", "training.batching='vmap'"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        simulate(cfg, prepared.dataset, prepared.partition, engine)  # aggregates and evaluates each round
        assert _imported(engine.actors[0], "torch") and not _imported(engine.actors[0], "torch._dynamo")
        assert not _imported(engine.actors[0], "sympy")
        assert not _imported(engine.aggregator, "torch")
    finally:
        engine.close()


def test_an_actor_whose_sigterm_lands_in_a_callback_still_ends(ray_session):
    # seen at the end of parallel sweeps: "Exception ignored in ... SystemExit: 1", and the worker went on
    from fmlray.engine.aggregator import Aggregator

    def _sigterm_inside_a_weakref_callback(actor_self) -> str:  # local: Ray pickles it by value
        """Run in an actor: drop an object whose finaliser receives a SIGTERM (it sleeps, so Ray's handler
        raises its SystemExit inside the finaliser, where Python can only print it)."""
        import os
        import signal
        import time
        import weakref

        class Held:
            pass

        held = Held()
        weakref.finalize(held, lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(0.5))
        del held
        return "outlived its SIGTERM"

    class Bare:  # a Ray actor without fmlray's hook: the premise
        pass

    alive = lambda actor_self: "alive"  # noqa: E731
    bare = ray_session.remote(num_cpus=0)(Bare).remote()
    ray_session.get(bare.__ray_call__.remote(_sigterm_inside_a_weakref_callback))
    time.sleep(1)
    assert ray_session.get(bare.__ray_call__.remote(alive)) == "alive"
    ray_session.kill(bare)
    # fmlray's actor: the SIGTERM is sent again once the callback is over, and ends the actor as Ray meant
    aggregator = ray_session.remote(num_cpus=0)(Aggregator).remote()
    with pytest.raises(ray_session.exceptions.RayActorError, match="receives a SIGTERM"):
        ray_session.get(aggregator.__ray_call__.remote(_sigterm_inside_a_weakref_callback), timeout=60)
        time.sleep(1)
        ray_session.get(aggregator.__ray_call__.remote(alive), timeout=60)


@pytest.mark.parametrize(("actors", "fraction", "beside_driver", "aggregations"),
                         [(1, 1.0, True, 0), (2, 1.0, True, 3), (2, 0.05, True, 0), (1, 1.0, False, 3)])
def test_the_aggregator_is_skipped_when_one_actor_beside_the_driver_holds_the_whole_round(
        ray_session, actors, fraction, beside_driver, aggregations):
    # 0.05 of 20 clients: one client a round, so one actor; it returns the average itself. An actor
    # on another node (here: pretended) must not: the new global state has to live on the driver's node.
    overrides = [*QUICK, ONE_GROUP, f"clients.fraction={fraction}"]
    serial = simulate_with(SerialEngine(), overrides)[0]
    cfg = load_config(None, [*overrides, "engine.kind=ray", f"engine.num_actors={actors}"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        if not beside_driver:
            engine.beside_driver = set()
        result = simulate(cfg, prepared.dataset, prepared.partition, engine)
        import ray
        assert len(ray.get(engine.aggregator.aggregate_seconds.remote())) == aggregations
    finally:
        engine.close()
    assert_same(serial, result)


@pytest.mark.parametrize("algorithm, extra", [
    ("ditto", []), ("fedper", []), ("fedrep", ["training.epochs=2"]), ("fedbn", ["model.meme=resnet8"]),
    ("apfl", []), ("lgfedavg", []), ("dml", [])])
def test_every_baseline_matches_serial_on_ray(ray_session, algorithm, extra):
    # half the clients a round, so private state (heads, BatchNorm layers, personal models, α) outlives rounds
    overrides = ["run.rounds=2", "training.epochs=1", "clients.num_clients=6", "clients.fraction=0.5",
                 "data.max_train_samples=400", ONE_GROUP, f"algorithm.name={algorithm}", *extra]
    serial = simulate_with(SerialEngine(), overrides)[0]
    result, engine = simulate_with(RayEngine(), [*overrides, "engine.kind=ray", "engine.num_actors=2"])
    assert len(engine.specs) == 2
    assert (serial.global_state is None) == (result.global_state is None) == (algorithm == "dml")
    if serial.global_state is not None:
        assert_same(serial, result)
    else:
        key = lambda r: (r["round"], r["client"], r["model"], r["split"])  # noqa: E731
        ra, rb = sorted(serial.rows, key=key), sorted(result.rows, key=key)
        assert [key(r) for r in ra] == [key(r) for r in rb]
        np.testing.assert_allclose([r["accuracy"] for r in ra], [r["accuracy"] for r in rb], atol=1e-6)


def test_heterogeneous_groups_and_partial_participation_match_serial(ray_session):
    overrides = [*QUICK, "clients.fraction=0.5"]
    serial = simulate_with(SerialEngine(), overrides)[0]
    result, engine = simulate_with(RayEngine(), [*overrides, "engine.kind=ray"])
    assert [s.group for s in engine.specs] == ["mlp", "lenet5"]
    assert_same(serial, result)


def test_stateless_clients_are_dealt_anew_each_round_and_match_serial(ray_session):
    # FedAvg keeps nothing on a client: each round's sampled clients are dealt to the actors, largest first,
    # wherever their home is; the sums still give the serial engine's models, and the same ones run after run
    overrides = ["run.rounds=3", "training.epochs=1", "clients.num_clients=8", "clients.fraction=0.5",
                 "data.max_train_samples=600", ONE_GROUP, "algorithm.name=fedavg"]
    dealt = []

    class Watched(RayEngine):
        def _deal(self, client_ids):
            plan = super()._deal(client_ids)
            dealt.append((sorted(client_ids), plan))
            return plan

    serial = simulate_with(SerialEngine(), overrides)[0]
    ray_overrides = [*overrides, "engine.kind=ray", "engine.num_actors=2"]
    result, engine = simulate_with(Watched(), ray_overrides)
    assert engine.stateless and len(dealt) == 3
    for ids, plan in dealt:
        assert sorted(plan) == [0, 1] and sorted(c for p in plan.values() for c in p) == ids
        loads = [sum(engine.cost[c] for c in p) for p in plan.values()]
        assert max(loads) - min(loads) <= max(engine.cost[c] for c in ids)  # largest first: within one client
    assert any(engine.owner[c] != i for _, plan in dealt for i, p in plan.items() for c in p)  # away from home
    assert_same(serial, result)
    again = simulate_with(RayEngine(), ray_overrides)[0]
    for k in result.global_state:
        np.testing.assert_array_equal(result.global_state[k], again.global_state[k], err_msg=k)


def test_clients_with_private_state_stay_with_their_actor(ray_session):
    overrides = ["run.rounds=2", "training.epochs=1", "clients.num_clients=6", "clients.fraction=0.5",
                 "data.max_train_samples=400", ONE_GROUP, "engine.kind=ray", "engine.num_actors=2"]

    class Undealt(RayEngine):
        def _deal(self, client_ids):
            raise AssertionError("FML's clients keep their local models on their actor: they are never dealt")

    engine = simulate_with(Undealt(), overrides)[1]
    assert not engine.stateless


def test_many_clients_are_multiplexed_on_few_actors(ray_session):
    overrides = ["data.dataset=synthetic", "data.partition=natural", "clients.num_clients=200", "run.rounds=2",
                 "training.epochs=1", "training.batch_size=64", "clients.fraction=1.0",
                 "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=1}]", "engine.kind=ray"]
    result, engine = simulate_with(RayEngine(), overrides)
    assert len(engine.specs) == 2 and sum(len(s.client_ids) for s in engine.specs) == 200
    for rnd in (1, 2):
        trained = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"}
        assert trained == set(range(200))
    assert sum(1 for r in result.rows if r["split"] == "test" and r["round"] == 2 and r["model"] == "local") == 200


def test_fractional_gpu_actors_are_packed_four_per_gpu_and_say_where_their_clients_trained(ray_session):
    import ray
    overrides = ["clients.num_clients=8", "run.rounds=1", "training.epochs=1", "engine.kind=ray",
                 "clients.groups=[{name='gpu', share=1.0, local_model='mlp', num_cpus=0.25, num_gpus=0.25}]"]
    cfg = load_config(None, overrides)
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        before = engine.infos
        result = simulate(cfg, prepared.dataset, prepared.partition, engine)
        after = ray.get([a.info.remote() for a in engine.actors])
    finally:
        engine.close()
    gpus = [tuple(i["gpu_ids"]) for i in after]
    assert len(gpus) == 8 and all(len(g) == 1 for g in gpus)
    assert sorted(gpus.count(g) for g in set(gpus)) == [4, 4]  # the session's two logical GPUs, four on each
    assert all(i["num_gpus"] == 0.25 for i in after)
    assert all(i["cuda_visible_devices"] == ",".join(i["gpu_ids"]) for i in after)  # what torch numbers from 0
    assert all(i["tensor_devices"] == [] for i in before)  # no model built before the first round
    # no CUDA here, so every actor fell back to the CPU, and its models say so
    assert all(i["device"] == "cpu" and i["tensor_devices"] == ["cpu"] for i in after)
    assert not any("memory_fraction" in i for i in after)  # CUDA facts only where CUDA is used
    assert {r["client"] for r in result.rows if r["split"] == "train"} == set(range(8))


def test_batched_actors_on_logical_gpus_match_the_sequential_serial_engine(ray_session):
    # 2 actors of 0.5 (logical) GPU each train their half of the round as one vmapped model; they fall
    # back to the CPU here, where the batched path is the same code as on a GPU
    overrides = [*QUICK, "clients.fraction=0.8",
                 "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=0.5, num_gpus=0.5}]"]
    serial = simulate_with(SerialEngine(), [*overrides, "training.batching='sequential'"])[0]
    result, engine = simulate_with(RayEngine(), [*overrides, "engine.kind=ray", "engine.num_actors=2",
                                                 "training.batching='vmap'"])
    assert len(engine.specs) == 2 and {i["device"] for i in engine.infos} == {"cpu"}
    assert_same(serial, result)


def test_a_group_too_big_for_the_cluster_fails_at_once(ray_session):
    cfg = load_config(None, ["engine.kind=ray", "clients.groups=[{name='big', share=1.0, num_cpus=4}]"])
    prepared = prepare(cfg)
    with pytest.raises(ResourceError, match=r"clients.groups\[big\].num_cpus = 4.0 but the largest node has 2 CPUs"):
        RayEngine().start(cfg, prepared.dataset, prepared.partition)
    cfg = load_config(None, ["engine.kind=ray", "engine.num_actors=8"])
    with pytest.raises(ResourceError, match="lower engine.num_actors"):
        RayEngine().start(cfg, prepared.dataset, prepared.partition)



def test_fmlray_run_uses_the_ray_engine_by_default(ray_session, tmp_path, capsys):
    assert main(["run", "--set", "run.rounds=2", "--set", "training.epochs=1", "--set", f"run.output_dir={tmp_path}",
                 "--set", "engine.num_actors=1"]) == 0
    out = capsys.readouterr().out
    assert "ray engine" in out and "round 2/2" in out
    assert "2 client actors on 1 node(s): 1 × mlp, 1 × lenet5 (engine.num_actors = 1 raised: each group needs an " \
        "actor of its own)" in out  # two groups, each its own architecture
    assert (tmp_path / "digits-fml" / "metrics.parquet").is_file()


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_an_unreachable_address_is_one_line_and_exit_2(tmp_path, address):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--address", address,
                           "--set", f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [(
        f"fmlray: error: no Ray cluster answers at {address}; check engine.address / RAY_ADDRESS, "
        "or leave both empty for a local Ray")]
    assert list(tmp_path.iterdir()) == []


class KillsAnActorMidRound(RayEngine):
    """Kills actor 0 right after handing it its clients of round `at` (a fault, injected)."""

    at = 2

    def train_round(self, rnd, client_ids, global_state, progress=None):
        self.kill_now = rnd == self.at
        return super().train_round(rnd, client_ids, global_state, progress)

    def _dispatch(self, client_ids, call, **kwargs):
        if getattr(self, "kill_now", False):
            self.kill_now = False
            victim, inner = self.actors[0], call

            def call(actor, ids):
                refs = inner(actor, ids)
                if actor is victim:
                    ray_kill(victim)
                return refs
        return super()._dispatch(client_ids, call, **kwargs)


def alive(pid: int) -> bool:
    """The process runs (not gone, not a zombie its parent has yet to reap)."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ray_kill(actor):
    import ray
    ray.kill(actor, no_restart=True)


class KillsAnActorWhileEvaluating(KillsAnActorMidRound):
    """Kills actor 0 right after handing it its clients to evaluate after round `at`."""

    def train_round(self, rnd, client_ids, global_state, progress=None):
        self.rnd = rnd
        return RayEngine.train_round(self, rnd, client_ids, global_state, progress)

    def evaluate(self, global_state, client_ids=None, progress=None):
        self.kill_now = self.rnd == self.at
        return super().evaluate(global_state, client_ids, progress)


class KillsAnActorWhileCheckpointing(KillsAnActorMidRound):
    """Kills actor 0 right after asking it for its rows of round `at`'s checkpoint."""

    at = 3  # the last round of QUICK: no next round to report the loss with

    def train_round(self, rnd, client_ids, global_state, progress=None):
        return RayEngine.train_round(self, rnd, client_ids, global_state, progress)

    def checkpoint(self, rnd, folder):
        self.kill_now = rnd == self.at
        return super().checkpoint(rnd, folder)


FAULTS = {"training": KillsAnActorMidRound, "evaluating": KillsAnActorWhileEvaluating,
          "checkpointing": KillsAnActorWhileCheckpointing}
LOSSES = [  # when actor 0 is lost, the store, run.checkpoint_every; the recovery note; the round that reports it
    # (a loss while evaluating was reported with the next round: never, after the last)
    ("training round 2", "memory", 1, "private state of round 1; what it was doing", 2),
    ("training round 2", "disk", 1, "private state of round 1; what it was doing", 2),
    # the checkpoint is older than the round before: round 1 is replayed (the moved clients skipped it before)
    ("training round 2", "memory", 3, "private state of round 0 (no checkpoint yet: their initial models), brought "
     "up to date by replaying round(s) 1;", 2),
    # after round 2's training, before its checkpoint: their round-2 state was lost with the actor (before, their
    # round 2 was never trained again and they were evaluated as of round 1)
    ("evaluating round 2", "memory", 1, "private state of round 1, brought up to date by replaying round(s) 2;", 2),
    # the survivor wrote the moved clients' rows under its own file's name, over its own rows (a damaged checkpoint
    # that the manifest named twice), and the loss was never reported (no next round)
    ("checkpointing round 3", "disk", 1, "private state of round 2, brought up to date by replaying round(s) 3;", 3),
]


@pytest.mark.parametrize("when, store, every, note, reported", LOSSES, ids=[f"{w}-{s}-every{e}" for w, s, e, *_ in LOSSES])
def test_an_actor_lost_is_recovered_and_the_result_is_the_uninterrupted_ones(ray_session, serial_one_group, tmp_path,
                                                                              when, store, every, note, reported):
    from fmlray import checkpoint
    state_dir = tmp_path / "state"  # a user's: what is left there stays (the default scratch folder is tidied later)
    cfg = load_config(None, [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2", f"run.checkpoint_every={every}",
                             f"engine.state_store={store!r}", f"engine.state_dir={str(state_dir)!r}"])
    prepared = prepare(cfg)
    engine = FAULTS[when.split()[0]]()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:  # the victims' clients restart from the rows of the last checkpoint, on the survivor
        result = simulate(cfg, prepared.dataset, prepared.partition, engine, save=checkpoint.Writer(tmp_path, cfg))
    finally:
        engine.close()
    recovered = [r for r in result.rows if r["split"] == "recovered"]
    victims = set(engine.specs[0].client_ids)  # actor 0's block (cut by training rows, so not always 0-9)
    assert {r["round"] for r in recovered} == {reported} and {r["client"] for r in recovered} == victims
    assert "actor 0 lost" in recovered[0]["note"] and note in recovered[0]["note"], recovered[0]["note"]
    for rnd in (1, 2, 3):
        assert {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"} == set(range(20))
    assert engine.lost == {0} and set(engine.owner.values()) == {1}
    # the lost actor's rows too are gone at the end (its store never closed; they stayed for good)
    assert not list(state_dir.rglob("*.rows")) and not list(state_dir.glob("*/*"))
    assert_same(serial_one_group, Result(
        [r for r in result.rows if r["split"] != "recovered"], result.global_state))
    resume = checkpoint.load(tmp_path, cfg)  # whole: every row it names passes its checksum
    restored = SerialEngine()
    restored.start(cfg, prepared.dataset, prepared.partition)
    restored.restore(resume.folder, resume.refs(), resume.placement)
    restored.close()


def test_an_actor_lost_before_round_1_is_one_line(ray_session, tmp_path):
    # killed between "ready" and round 1 (while the run folder is probed), it was Ray's ActorDiedError traceback
    cfg = load_config(None, [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        # its process ended before the probe: ray.kill's actor is "dead" to the driver before its process is, and a
        # probe it still wrote after the driver tidied was left behind (CI, once in ~30 runs)
        pid = ray_session.get(engine.actors[1].__ray_call__.remote(lambda self: __import__("os").getpid()))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while alive(pid):
            assert time.monotonic() < deadline, f"actor process {pid} still alive 60 s after SIGKILL"
            time.sleep(0.05)
        with pytest.raises(ResourceError, match=r"^a client actor was lost before round 1 \(ActorDiedError: a node "
                                                r"went away or its process was killed\); start the run again$"):
            engine.check_writable(tmp_path)
    finally:
        engine.close()
    assert not list(tmp_path.iterdir())  # the survivor's probe file too


@pytest.mark.parametrize("every, why", [
    (0, "run.checkpoint_every = 0 keeps"),
    # a driver that writes no checkpoint (simulate without `save`, a benchmark): the global models are not kept
    # past checkpoint_every rounds (they piled up in the object store, one a round)
    (1, "without the checkpoints run.checkpoint_every asks for, the run keeps")])
def test_without_checkpoints_a_lost_actors_clients_lose_their_rounds_and_the_note_says_so(ray_session, every, why):
    result, engine = simulate_with(KillsAnActorMidRound(), [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2",
                                                            f"run.checkpoint_every={every}"])
    [note] = {r["note"] for r in result.rows if r["split"] == "recovered"}
    assert note.endswith(f"private state of round 0 (no checkpoint yet: their initial models); their updates since "
                         f"then are lost ({why} no global model to replay them from), "
                         "so the result differs from an uninterrupted run's; what it was doing for them re-run"), note
    assert all(ids is None and g is None for _, ids, g in engine.since_saved)  # nothing piled up


def test_an_actor_lost_mid_round_with_dealt_stateless_clients_loses_nothing(ray_session):
    # FedAvg's clients are dealt anew each round: the clients the lost actor was dealt are trained again by the
    # survivor, and the models are the serial engine's
    overrides = ["run.rounds=3", "training.epochs=1", "clients.num_clients=8", "data.max_train_samples=600",
                 ONE_GROUP, "algorithm.name=fedavg"]
    serial = simulate_with(SerialEngine(), overrides)[0]
    result, engine = simulate_with(KillsAnActorMidRound(), [*overrides, "engine.kind=ray", "engine.num_actors=2"])
    recovered = [r for r in result.rows if r["split"] == "recovered"]
    assert {r["round"] for r in recovered} == {2} and "actor 0 lost" in recovered[0]["note"]
    for rnd in (1, 2, 3):
        assert {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"} == set(range(8))
    assert engine.lost == {0} and engine._deal(list(range(8))) == {1: list(range(8))}
    assert_same(serial, Result([r for r in result.rows if r["split"] != "recovered"], result.global_state))


SAMPLED = ["run.rounds=3", "training.epochs=1", "clients.num_clients=8", "clients.fraction=0.5",
           "data.max_train_samples=600", ONE_GROUP]  # FML, half the clients a round: clients move


def sampled_on_two_actors(engine, tmp_path):
    """SAMPLED on `engine` (2 actors), checkpointing every round into `tmp_path`."""
    from fmlray import checkpoint
    cfg = load_config(None, [*SAMPLED, "engine.kind=ray", "engine.num_actors=2"])
    prepared = prepare(cfg)
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine, save=checkpoint.Writer(tmp_path, cfg))
    finally:
        engine.close()


class WatchesMoves(KillsAnActorMidRound):
    """Records every round's migrations (and, with `at` set, kills actor 0 in that round)."""

    at = None

    def _migrate(self, plan):
        self.moves = getattr(self, "moves", [])
        self.moves.append({c: (self.owner[c], a) for a, ids in plan.items() for c in ids if self.owner[c] != a})
        return super()._migrate(plan)


@pytest.mark.parametrize("kill", [False, True])
def test_clients_with_private_state_move_to_even_a_sampled_round_out(ray_session, tmp_path, kill):
    # FML, half the clients a round: the busier actor's clients move, local models and all, to the idler one
    # while that evens the round out; the models are the serial engine's, and an actor lost in a round after
    # clients moved loses nothing either (its clients restart from the last checkpoint, as always)
    serial = simulate_with(SerialEngine(), SAMPLED)[0]
    engine = WatchesMoves()
    engine.at = 3 if kill else None
    result = sampled_on_two_actors(engine, tmp_path)
    moved = {c for m in engine.moves for c in m}
    assert len(engine.moves) == 3 and moved  # something moved, and to where it was sent
    assert all(engine.owner[c] == engine.moves[-1][c][1] for c in engine.moves[-1]) or kill
    recovered = [r for r in result.rows if r["split"] == "recovered"]
    assert bool(recovered) == kill and engine.lost == ({0} if kill else set())
    assert_same(serial, Result([r for r in result.rows if r["split"] != "recovered"], result.global_state))


class KillsOnTheWay(WatchesMoves):
    """Kills the first actor that gives clients away ("giver") or takes them ("taker") in a round with moves."""

    role = "giver"

    def _migrate(self, plan):
        moves = [(self.owner[c], a) for a, ids in plan.items() for c in ids if self.owner[c] != a]
        if moves and not self.lost:
            self.victim = min(src if self.role == "giver" else dst for src, dst in moves)
            ray_kill(self.actors[self.victim])
        return super()._migrate(plan)


@pytest.mark.parametrize("role", ["giver", "taker"])
def test_an_actor_lost_while_clients_move_loses_nothing(ray_session, tmp_path, role):
    # a giver lost before it gave: its clients (those it was giving too) restart from the last checkpoint on
    # the survivor; a taker lost: the rows it was taking left the giver, and restart from the checkpoint too
    serial = simulate_with(SerialEngine(), SAMPLED)[0]
    engine = KillsOnTheWay()
    engine.role = role
    result = sampled_on_two_actors(engine, tmp_path)
    recovered = [r for r in result.rows if r["split"] == "recovered"]
    assert recovered and f"actor {engine.victim} lost" in recovered[0]["note"] and engine.lost == {engine.victim}
    for rnd in (1, 2, 3):
        sampled = {r["client"] for r in serial.rows if r["round"] == rnd and r["split"] == "train"}
        assert {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"} == sampled
    assert_same(serial, Result([r for r in result.rows if r["split"] != "recovered"], result.global_state))


def test_a_resumed_run_puts_moved_clients_back_and_sums_exactly_as_the_uninterrupted_one(ray_session, tmp_path):
    # where a client trains groups it into an actor's partial sum: the checkpoint keeps the placement, so
    # the resumed run moves clients back and gives the uninterrupted run's models bit for bit
    from fmlray import checkpoint
    base = [*SAMPLED, "engine.kind=ray", "engine.num_actors=2"]  # its run.rounds overridden below

    def go(rounds, folder, resume=None):
        cfg = load_config(None, [*base, f"run.rounds={rounds}"])
        prepared = prepare(cfg)
        engine = WatchesMoves()
        engine.start(cfg, prepared.dataset, prepared.partition)
        try:
            simulate(cfg, prepared.dataset, prepared.partition, engine, resume=resume,
                     save=checkpoint.Writer(folder, cfg, resume))
        finally:
            engine.close()
        return engine

    whole = go(4, tmp_path / "whole")
    go(2, tmp_path / "split")
    resume = checkpoint.load(tmp_path / "split")
    assert resume.placement["actors"] == 2 and len(resume.placement["owner"]) == 8
    split = go(4, tmp_path / "split", resume)
    assert whole.moves[2:] == split.moves and any(whole.moves[:2])  # the same moves after the resume
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    for k in a.global_state:
        np.testing.assert_array_equal(a.global_state[k], b.global_state[k], err_msg=k)


def test_a_resumed_runs_checkpoint_folder_the_actors_cannot_write_is_one_line_that_keeps_the_run_in_place(
        ray_session, tmp_path):
    # --resume cannot move a run, so "set run.output_dir" was advice that failed; an immutable folder (chattr +i)
    # refuses even root, which these tests run as
    import subprocess
    folder = tmp_path / "a" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")  # a checkpoint is there: the run is resumed
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root, on a file system with immutable files)")
    cfg = load_config(None, [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=1"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        with pytest.raises(ResourceError) as info:
            engine.check_writable(folder)
    finally:
        engine.close()
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert f"a client actor cannot write into {folder} (" in str(info.value)
    assert str(info.value).endswith("make it writable from every node (shared storage on a cluster), then continue "
                                    f"with: fmlray run --resume {tmp_path / 'a'}")


def test_sigterm_checkpoints_shuts_ray_down_and_resume_matches(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    import pyarrow.parquet as pq
    cmd = [sys.executable, "-m", "fmlray", "run", "--set", "run.rounds=30", "--set", "training.epochs=1",
           "--set", f"run.output_dir={tmp_path}"]  # the default engine: a private local Ray
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("round"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM: stopping after this round" in out and "Traceback" not in err
    run_dir = tmp_path / "digits-fml"
    from fmlray import checkpoint
    stopped = checkpoint.load(run_dir).round
    # finish on the test session's Ray, and compare with one uninterrupted serial run
    total = stopped + 1
    assert main(["run", "--resume", str(run_dir), "--set", f"run.rounds={total}"]) == 0
    assert main(["run", "--set", "engine.kind=serial", "--set", f"run.rounds={total}", "--set", "training.epochs=1",
                 "--set", f"run.output_dir={tmp_path}", "--set", "run.name=whole"]) == 0
    acc = lambda d: {(r["round"], r["client"], r["model"], r["split"]): r["accuracy"]  # noqa: E731
                     for r in pq.read_table(d / "metrics.parquet").to_pylist() if r["split"] != "round"}
    a, b = acc(run_dir), acc(tmp_path / "whole")
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a if not np.isnan(a[k])) < 1e-6


@pytest.mark.parametrize("kind", ["task", "actor"])
def test_a_memory_monitor_kill_ends_the_run_with_one_line(ray_session, monkeypatch, kind):
    # Ray's memory monitor: an OutOfMemoryError for a task, an ActorDiedError saying so for an actor.
    # Adopting the clients elsewhere would only feed the next victim, so the run stops with the fix.
    import ray

    class KilledForMemory(ray.exceptions.ActorDiedError):
        def __str__(self):
            return "The actor died unexpectedly before finishing this task. Task was killed due to the node " \
                   "running low on memory."

    cfg = load_config(None, [*QUICK, ONE_GROUP, "engine.kind=ray", "engine.num_actors=2"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    real_get = ray.get

    def get(refs, *args, **kwargs):
        if isinstance(refs, ray.ObjectRef):
            real_get(refs, *args, **kwargs)
            raise (ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
                   if kind == "task" else KilledForMemory())
        return real_get(refs, *args, **kwargs)

    try:
        monkeypatch.setattr(ray, "get", get)
        with pytest.raises(ResourceError) as info:
            simulate(cfg, prepared.dataset, prepared.partition, engine)
        monkeypatch.undo()
    finally:
        engine.close()
    message = str(info.value)
    assert "\n" not in message and "ran out of memory" in message and "engine.state_store" in message
    assert engine.lost == set()  # nobody adopted the clients


def test_pick_device_caps_a_fractional_gpu_and_not_a_whole_one(monkeypatch):
    # No CUDA here: torch.cuda is stood in for, to check what pick_device asks of it.
    import torch

    from fmlray.engine.ray_engine import pick_device
    capped = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
    assert pick_device(0.25) == "cuda:0" and capped == [(0.25, 0)]
    assert pick_device(1.0) == "cuda:0" and capped == [(0.25, 0)]  # a whole GPU is not capped
    assert pick_device(0.0) == "cpu"


def test_held_modules_are_the_hosts_workspaces():
    from types import SimpleNamespace

    from torch import nn

    from fmlray.engine.host import ClientHost
    from fmlray.engine.ray_engine import held_modules
    meme, a = nn.Linear(2, 2), nn.Linear(2, 3)
    host = SimpleNamespace(workspaces={("mlp", "mlp"): SimpleNamespace(models={"local": a, "meme": meme})})
    host.modules = lambda: ClientHost.modules(host)
    assert [id(m) for m in held_modules(host)] == [id(a), id(meme)]
    assert held_modules(SimpleNamespace(modules=lambda: [])) == [] and held_modules(None) == []


def test_progress_inside_a_round_counts_the_clients_actors_have_done(ray_session, monkeypatch):
    # one actor, 8 clients of 0.1-0.5 s each (by the machine): the driver, polling every 0.1 s here (once a
    # second in a run, which a fast machine's whole round could fall between), hears counts from the actor
    # (trained one after another: a batched unit of clients is heard from when it is done)
    from fmlray.engine import ray_engine
    monkeypatch.setattr(ray_engine, "PROGRESS_EVERY_S", 0.1)
    cfg = load_config(None, ["run.rounds=1", "training.epochs=12", ONE_GROUP, "engine.kind=ray",
                             "engine.num_actors=1", "clients.num_clients=8", "training.batching='sequential'"])
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        heard = []
        from fmlray.engine.host import initial_global_state
        result = engine.train_round(1, list(range(8)), initial_global_state(cfg, prepared.dataset),
                                    progress=heard.append)
        evaluated = []  # evaluation takes the same path with its own tag (too quick here to be heard from)
        ev = engine.evaluate(engine.fetch(result.global_state), progress=evaluated.append)
    finally:
        engine.close()
    assert len(result.clients) == 8 and [r["client"] for r in ev.clients] == list(range(8))
    assert all(0 <= n <= 8 for n in evaluated)
    assert heard == sorted(heard) and all(0 <= n <= 8 for n in heard)
    assert any(0 < n < 8 for n in heard), f"no count from inside the round: {heard}"


def test_the_drivers_memory_stays_flat_over_a_long_run(ray_session, tmp_path):
    # Objects the driver's garbage collector tracks (every row dict, list, ref wrapper) and its resident
    # set, after round 4 and round 12: a driver that kept each round's rows, states or refs grows here.
    import gc

    import psutil

    from fmlray.simulation import run_experiment
    marks = {}

    def echo(line):
        if line.startswith("round") and "local" in line:
            gc.collect()
            marks[int(line.split()[1].split("/")[0])] = (len(gc.get_objects()), psutil.Process().memory_info().rss)

    # evaluated rounds 4, 8, 12: marks after the first evaluations have warmed up, 8 rounds apart (a row, list or
    # ref kept per client and round would be 160 objects)
    cfg = load_config(None, ["run.rounds=12", "run.eval_every=4", "training.epochs=1", f"run.output_dir='{tmp_path}'"])
    run_experiment(cfg, echo=echo)
    objects, rss = (marks[12][i] - marks[4][i] for i in (0, 1))
    assert objects < 100, f"the driver holds {objects} more objects after round 12 than after round 4"
    assert rss < 32 * 2**20, f"the driver's resident set grew by {rss / 2**20:.0f} MiB from round 4 to 12"


def processes_under(ray_tmpdir: str) -> list:
    """The live processes with a file open under `ray_tmpdir`: a Ray's daemons, agents and workers write their
    logs in its session folder there (their environment cannot tell: Ray's process titles overwrite it)."""
    import psutil
    found = []
    for proc in psutil.process_iter():
        try:
            if any(f.path.startswith(ray_tmpdir + "/") for f in proc.open_files()):
                found.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            pass
    return found


def assert_none_left_under(ray_tmpdir: str) -> None:
    """No process of the Ray whose temp folder is `ray_tmpdir` is left (what the raylet ends as it goes may take
    a moment)."""
    import time
    deadline = time.monotonic() + 5
    while processes_under(ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(ray_tmpdir) == []


# a Ctrl-C while compare's (or a sweep's, or a search's) Ray starts: it was cut in half in the main thread, and its
# dashboard and runtime-env agents stayed a minute as orphans; the start now runs in a thread, and is shut down
CUT_START = """
import os, signal, sys, threading
from fmlray.cli import main
from fmlray.engine import connect

real = connect._connect

def cut(address):
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # while Ray starts
    return real(address)

connect._connect = cut
sys.exit(main(["compare", "--algorithms", "fedavg,local", "--set", "run.output_dir=" + sys.argv[1]]))
"""


def test_a_sigint_while_compares_ray_starts_ends_with_one_line_and_leaves_no_ray_process(tmp_path):
    import shutil
    import subprocess
    import sys
    import tempfile
    ray_tmpdir = tempfile.mkdtemp(prefix="fmlray-cut-", dir="/tmp")  # short: Ray's socket paths
    try:
        out = subprocess.run([sys.executable, "-c", CUT_START, str(tmp_path / "runs")], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "RAY_TMPDIR": ray_tmpdir})
        assert out.returncode == 130, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1] == "fmlray: interrupted; what no checkpoint held yet was dropped"
        assert not (tmp_path / "runs").exists()
        assert_none_left_under(ray_tmpdir)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.mark.parametrize("after,delay", [("data:", 0.0), ("data:", 0.6), ("starting the ray engine", 0.1),
                                         ("starting the ray engine", 1.0)])
def test_sigterm_during_start_up_ends_with_one_line_and_leaves_nothing(tmp_path, after, delay):
    # Before Ray starts, while it starts in its thread (the driver waits for it), and while the actors start.
    # Ray's failure-signal handler printed a C stack dump; a raise inside ray.wait came back as a SystemError
    # traceback; and the early Ray, still starting, was never shut down: its agents stayed 60 s as orphans.
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    ray_tmpdir = tempfile.mkdtemp(prefix="fmlray-sig-", dir="/tmp")  # short: Ray's socket paths
    cmd = [sys.executable, "-m", "fmlray", "run", "--set", f"run.output_dir={tmp_path}"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "RAY_TMPDIR": ray_tmpdir})
        for line in proc.stdout:
            if line.startswith(after):
                time.sleep(delay)
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        assert err.strip() == "fmlray: terminated (SIGTERM) outside a round; what no checkpoint held yet was dropped"
        assert "round 1/" not in out
        assert list(tmp_path.iterdir()) == []  # no run folder, no hidden sibling, no lock
        assert_none_left_under(ray_tmpdir)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


# After `ray.shutdown`, Ray's driver put SIGTERM back to the default action (its failure-signal handler,
# uninstalled, restores SIG_DFL under Python's handler): a SIGTERM while Ray shut down at a run's end killed
# fmlray at once, exit -15, with no line and no outputs. While Ray ran, a SIGTERM printed a C stack dump.
AFTER_SHUTDOWN = textwrap.dedent("""
    import os, signal, sys, time
    from fmlray.engine.connect import connect, shut_down

    signal.signal(signal.SIGTERM, lambda signum, frame: print("heard", flush=True))
    connect("")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    shut_down()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("lived", flush=True)
""")


def test_python_keeps_sigterm_while_ray_runs_and_after_it_shuts_down():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", AFTER_SHUTDOWN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "heard\nheard\nlived\n"
    assert "SIGTERM received" not in out.stderr
