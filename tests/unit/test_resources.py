"""Resource maths: how many actors fit, which clients each hosts, and the errors instead of hangs."""

import pytest

from fmlray.config import load_config
from fmlray.engine.resources import Capacity, deal, plan_actors
from fmlray.errors import ResourceError

LAPTOP = Capacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0)


def plan(overrides, cap=LAPTOP):
    return plan_actors(load_config(None, overrides), cap)


def test_default_gets_one_actor_per_group_on_two_cpus_and_covers_every_client_once():
    specs = plan([])
    assert [(s.group, s.num_cpus) for s in specs] == [("mlp", 1.0), ("lenet5", 1.0)]
    assert [c for s in specs for c in s.client_ids] == list(range(20))


def test_more_clients_than_slots_are_multiplexed_on_few_actors():
    specs = plan(["clients.num_clients=200", "clients.groups=[{name='a', share=1.0, num_cpus=0.5}]"])
    assert len(specs) == 4
    assert [len(s.client_ids) for s in specs] == [50, 50, 50, 50]


def test_explicit_actor_count_is_honoured_or_refused():
    one_group = "clients.groups=[{name='a', share=1.0, num_cpus=0.5}]"
    for n in (1, 2, 3):
        specs = plan([one_group, f"engine.num_actors={n}"])
        assert len(specs) == n and sorted(c for s in specs for c in s.client_ids) == list(range(20))
    with pytest.raises(ResourceError, match="need 5 CPUs .* cluster has 2"):
        plan([one_group, "engine.num_actors=10"])


def test_fractional_gpus_pack_four_actors_per_gpu():
    cap = Capacity(cpus=2, gpus=2, node_cpus=2, node_gpus=2)
    specs = plan(["clients.num_clients=8", "clients.groups=[{name='g', share=1.0, num_cpus=0.25, num_gpus=0.25}]"], cap)
    assert len(specs) == 8 and all(s.num_gpus == 0.25 for s in specs)


