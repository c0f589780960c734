"""Run short simulations, one after another, on one three-node `ray.cluster_utils.Cluster` (three raylets on
this machine) and save where the actors ran and what came out; a run may remove a worker node (its raylet and
the actor on it) right after the checkpoint of a given round (the last run, then: the node stays gone). A
`sweep` entry runs a sweep's grid as Ray Tune trials instead, and saves, per trial, the node its driver ran on
and the engine's notes (which say over how many nodes its placement group lay). Run as a script, in its own
process: one process can hold one Ray connection, and the test session already has its own.

    multinode_script.py '[{"sweep": "/path/s.toml", "out": "/path/placed.json"},
                          {"overrides": [...], "out": "/path/a.npz", "remove_after": 0}, ...]'
"""

import json
import sys
from pathlib import Path

import numpy as np
import ray
import ray.util.state
from ray.cluster_utils import Cluster
from raynodes import free_port

from fmlray import checkpoint
from fmlray.config import load_config
from fmlray.engine.ray_engine import RayEngine
from fmlray.simulation import prepare, simulate


def main(runs: list[dict]) -> None:
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    # the state API needs the head's dashboard; on a port of its own, not the default 8265 that another
    # test's cluster may hold at the same moment (the head failed to start: "address already in use")
    cluster = Cluster(initialize_head=True, head_node_args={**node, "dashboard_port": free_port()})
    workers = [cluster.add_node(**node) for _ in range(2)]
    cluster.wait_for_nodes()
    # Every raylet listens on loopback only; Ray would rewrite a 127.0.0.1 address to the host's
    # outward IP before connecting, so keep it as given.
    ray._private.services.resolve_ip_for_localhost = lambda host: host
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    try:
        for run in runs:
            if "sweep" in run:
                sweep_as_trials(run["sweep"], run["out"])
            else:
                simulate_once(cluster, workers, run["overrides"], run["out"], run.get("remove_after", 0))
    finally:
        ray.shutdown()
        cluster.shutdown()


def sweep_as_trials(sweep_file: str, out: str) -> None:
    from fmlray.sweep import combine, plan_sweep
    from fmlray.trials import run_trials
    sweep = plan_sweep(sweep_file)
    results = run_trials(sweep, 3, echo=lambda line: print(line, flush=True))
    combine(sweep.folder, sweep.runs)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    with open(out, "w") as f:
        json.dump({"nodes": nodes, "runs": {name: {"node": r["node"], "log": r["log"]} for name, r in results.items()}}, f)


def simulate_once(cluster: Cluster, workers: list, overrides: list[str], out: str, remove_after: int) -> None:
    cfg = load_config(None, overrides)
    prepared = prepare(cfg)
    engine = RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        # a worker node that is not the driver's (the driver's node holds the aggregator)
        driver_node = ray.get_runtime_context().get_node_id()
        victim = next(w for w in workers if w.node_id != driver_node)

        writer = checkpoint.Writer(Path(out).parent / "run", cfg)

        def save(rnd, engine, state):  # the actors write their rows; a node dies right after
            info = writer(rnd, engine, state)
            if rnd == remove_after:
                cluster.remove_node(victim)
            return info

        result = simulate(cfg, prepared.dataset, prepared.partition, engine, save=save)
        aggregators = ray.util.state.list_actors(filters=[("class_name", "=", "Aggregator"), ("state", "=", "ALIVE")])
    finally:
        engine.close()
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    np.savez(out, **result.global_state)
    with open(out + ".json", "w") as f:
        home = {c: i for i, spec in enumerate(engine.specs) for c in spec.client_ids}
        json.dump({"nodes": nodes, "actor_nodes": [i["node"] for i in engine.infos], "rows": result.rows,
                   "moved": sorted(c for c, a in engine.owner.items() if a != home[c]),
                   "driver_node": driver_node, "aggregator_nodes": [a.node_id for a in aggregators]}, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
