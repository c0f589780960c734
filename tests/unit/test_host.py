"""ClientHost's fast paths against the plain ones they replace: fused loading of the global model,
the float64 tensor partial sum, the fused finiteness check, and the errors for a mismatched state."""

import numpy as np
import pytest
import torch

from fmlray import aggregate
from fmlray.config import load_config
from fmlray.engine.host import ClientHost, _finite, _Sum, initial_global_state, state_of
from fmlray.errors import TrainingError
from fmlray.simulation import prepare

BN = "clients.groups=[{name='r', share=1.0, local_model='resnet8'}]"


def host_for(overrides):
    cfg = load_config(None, ["clients.num_clients=4", "training.epochs=1", "data.max_train_samples=200", *overrides])
    prepared = prepare(cfg)
    return cfg, prepared, ClientHost(cfg, prepared.dataset, prepared.partition, [0, 1, 2, 3])


def test_partial_sum_equals_the_numpy_weighted_sum_of_each_clients_meme():
    # resnet8 has BatchNorm, so integer counters (max) ride along with float entries (weighted sum)
    cfg, prepared, host = host_for([BN, "model.meme='resnet8'", "algorithm.name='fedavg'"])
    g = initial_global_state(cfg, prepared.dataset)
    partial, rows = host.train(1, [0, 1, 2, 3], g)
    # the same updates one client at a time, summed the plain way (a fresh host per client: same seeds)
    expected = None
    for cid in range(4):
        _, _, one = host_for([BN, "model.meme='resnet8'", "algorithm.name='fedavg'"])
        p, _ = one.train(1, [cid], g)
        mean = aggregate.finalize(p, g)  # one client: its own meme
        w = aggregate.weighted(mean, len(prepared.partition.train[cid]))
        expected = w if expected is None else aggregate.add(expected, w)
    assert partial.count == 4 and partial.weight == expected.weight
    for k, v in expected.sums.items():
        assert partial.sums[k].dtype == v.dtype
        np.testing.assert_allclose(partial.sums[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    counters = [k for k in partial.sums if k.endswith("num_batches_tracked")]
    assert counters and all(partial.sums[k].shape == () for k in counters)  # 0-d integer entries stay arrays


def test_finite_check_sees_nan_and_inf_and_ignores_integer_buffers():
    m = torch.nn.BatchNorm1d(3)
    tensors = list(m.state_dict().values())
    assert _finite(tensors)
    m.running_mean[1] = float("nan")
    assert not _finite(tensors)
    m.running_mean[1] = 0.0
    m.weight.data[0] = float("-inf")
    assert not _finite(tensors)


def test_sum_keeps_float64_and_the_max_of_integer_entries():
    like = {"w": torch.zeros(2), "n": torch.tensor(0)}
    s = _Sum(like)
    s.add([torch.tensor([1.0, 2.0]), torch.tensor(3)], 2)
    s.add([torch.tensor([0.5, 0.25]), torch.tensor(5)], 4)
    p = s.partial()
    assert p.sums["w"].dtype == np.float64 and p.sums["w"].tolist() == [4.0, 5.0]
    assert p.sums["n"].tolist() == 5 and p.weight == 6.0 and p.count == 2


@pytest.mark.parametrize("damage, message", [
    (lambda g: g.pop(next(iter(g))), "keys do not match model 'mlp'"),
    (lambda g: g.update({k: np.zeros(3, dtype=np.float32) for k in list(g)[:1]}), "has shape (3,), model 'mlp' wants"),
])
def test_a_global_state_that_does_not_fit_the_meme_is_one_clear_error(damage, message):
    cfg, prepared, host = host_for(["algorithm.name='fedavg'"])
    g = initial_global_state(cfg, prepared.dataset)
    damage(g)
    with pytest.raises(TrainingError) as info:
        host.train(1, [0], g)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_meme_starts_each_client_from_the_global_model_with_a_fresh_optimiser():
    cfg, prepared, host = host_for(["algorithm.name='fedavg'", "training.momentum=0.9"])
    g = initial_global_state(cfg, prepared.dataset)
    host.train(1, [0], g)  # leaves momentum in the reused optimiser and client 0's update in the meme
    partial, _ = host.train(1, [1], g)
    fresh = host_for(["algorithm.name='fedavg'", "training.momentum=0.9"])[2]
    alone, _ = fresh.train(1, [1], g)
    for k in partial.sums:
        np.testing.assert_array_equal(partial.sums[k], alone.sums[k], err_msg=k)
    (workspace,) = host.workspaces.values()  # FedAvg: one workspace, holding the meme
    assert state_of(workspace.models["meme"]).keys() == g.keys()


def test_a_checkpoint_row_file_with_unpadded_rows_still_restores(tmp_path):
    # row files written before rows were padded to pages: (n, row bytes) tables with numpy's own header
    from fmlray.engine.state import RowRef, crc
    one = ["training.momentum=0.9", "clients.groups=[{name='m', share=1.0, local_model='mlp'}]"]
    cfg, prepared, host = host_for(one)  # FML: a local model and its optimiser per client
    host.train(1, [0, 2], initial_global_state(cfg, prepared.dataset))
    (store,) = host.stores.values()
    rows = {cid: store.get(cid).copy() for cid in (0, 2)}
    assert store.layout.padded > store.layout.nbytes
    np.save(tmp_path / "old.npy", np.stack([rows[0], rows[2]]))
    again = host_for(one)[2]
    again.restore_rows(tmp_path, {cid: RowRef("old.npy", i, store.layout.name, crc(rows[cid]))
                                  for i, cid in enumerate((0, 2))})
    (restored,) = again.stores.values()
    assert all((restored.get(cid) == rows[cid]).all() for cid in (0, 2))
