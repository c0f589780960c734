"""Tasks (fmlray.tasks): the marginalised losses by hand on toy logits, parity with plain FML for the identity
task, the config's checks, the dropped classes, and a serial run with three task groups."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fmlray.algorithms import fedavg, fml, local
from fmlray.algorithms.base import task_logits, train_client
from fmlray.optim import make_optimizer
from fmlray.cli import main
from fmlray.config import load_config
from fmlray.engine.tasks import task_members
from fmlray.engine.serial import SerialEngine
from fmlray.errors import ConfigError, DataError
from fmlray.simulation import prepare, simulate
from fmlray.tasks import PRESETS, Task, resolve

# softmax([ln .1, ln .2, ln .3, ln .4]) = [.1, .2, .3, .4]; the task sends classes 0, 2 to label 0, class 1 to
# label 1 and drops class 3, so the meme's task distribution is [.1 + .3, .2] / .6 = [2/3, 1/3].
Z_MEME = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
TOY = Task("toy", (0, 1, 0, -1))


def members(task: Task) -> torch.Tensor:
    return task_members(task, torch.device("cpu"))


def test_task_logits_sum_the_classes_of_each_label_and_renormalise():
    assert members(TOY).tolist() == [[True, False, True, False], [False, True, False, False]]
    p = task_logits(Z_MEME, members(TOY)).exp()
    assert p.tolist()[0] == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    # the identity task gives softmax itself
    ident = members(Task("id", (0, 1, 2, 3)))
    assert torch.allclose(task_logits(Z_MEME, ident), torch.log_softmax(Z_MEME, 1), atol=1e-6)


def test_fml_losses_in_task_space_by_hand():
    algo = fml.make(alpha=0.5, beta=0.5)
    y = torch.tensor([0])
    meme = nn.Linear(1, 4, bias=True)
    with torch.no_grad():
        meme.weight.zero_()
        meme.bias.copy_(Z_MEME[0])
    models = {"local": lambda x: torch.zeros(1, 2), "meme": meme}  # the local model: [1/2, 1/2] over the labels
    logits = algo.logits(models, {}, torch.zeros(1, 1), ("local", "meme"), members(TOY))
    losses = algo.loss(logits, y, 1)
    ce_meme = -math.log(2 / 3)
    kl_meme_local = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)  # KL(p_meme ‖ p_local)
    kl_local_meme = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))  # KL(p_local ‖ p_meme)
    assert losses["local"].item() == pytest.approx(0.5 * math.log(2) + 0.5 * kl_meme_local, abs=1e-6)
    assert losses["meme"].item() == pytest.approx(0.5 * ce_meme + 0.5 * kl_local_meme, abs=1e-6)
    losses["meme"].backward()  # the meme learns through the marginal: d/db of its loss, by hand
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([2 / 3, 1 / 3])  # its task distribution; the local model's is [1/2, 1/2]
    # d(-log q_0)/dz_c = p_c (1/.6 - [c in label 0]/.4) for kept c, and p_c/.6 - ... = 0 for the dropped class 3
    d_ce = torch.tensor([0.1 / 0.6 - 0.1 / 0.4, 0.2 / 0.6, 0.3 / 0.6 - 0.3 / 0.4, 0.0])
    # d KL(u ‖ q)/dz_c = -Σ_k u_k d log q_k/dz_c, d log q_k/dz_c = p_c ([c in k]/q_k·.6 - 1/.6) for kept c
    d_kl = torch.tensor([-0.5 * (0.1 / 0.4 - 0.1 / 0.6) + 0.5 * 0.1 / 0.6,
                         0.5 * 0.2 / 0.6 - 0.5 * (0.2 / 0.2 - 0.2 / 0.6),
                         -0.5 * (0.3 / 0.4 - 0.3 / 0.6) + 0.5 * 0.3 / 0.6, 0.0])
    assert q.sum() == pytest.approx(1.0) and p.sum() == pytest.approx(1.0)
    assert meme.bias.grad.tolist() == pytest.approx((0.5 * d_ce + 0.5 * d_kl).tolist(), abs=1e-6)


def test_fedavg_meme_learns_the_task_label_through_the_marginal_and_local_ignores_the_meme():
    logits = fedavg.make().logits({"meme": lambda x: Z_MEME}, {}, torch.zeros(1, 1), ("meme",), members(TOY))
    assert fedavg.loss(logits, torch.tensor([1]), 1)["meme"].item() == pytest.approx(-math.log(1 / 3), abs=1e-6)
    z_local = torch.tensor([[math.log(3.0), 0.0]])  # a local model of the task's two outputs is left as it is
    out = local.make().logits({"local": lambda x: z_local}, {}, torch.zeros(1, 1), ("local",), members(TOY))
    assert torch.equal(out["local"], z_local)


def _models(seed=0):
    torch.manual_seed(seed)
    return {"local": nn.Linear(2, 3), "meme": nn.Linear(2, 3)}


@pytest.mark.parametrize("algo", [fml.make(alpha=0.5, beta=0.5, temperature=2.0), fedavg.make()],
                         ids=["fml", "fedavg"])
def test_identity_task_through_the_marginal_is_todays_training(algo):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 2, generator=g), torch.randint(0, 3, (24,), generator=g)
    plain, tasked = _models(), _models()
    out = []
    for models, task in ((plain, None), (tasked, members(Task("identity", (0, 1, 2))))):
        models = {n: models[n] for n in algo.trains}
        opts = {n: make_optimizer(m.parameters(), name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
                for n, m in models.items()}
        out.append(train_client(algo, models, opts, x, y, epochs=3, batch_size=5,
                                generator=torch.Generator().manual_seed(7), task=task))
    assert out[0] == pytest.approx(out[1], abs=1e-6)
    for name in algo.trains:
        for a, b in zip(plain[name].parameters(), tasked[name].parameters()):
            assert torch.allclose(a, b, atol=1e-6)


def test_presets_fit_their_datasets():
    for dataset, tasks in PRESETS.items():
        for name in tasks:
            task = resolve(name, dataset=dataset, num_classes=10)
            assert not task.dropped and task.num_labels == len(tasks[name])
    coarse = resolve("coarse4", dataset="fmnist", num_classes=10)
    assert coarse.of_class == (0, 1, 0, 0, 0, 2, 0, 2, 3, 2) and coarse.describe() == "coarse4 (4 labels)"
    assert resolve([0, 1, -1], dataset="cifar10", num_classes=3).describe() == "custom (2 labels; drops class 2)"
    assert resolve([0, -1, 1, -1], dataset="x", num_classes=4).describe() == "custom (2 labels; drops classes 1, 3)"
    assert resolve("identity", dataset="synthetic", num_classes=5).identity


TEN = "clients.groups=[{name='a', share=1.0, task=%s}]"


@pytest.mark.parametrize("overrides, fragment", [
    ([TEN % "'coarse4'"], "clients.groups[a].task = 'coarse4' is not a task of digits; choose one of identity, "
                          "parity, low-high, or give a list"),
    ([TEN % "'parity'", "data.dataset=cifar10"], "is not a task of cifar10; choose one of identity, or give"),
    ([TEN % "[0, 1, 0]"], "has 3 entries but the dataset has 10 classes; classes 3..9 are unmapped"),
    ([TEN % "[0, 1, 0, 1, 0, 1, 0, 1, 0]"], "has 9 entries but the dataset has 10 classes; class 9 is unmapped"),
    ([TEN % "[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]"], "has 11 entries but the dataset has 10 classes; give one"),
    ([TEN % "[0, 2, 0, 2, 0, 2, 0, 2, 0, 2]"], "task label 1 has no class (labels used: 0, 2)"),
    ([TEN % "[0, 1, 2, 3, 4, 5, 6, 7, 8, 99999999999]"], "task label 9 has no class"),  # no range(10**11)
    ([TEN % "[0, 0, 0, 0, 0, -1, -1, -1, -1, -1]"], "has a single label"),
    ([TEN % "[-1, -1, -1, -1, -1, -1, -1, -1, -1, -1]"], "drops every class"),
    ([TEN % "[0, 1, -2, 0, 1, 0, 1, 0, 1, 0]"], "class 2 has label -2"),
    ([TEN % "''"], "task is empty"),
    ([TEN % "3"], "task must be a string or a list, got 3"),
    ([TEN % "[0, 1.5]"], "task[1] must be an integer"),
    ([TEN % "[true, 1, 0, 1, 0, 1, 0, 1, 0, 1]"], "clients.groups[a].task[0] must be an integer, got true"),  # by name
])
def test_bad_tasks_are_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


THREE = ["clients.num_clients=6", "run.rounds=2", "training.epochs=1", "engine.kind=serial",
         "clients.groups=[{name='fine', share=1.0}, {name='parity', share=1.0, task='parity'}, "
         "{name='three', share=1.0, local_model='lenet5', task=[0, 1, 2, -1, -1, -1, -1, -1, -1, -1]}]"]


def test_dropped_classes_leave_the_clients_rows_and_too_few_left_is_an_error():
    cfg = load_config(None, THREE)
    plain = prepare(load_config(None, [*THREE[:-1], "clients.groups=[{name='all', share=1.0}]"]))
    p = prepare(cfg)
    y_train, y_test = p.dataset.y_train, p.dataset.y_test
    for cid in (4, 5):  # group "three": its rows are the plain partition's rows of classes 0, 1, 2
        for mine, theirs, y in ((p.partition.train, plain.partition.train, y_train),
                                (p.partition.test, plain.partition.test, y_test)):
            assert np.array_equal(mine[cid], theirs[cid][y[theirs[cid]] <= 2])
    for cid in range(4):
        assert np.array_equal(p.partition.train[cid], plain.partition.train[cid])
    with pytest.raises(DataError, match=r"client \d \(group three, task custom \(3 labels; drops 7 "
                                        r"classes\)\) keeps \d+ training rows .* fewer than "
                                        "data.min_samples = 200"):
        prepare(load_config(None, [*THREE, "data.min_samples=200"]))


def test_three_task_groups_train_models_of_their_tasks_and_report_per_group():
    cfg = load_config(None, [*THREE, "algorithm.name=fml"])
    p = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, p.dataset, p.partition)
    try:
        rows = simulate(cfg, p.dataset, p.partition, engine).rows
        outputs = {key[0]: ws.models["local"][-1].out_features for key, ws in engine.host.workspaces.items()}
        tasks = {cid: c.task and c.task.task.name for cid, c in engine.host.clients.items()}
    finally:
        engine.close()
    assert outputs == {"mlp": 10, "mlp-2way": 2, "lenet5-3way": 3}  # local models; the memes (mlp) predict 10
    assert tasks == {0: None, 1: None, 2: "parity", 3: "parity", 4: "custom", 5: "custom"}
    groups = [r for r in rows if r["split"] == "group_test" and r["round"] == 2]
    assert [(r["group"], r["model"], r["note"]) for r in groups] == [
        ("fine", "local", "task identity (10 labels)"), ("fine", "global", "task identity (10 labels)"),
        ("parity", "local", "task parity (2 labels)"), ("parity", "global", "task parity (2 labels)"),
        ("three", "local", "task custom (3 labels; drops 7 classes)"),
        ("three", "global", "task custom (3 labels; drops 7 classes)")]
    tests = [r for r in rows if r["split"] == "test" and r["round"] == 2 and r["group"] == "parity"]
    assert groups[2]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in tests if r["model"] == "local"]))
    assert len([r for r in rows if r["split"] == "global_test"]) == 2  # the global model: the global classes


def test_every_group_is_reported_each_round_a_group_with_no_client_tested_as_none(tmp_path, capsys):
    # one client of six sampled and tested a round: the two other groups' rows and summary lines were left out
    sets = [*THREE, "clients.fraction=0.1", "run.eval_clients='sampled'", f"run.output_dir={tmp_path}"]
    assert main(["run", *[x for o in sets for x in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    # the clients of group "three" hold only classes 0-2 of their rows: the data line says what they hold
    assert "test rows of digits over 6 clients, who hold " in out
    rows = pq.read_table(tmp_path / "digits-fml" / "metrics.parquet").to_pylist()
    for rnd in (1, 2):
        tested = {r["group"] for r in rows if r["round"] == rnd and r["split"] == "test"}
        groups = [r for r in rows if r["round"] == rnd and r["split"] == "group_test"]
        assert len(tested) == 1 and [(r["group"], r["model"]) for r in groups] == [
            (g, m) for g in ("fine", "parity", "three") for m in ("local", "global")]
        for r in groups:
            assert (r["samples"] > 0 and 0 <= r["accuracy"] <= 1) if r["group"] in tested else \
                (r["samples"] == 0 and math.isnan(r["accuracy"]) and math.isnan(r["loss"])), r
    block = out.split("by group, own test splits", 1)[1].splitlines()[1:5]
    assert block[0].split() == ["group", "task", "local", "p10", "global", "p10", "clients"]
    untested = {"fine", "parity", "three"} - tested
    for line in block[1:]:
        cells = line.split()
        assert cells[-5:] == ["-", "-", "-", "-", "0"] if cells[0] in untested else cells[-1] == "1", line
    assert (tmp_path / "digits-fml" / "summary.json").read_text().count("NaN") == 0  # still strict JSON


def test_compare_adds_each_algorithms_figures_by_group():
    from fmlray.metrics import format_comparison
    g = lambda mean, n: {"mean": mean, "std": 0.0, "min": mean, "p10": mean, "clients": n}  # noqa: E731
    groups = {"fine": {"task": "identity (10 labels)", "local": g(0.5, 2), "global_clients": g(0.25, 2)},
              "odd": {"task": "parity (2 labels)", "local": None, "global_clients": None}}
    summary = {"local": g(0.5, 2), "global_clients": g(0.25, 2), "global_test": 0.125, "groups": groups}
    lines = format_comparison({"fml": summary, "fedavg": {**summary, "local": None}}).splitlines()
    assert lines[3] == "by group, own test splits in the group's task space (mean / p10 across its clients):"
    assert [line.split() for line in lines[4:]] == [
        ["algorithm", "group", "task", "local", "p10", "global", "p10", "clients"],
        ["fml", "fine", "identity", "(10", "labels)", "0.5000", "0.5000", "0.2500", "0.2500", "2"],
        ["odd", "parity", "(2", "labels)", "-", "-", "-", "-", "0"],
        ["fedavg", "fine", "identity", "(10", "labels)", "0.5000", "0.5000", "0.2500", "0.2500", "2"],
        ["odd", "parity", "(2", "labels)", "-", "-", "-", "-", "0"]]
    assert len({len(line) for line in lines[4:]}) == 1  # one column layout for every algorithm
    assert "by group" not in format_comparison({"fml": {**summary, "groups": None}})


def test_the_private_state_line_names_each_group_by_what_its_algorithm_keeps():
    # Ditto's personal model has the global architecture in every group: it was labelled with each group's
    # local architecture ("lenet5-3way"), which Ditto never builds
    from fmlray.engine.resources import plan_store
    cfg = load_config(None, [*THREE, "algorithm.name=ditto"])
    plan = plan_store(cfg, prepare(cfg).dataset, node_memory=2**34)
    assert set(plan.row_bytes) == {"fine", "parity", "three"} and len(set(plan.row_bytes.values())) == 1
    mib = plan.row_bytes["fine"] / 2**20
    assert f"(fine: 2 × {mib:.2f} MiB, parity: 2 × {mib:.2f} MiB, three: 2 × {mib:.2f} MiB)" in plan.line
    fml_plan = plan_store(load_config(None, [*THREE, "algorithm.name=fml"]), prepare(cfg).dataset, 2**34)
    assert fml_plan.row_bytes["three"] != fml_plan.row_bytes["fine"]  # FML keeps the group's own local model


def test_cli_refuses_a_bad_task_in_one_line(tmp_path, capsys):
    assert main(["run", "--set", "clients.groups.0.task='coarse4'", "--set", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "clients.groups[mlp].task = 'coarse4' is not a task of digits" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_tasks_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    sets = [x for o in THREE for x in ("--set", o)]
    out = ["--set", f"run.output_dir={tmp_path}"]
    assert main(["run", *sets, *out, "--set", "run.name=whole", "--set", "run.rounds=3"]) == 0
    assert main(["run", *sets, *out, "--set", "run.name=cut"]) == 0  # 2 rounds, then one more
    assert main(["run", "--resume", str(tmp_path / "cut"), "--set", "run.rounds=3"]) == 0
    rows = sorted(p.name.split("-serial-")[1].rsplit("-", 1)[0] for p in (tmp_path / "cut" / "checkpoint").glob("rows-*"))
    assert rows == ["lenet5-3way", "mlp", "mlp-2way"]  # a layout per architecture and number of outputs
    whole, cut = (pq.read_table(tmp_path / n / "metrics.parquet").to_pylist() for n in ("whole", "cut"))
    pick = lambda rows: [(r["round"], r["client"], r["model"], r["split"], round(r["accuracy"], 6))  # noqa: E731
                         for r in rows if r["split"] in ("test", "group_test")]
    assert pick(whole) == pick(cut)


def test_readme_task_groups_and_preset_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text().split("\n## Tasks", 1)[1].split("\n## ", 1)[0]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    preset = load_config(root / "fmlray/presets/digits-tasks.toml")
    groups = {g.name: g.task for g in preset.clients.groups}
    assert block.count("[[clients.groups]]") == 2 and groups["parity"] == "parity"
    assert groups["shapes"] == (0, 1, -1, -1, 1, -1, 0, 1, 0, 0) and "task = [0, 1, -1, -1, 1, -1, 0, 1, 0, 0]" in block


def test_fmlray_config_lists_a_task_list_as_it_was_given(capsys):
    assert main(["config", "--set", "clients.groups.1.task=[0, 1, -1, -1, 1, -1, 0, 1, 0, 0]"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("clients.groups.1.task "))
    assert line.split(None, 1)[1].startswith('[0, 1, -1, -1, 1, -1, 0, 1, 0, 0]  "identity"')
