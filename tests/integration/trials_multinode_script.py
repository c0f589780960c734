"""Run a sweep's grid as Ray Tune trials on a three-node `ray.cluster_utils.Cluster` (three raylets of
one CPU each on this machine) and save, per trial, the node its driver ran on and the engine's notes (which
say over how many nodes its placement group lay). Run as a script, in its own process: one process can hold
one Ray connection, and the test session already has its own."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from fmlray.sweep import combine, plan_sweep
from fmlray.trials import run_trials


def main(sweep_file: str, out: str) -> None:
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    # no dashboard: its default port 8265 is the @cluster tests' cluster's, which may start at the same moment
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray._private.services.resolve_ip_for_localhost = lambda host: host  # keep every raylet on loopback
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    try:
        sweep = plan_sweep(sweep_file)
        results = run_trials(sweep, 3, echo=lambda line: print(line, flush=True))
        combine(sweep.folder, sweep.runs)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        with open(out, "w") as f:
            json.dump({"nodes": nodes, "runs": {name: {"node": r["node"], "log": r["log"]} for name, r in results.items()}},
                      f)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
