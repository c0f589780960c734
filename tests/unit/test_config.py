"""Config: defaults, presets, TOML, --set overrides, and the errors that name what to change."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from fmlray import config
from fmlray.cli import main
from fmlray.config import PRESETS_DIR, ClientsConfig, Config, FMLConfig, GroupConfig, keys, load_config, to_dict
from fmlray.errors import ConfigError


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_embedded_default_preset_equals_the_defaults():
    assert load_config(PRESETS_DIR / "digits.toml") == Config()


def test_every_preset_loads():
    for preset in sorted(PRESETS_DIR.glob("*.toml")):
        assert isinstance(load_config(preset), Config)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().run.rounds = 3


def test_file_overrides_defaults_key_by_key(tmp_path):
    cfg = load_config(write(tmp_path, "[training]\nlr = 0.05\n[algorithm.fml]\nalpha = 0.3\n"))
    assert cfg.training.lr == 0.05 and cfg.training.batch_size == 16
    assert cfg.algorithm.fml.alpha == 0.3 and cfg.algorithm.fml.beta == 0.5


def test_set_overrides_parse_values_with_types():
    cfg = load_config(None, ["training.lr=0.05", "data.dataset=synthetic", "run.rounds=3",
                             "data.download=true", "clients.groups.1.local_model=resnet8", "algorithm.fml.alpha_end=0.9"])
    assert cfg.training.lr == 0.05 and cfg.run.rounds == 3 and cfg.data.download is True
    assert cfg.data.dataset == "synthetic"
    assert cfg.clients.groups[1].local_model == "resnet8"
    assert cfg.algorithm.fml.alpha_end == 0.9


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0
    with pytest.raises(ConfigError, match="run.rounds must be an integer"):
        load_config(None, ["run.rounds=2.5"])


@pytest.mark.parametrize("override, fragment", [
    ("training.lrr=0.1", "unknown key 'training.lrr'; valid keys in training: epochs, batch_size"),
    ("trainin.lr=0.1", "unknown key 'trainin'"),
    ("training.lr=abc", "training.lr must be a number"),
    ("training.lr=-1", "training.lr must be in (0, 10]"),
    ("algorithm.fml.alpha=1.5", "algorithm.fml.alpha must be in [0, 1]"),
    ("algorithm.fml.temperature=0", "algorithm.fml.temperature must be in [0.01, 100]"),
    ("clients.fraction=0", "clients.fraction must be in (0, 1]"),
    ("clients.num_clients=0", "clients.num_clients must be >= 1"),
    ("algorithm.name=fedsgd", "algorithm.name = 'fedsgd' is unknown; choose one of fml, fedavg"),
    ("data.dataset=imagenet", "data.dataset = 'imagenet' is unknown"),
    ("model.meme=vgg", "model.meme = 'vgg' is unknown"),
    ("data.partition=natural", "needs data.dataset = 'synthetic'"),
    ("clients.groups.5.share=1", "not an index"),
    ("clients.groups.².share=1", "'²' is not an index"),  # a digit to str.isdigit(), not to int()
    ("run.name=a/b", "plain folder name"),
    ("training.lr", "must look like section.key=value"),
    ("run..rounds=3", "--set 'run..rounds=3': the key 'run..rounds' has an empty part; write section.key=value"),
    ("clients.groups.0.count=5", "clients.groups[mlp]: give exactly one of count (> 0) or share (> 0); it has "
                                 "count = 5 and share = 0.5: set the other to 0"),
    ('run.output_dir="/tmp/a\udcffb"', "holds the byte 0xff, which is not UTF-8 text"),
    ("engine.kind=spark", "engine.kind = 'spark' is unknown"),
    ("data.download=yes", "data.download must be true or false"),
    ("run.name.x=1", "--set run.name.x: 'run.name' is a single value, not a table"),
    ("clients.groups.1.share.x=1", "'clients.groups.1.share' is a single value"),
    ("clients.groups.0.num_gpus=inf", "clients.groups[mlp].num_gpus must be a finite number"),
    ('run.name="a\\u0085"', "holds a control character"),
    ("run.seed=9223372036854775808", "does not fit in 64 bits"),
    ("training.batching=jit", "training.batching = 'jit' is unknown; choose one of auto, sequential, vmap"),
    ("training.max_batched_clients=0", "training.max_batched_clients must be >= 1, got 0"),
    ("training.precision=fp16", "training.precision = 'fp16' is unknown; choose one of fp32, bf16"),
    # a bare word TOML reads as another type: the fix is quoting, so the message says how
    ("run.name=2024-01-01", "run.name must be a string, got datetime.date(2024, 1, 1): TOML reads 2024-01-01 as a "
                            "date; quote it: name = \"2024-01-01\" in a file, --set 'run.name=\"2024-01-01\"'"),
    ("run.name=123", "TOML reads 123 as an integer; quote it"),
    ("engine.address=true", "TOML reads true as a boolean; quote it: address = \"true\""),
    ("run.eval_clients=true", "run.eval_clients must be an integer or a string, got true"),
    ('run.eval_clients="a\u0000"', "holds a control character"),
    # the disk store made the run's folder first: the run trained, then failed to take its name, leaving two folders
    ('engine.state_dir="runs/digits-fml/state"', "engine.state_dir = 'runs/digits-fml/state' lies inside the run's own"),
    ('engine.state_dir="runs/.digits-fml.new"', "lies inside the run's own folder"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_a_state_dir_beside_the_run_folder_or_of_another_run_is_fine():
    for path in ("runs/state", "runs/digits-fml-state", "/tmp/state", "runs/other/state"):
        assert load_config(None, [f"engine.state_dir={path!r}"]).engine.state_dir == path


def test_bad_toml_file_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[run\nname = 1"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="run.name must be a string, got 3: TOML reads 3 as an integer"):
        load_config(write(tmp_path, "[run]\nname = 3\n"))
    with pytest.raises(ConfigError, match="is not UTF-8 text .* save it as UTF-8 text"):
        (tmp_path / "latin.toml").write_bytes(b'[run]\nname = "caf\xe9"\n')  # Latin-1
        load_config(tmp_path / "latin.toml")


def test_a_byte_order_mark_and_quoted_overrides_are_read_as_meant(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[run]\nrounds = 2\n")  # some Windows editors save UTF-8 so
    assert load_config(bom).run.rounds == 2
    for text in ("a\\b", "it's", 'x"y'):  # what fmlray puts into an override itself (--address, a sweep's folder)
        assert load_config(None, [f"engine.address={config.quoted(text)}"]).engine.address == text


def test_checks_hold_for_configs_built_in_code_too():
    with pytest.raises(ConfigError, match="num_gpus must be a finite number >= 0, got inf"):
        GroupConfig(name="g", share=1, num_gpus=float("inf"))
    with pytest.raises(ConfigError, match=r"training.weight_decay must be in \[0, 1\] \(usually 1e-4 to 1e-2\), got nan"):
        dataclasses.replace(Config().training, weight_decay=float("nan"))


def test_groups_need_exactly_one_of_count_or_share():
    with pytest.raises(ConfigError, match="exactly one of count"):
        GroupConfig(name="g", count=3, share=0.5)
    with pytest.raises(ConfigError, match="exactly one of count"):
        GroupConfig(name="g")
    with pytest.raises(ConfigError, match="counts add up to 30 > clients.num_clients = 20"):
        ClientsConfig(num_clients=20, groups=(GroupConfig(name="a", count=30),))
    with pytest.raises(ConfigError, match="names must be unique"):
        ClientsConfig(groups=(GroupConfig(name="a", share=1), GroupConfig(name="a", share=1)))
    with pytest.raises(ConfigError, match=r"clients.groups\[0\].name is required"):
        load_config(None, ["clients.groups=[{local_model='mlp', share=1.0}]"])


def test_group_sizes_counts_first_then_shares_by_largest_remainder():
    c = ClientsConfig(num_clients=10, groups=(
        GroupConfig(name="catfish", count=1), GroupConfig(name="a", share=1), GroupConfig(name="b", share=2)))
    assert c.group_sizes() == (1, 3, 6)
    assert c.group_of_clients() == (0, 1, 1, 1, 2, 2, 2, 2, 2, 2)
    assert ClientsConfig(num_clients=7).group_sizes() == (4, 3)
    assert sum(ClientsConfig(num_clients=1000).group_sizes()) == 1000


def test_alpha_beta_schedule_is_linear_over_rounds():
    f = FMLConfig(alpha=0.5, beta=0.5, alpha_end=0.1, beta_end=0.9)
    assert f.at_round(1, 5) == (0.5, 0.5)
    assert f.at_round(5, 5) == pytest.approx((0.1, 0.9))
    assert f.at_round(3, 5) == pytest.approx((0.3, 0.7))
    assert FMLConfig().at_round(4, 10) == (0.5, 0.5)


def test_only_the_algorithms_that_read_algorithm_fml_follow_its_schedule():
    # fedavg with alpha_end set could not be extended: "follows a schedule over its 1 rounds" (audit 40)
    for name, keys_ in (("fml", ["algorithm.fml.alpha_end"]), ("dml", ["algorithm.fml.alpha_end"]), ("fedavg", []),
                        ("ditto", [])):
        cfg = load_config(None, [f"algorithm.name={name}", "algorithm.fml.alpha_end=0.2"])
        assert cfg.algorithm.schedule_keys() == keys_, name


def test_fedrep_with_no_body_epoch_is_refused():
    # it ran, and its global model never changed: the shared representation trains only in body epochs (audit 40)
    with pytest.raises(ConfigError, match="body_epochs = 0 never trains the shared representation"):
        load_config(None, ["algorithm.name=fedrep", "algorithm.fedrep.body_epochs=0"])
    # and none on the head: with training.epochs = 1 (and the default body_epochs = 1) each client's head stayed
    # the round-0 global one, a FedAvg of the body under a fixed random head (audit 44)
    with pytest.raises(ConfigError, match="body_epochs = 1 takes every one of training.epochs = 1, so the clients' "
                                          "heads would never train"):
        load_config(None, ["algorithm.name=fedrep", "training.epochs=1"])
    assert load_config(None, ["algorithm.name=fedrep", "training.epochs=2"]).algorithm.fedrep.body_epochs == 1


def test_resolved_config_round_trips_through_toml(tmp_path):
    import tomli_w
    cfg = load_config(None, ["algorithm.fml.beta_end=0.8", "clients.num_clients=7"])
    p = write(tmp_path, tomli_w.dumps(to_dict(cfg)))
    assert load_config(p) == cfg


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_config_block() -> str:
    section = README.read_text().split("\n## Config\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def flat(tree, prefix=""):
    """Dotted keys of a TOML tree, with list indices as <i>."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flat(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield f"{prefix}{key}"
            for item in value:
                yield from flat(item, f"{prefix}{key}.<i>.")
        else:
            yield f"{prefix}{key}"