@pytest.mark.parametrize("group, fragment", [
    ("{name='big', share=1.0, num_cpus=4}", "clients.groups[big].num_cpus = 4.0 but the largest node has 2 CPUs"),
    ("{name='gpu', share=1.0, num_gpus=1}", "clients.groups[gpu].num_gpus = 1.0 but the largest node has 0 GPUs"),
])
def test_a_group_that_cannot_fit_one_actor_names_what_to_lower(group, fragment):
    with pytest.raises(ResourceError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        plan([f"clients.groups=[{group}]"])


def test_heterogeneous_groups_get_their_own_resources():
    cap = Capacity(cpus=4, gpus=1, node_cpus=4, node_gpus=1)
    specs = plan(["clients.num_clients=10", "clients.groups=[{name='cpu', count=6, num_cpus=1}, "
                  "{name='gpu', count=4, local_model='cnn', num_cpus=0.5, num_gpus=0.5}]"], cap)
    by_group = {}
    for s in specs:
        by_group.setdefault(s.group, []).append(s)
    assert {g: len(v) for g, v in by_group.items()} == {"cpu": 2, "gpu": 2}
    assert [c for s in by_group["gpu"] for c in s.client_ids] == [6, 7, 8, 9]


def test_clients_are_dealt_by_training_rows_largest_first():
    one_group = "clients.groups=[{name='a', share=1.0, num_cpus=0.5}]"
    cfg = load_config(None, [one_group, "clients.num_clients=6", "engine.num_actors=2"])
    rows = [100, 100, 100, 10, 10, 10]  # equal counts would give one actor 300 rows, the other 30
    specs = plan_actors(cfg, LAPTOP, cost=rows)
    assert [s.client_ids for s in specs] == [(0, 2), (1, 3, 4, 5)]  # 200 vs 130
    # every actor keeps at least one client, even when one client outweighs all the rest
    specs = plan_actors(load_config(None, [one_group, "clients.num_clients=4", "engine.num_actors=3"]), LAPTOP,
                        cost=[1000, 1, 1, 1])
    assert [s.client_ids for s in specs] == [(0,), (1, 3), (2,)]
    # no cost: contiguous blocks of equal client counts
    assert [s.client_ids for s in plan_actors(cfg, LAPTOP)] == [(0, 1, 2), (3, 4, 5)]


def test_dealing_beats_the_best_contiguous_cut_on_a_dirichlet_split():
    # 20 FMNIST clients of Dirichlet(0.5), seed 0 (benchmarks/overhead.py --workload fmnist-full): the best
    # contiguous cut left 31,213 vs 28,787 rows, so the round waited 4 % for one actor
    rows = [1263, 4849, 3273, 1951, 4311, 2865, 4044, 1706, 3410, 3541,
            1750, 3792, 2013, 1787, 5267, 3565, 2838, 1161, 4513, 2101]
    parts = deal(range(20), 2, rows)
    assert sorted(c for p in parts for c in p) == list(range(20)) and all(list(p) == sorted(p) for p in parts)
    assert sorted(sum(rows[c] for c in p) for p in parts) == [29996, 30004]
    assert deal(range(20), 2, rows) == parts  # a function of its arguments
    assert deal([7, 3, 5], 3, rows) == [(5,), (3,), (7,)] and deal([3, 5], 1, rows) == [(3, 5)]


# -- trials: placement groups sized to a run ------------------------------------------------------

from fmlray.engine.resources import (DRIVER_MEMORY, bundle_capacity, check_trial_fits, match_bundles, pack,  # noqa: E402
                                     trial_actors, trial_bundles)

ONE_GROUP = "clients.groups=[{name='a', share=1.0, num_cpus=1}]"
EIGHT = Capacity(cpus=8, gpus=0, node_cpus=8, node_gpus=0)


def test_a_trial_gets_its_share_of_the_cluster_or_its_smallest_size():
    cfg = load_config(None, [ONE_GROUP])
    assert len(trial_actors(cfg, EIGHT, 2)) == 4  # two trials at once: half the CPUs each
    assert len(trial_actors(cfg, EIGHT, 8)) == 1
    assert len(trial_actors(cfg, EIGHT, None)) == 1  # auto: as many trials as fit, each at its smallest
    two_groups = load_config(None, [])
    assert [s.group for s in trial_actors(two_groups, LAPTOP, 2)] == ["mlp", "lenet5"]  # a share of 1 CPU is too small
    assert len(trial_actors(load_config(None, [ONE_GROUP, "engine.num_actors=3"]), EIGHT, 8)) == 3  # as asked
    with pytest.raises(ResourceError, match="need 3 CPUs"):
        trial_actors(load_config(None, [ONE_GROUP, "engine.num_actors=3"]), LAPTOP, 2)


def test_trial_bundles_are_the_driver_then_one_per_actor_and_the_trial_plans_the_same_actors_from_them():
    cfg = load_config(None, ["clients.num_clients=10", "clients.groups=[{name='cpu', count=6, num_cpus=1}, "
                             "{name='gpu', count=4, num_cpus=0.5, num_gpus=0.25}]"])
    cap = Capacity(cpus=4, gpus=1, node_cpus=4, node_gpus=1)
    specs = trial_actors(cfg, cap, 1)
    bundles = trial_bundles(cfg, specs)
    assert bundles[0] == {"memory": DRIVER_MEMORY}
    assert bundles[1:] == [{"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {})} for s in specs]
    # inside the trial: the pool from the bundles alone, each actor into a bundle of its size
    again = plan_actors(cfg, bundle_capacity(bundles), actors=len(bundles) - 1)
    assert again == specs
    assert sorted(match_bundles(again, bundles)) == list(range(1, len(bundles)))
    assert trial_bundles(load_config(None, ["engine.kind=serial"]), []) == [{"CPU": 1.0, "memory": DRIVER_MEMORY}]


def test_match_bundles_refuses_a_placement_group_sized_for_another_plan():
    cfg = load_config(None, [ONE_GROUP])
    specs = plan_actors(cfg, LAPTOP, actors=2)
    with pytest.raises(ResourceError, match="holds no bundle of 1 CPU / 0 GPU"):
        match_bundles(specs, [{"memory": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}])


def test_pack_places_bundles_on_nodes_and_the_error_names_the_trial():
    one_cpu_nodes = [{"CPU": 1.0, "memory": 4e9}] * 3
    assert pack([{"memory": 1e9}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], one_cpu_nodes)
    assert not pack([{"CPU": 2.0}], one_cpu_nodes)  # 3 CPUs in all, but no node holds 2
    assert not pack([{"CPU": 1.0}] * 4, one_cpu_nodes)
    with pytest.raises(ResourceError) as info:
        check_trial_fits("fml-s0", [{"memory": 1e9}, {"CPU": 2.0}], one_cpu_nodes)
    assert "run fml-s0 needs a placement group of 2 bundles (2 CPUs" in str(info.value)
    assert "3 node(s) (3 CPUs" in str(info.value) and "\n" not in str(info.value)
