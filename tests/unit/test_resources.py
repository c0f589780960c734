"""Resource maths: how many actors fit, which clients each hosts, and the errors instead of hangs."""

import pytest

from fmlray.config import load_config
from fmlray.engine.resources import Capacity, plan_actors
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


def test_blocks_balance_the_clients_training_rows_not_their_count():
    one_group = "clients.groups=[{name='a', share=1.0, num_cpus=0.5}]"
    cfg = load_config(None, [one_group, "clients.num_clients=6", "engine.num_actors=2"])
    rows = [100, 100, 100, 10, 10, 10]  # equal counts would give one actor 300 rows, the other 30
    specs = plan_actors(cfg, LAPTOP, cost=rows)
    assert [s.client_ids for s in specs] == [(0, 1), (2, 3, 4, 5)]  # 200 vs 130: the best contiguous cut
    # every block keeps at least one client, even when one client outweighs all the rest
    specs = plan_actors(load_config(None, [one_group, "clients.num_clients=4", "engine.num_actors=3"]), LAPTOP,
                        cost=[1000, 1, 1, 1])
    assert [s.client_ids for s in specs] == [(0,), (1,), (2, 3)]
    # no cost: equal client counts, as before
    assert [len(s.client_ids) for s in plan_actors(cfg, LAPTOP)] == [3, 3]
