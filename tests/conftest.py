"""Checks on the test session itself."""

import signal

import pytest

# A suite started as a background job (`make test &`, nohup) inherits SIGINT ignored, and so would every process
# a test starts: fmlray keeps an ignored SIGINT ignored (signals.sigint_ignored), so the tests of what Ctrl-C
# does would see nothing. Handled here, it reaches the test's processes as the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_xdist_node_collection_finished(node, ids):
    """`make test` runs pytest-xdist workers with `--dist loadgroup`: the cluster tests (xdist_group
    "cluster") must run on one worker, or each worker starts its own Ray head and three-raylet cluster.
    pytest-xdist 3.8 groups by renaming node ids, which pytest 9.2 ignores; say so instead of running slow."""
    grouped = [i for i in ids if "test_cluster.py::" in i]
    if node.config.getvalue("dist") == "loadgroup" and grouped and not any("@cluster" in i for i in grouped):
        pytest.exit(f"pytest-xdist did not group the cluster tests (pytest {pytest.__version__}): install the "
                    "pytest version pyproject.toml asks for", returncode=4)


# The modules whose tests take a minute or more each (processes of their own, private Rays, Tune), in this
# order before all others: under pytest-xdist the last tests to start decide when the session ends, and
# a sweep stopped by SIGTERM that starts last kept one worker busy 86 s after the others had finished.
FIRST = ("test_trials.py", "test_benchmarks_smoke.py", "test_cluster.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))