def test_fmlray_config_lists_every_key_with_value_default_and_description(capsys):
    assert main(["config", "--set", "training.lr=0.05", "--set", "clients.groups.1.local_model=cnn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "value", "default", "description"]
    listed = {line.split()[0]: line.split(None, 3)[1:] for line in lines[1:]}
    assert list(listed) == [key for key, *_ in keys(Config())]
    assert len(listed) == 73 and {"run.eval_clients", "training.batching", "training.precision", "engine.state_store",
                                  "engine.state_dir", "algorithm.fml.alpha_end", "algorithm.server_lr",
                                  "algorithm.ditto.lam", "algorithm.fedrep.body_epochs", "algorithm.fedprox.mu",
                                  "clients.groups.1.num_gpus", "clients.groups.1.task"} <= set(listed)
    assert listed["training.lr"] == ["0.05", "0.01", "learning rate (the authors' code: SGD, lr 0.01, momentum 0.9, "
                                                     "weight decay 5e-4)"]
    assert listed["clients.groups.1.local_model"][:2] == ['"cnn"', '"mlp"']
    assert listed["algorithm.fml.alpha_end"][:2] == ["(unset)", "(unset)"]
    assert all(desc.strip() for _, _, desc in listed.values())


def test_every_key_has_its_description_on_its_field_only():
    for key, _, _, doc in keys(Config()):
        assert doc and "\n" not in doc and len(doc) <= 160, key
    source = (Path(config.__file__)).read_text()
    classes = source[source.index("class RunConfig"):source.index("# Building configs")]
    assert not [line for line in classes.splitlines() if ": " in line and " = " in line and "  # " in line], \
        "describe a key in its _key(...) field, not in a comment"


def test_readme_config_block_shows_every_key_and_the_defaults(tmp_path):
    block = readme_config_block()
    assert load_config(write(tmp_path, block)) == Config()
    uncommented = re.sub(r"^# (\w+ = )", r"\1", block, flags=re.M)  # optional keys are shown commented out
    documented = set(flat(tomllib.loads(uncommented)))
    listed = {re.sub(r"\.\d+\.", ".<i>.", key) for key, *_ in keys(Config())}
    assert sorted(listed - documented) == []
    assert "| file" in next(line for line in block.splitlines() if line.startswith("partition ="))


def test_a_missing_required_key_is_named_in_config_terms(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[[clients.groups]]\nshare = 1.0\n"))
    assert str(info.value) == "clients.groups[0].name is required (no default); add name = ... to the " \
        "clients.groups[0] table"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Two:  # any section: every key without a default is named, none from Python's TypeError
        a: int
        b: int
        c: int = 0
    with pytest.raises(ConfigError, match=r"^x\.a, x\.b are required \(no default\); add a = \.\.\. and b = \.\.\. "
                                          r"to the x table$"):
        config.from_dict(Two, {"c": 1}, "x")


@pytest.mark.parametrize("text", ["a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 3000 + "1" + "}" * 3000])
def test_deeply_nested_toml_is_one_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match="nests arrays or tables hundreds of levels deep"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"^--set run.name=\.\.\.: the value nests lists or tables hundreds"):
        load_config(None, ["run.name=" + text[4:]])


def test_any_existing_path_but_a_folder_is_read_as_the_config(tmp_path):
    import os
    import threading
    assert load_config("/dev/null") == Config()
    fifo = tmp_path / "fifo"  # what a shell's <(printf ...) hands over
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("[run]\nrounds = 3\n"))
    writer.start()
    assert load_config(fifo).run.rounds == 3
    writer.join()
    with pytest.raises(ConfigError, match="config file /dev/zero is larger than 16 MiB"):
        load_config("/dev/zero")


def test_an_unknown_key_names_the_file_it_was_written_in(tmp_path):
    path = write(tmp_path, "[training]\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'training.lrr'; valid keys in training")):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^unknown key 'training.lrx'"):  # from --set: no file to name
        load_config(write(tmp_path, "[training]\nlr = 0.1\n", "ok.toml"), ["training.lrx=1"])
    groups = write(tmp_path, "[[clients.groups]]\nname = 'a'\nshare = 1.0\nbogus = 1\n", "groups.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{groups}: unknown key 'clients.groups[a].bogus'")):
        load_config(groups)  # inside a list of tables too
    digits = write(tmp_path, "[[clients.groups]]\nname = '1'\nshare = 1.0\ncolour = 1\n[[clients.groups]]\n"
                             "name = '0'\nshare = 1.0\n", "digits.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{digits}: unknown key 'clients.groups[0].colour'")):
        load_config(digits)  # a name of digits reads as an index: the item's own index, not group '1'


def test_a_table_given_to_set_sets_its_keys_and_keeps_the_files_others(tmp_path):
    # `--set training={batch_size=32}` once replaced the whole [training] table: the file's lr and epochs, and
    # every default, were silently gone
    path = tmp_path / "c.toml"
    path.write_text("[training]\nlr = 0.05\nepochs = 3\n")
    cfg = load_config(path, ["training={batch_size=32}", "run={rounds=2}"])
    assert (cfg.training.lr, cfg.training.epochs, cfg.training.batch_size) == (0.05, 3, 32)
    assert (cfg.run.rounds, cfg.run.name) == (2, Config().run.name)
    assert config.leaf_keys("training", {"lr": 0.1, "x": {"y": 1}}) == ["training.lr", "training.x.y"]
    groups = load_config(None, ["clients.groups.1={num_cpus=2}"]).clients.groups  # an entry of a list too
    assert (groups[1].num_cpus, groups[1].local_model) == (2.0, "lenet5")


@pytest.mark.parametrize("override, fragment", [
    ('run.name="x', "--set run.name=\"x: the value is not valid TOML"),  # was a run folder named '"x'
    ("training={lr=}", "--set training={lr=}: the value is not valid TOML"),  # was "training must be a table"
    ("clients.groups.0.local_model=[mlp", "the value is not valid TOML"),
    ('run.output_dir=""', "run.output_dir is empty"),  # the run went into the current folder
    ('clients.groups.0.name=" "', "every group needs a name"),
    ('clients.groups.0.name="a "', "the name 'a ' has surrounding spaces")])
def test_values_that_were_taken_as_something_else_are_refused(override, fragment):
    with pytest.raises(ConfigError) as exc:  # audit 40
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_a_bare_word_is_still_a_string():
    assert load_config(None, ["run.name=plain-word", "engine.kind=serial"]).run.name == "plain-word"
