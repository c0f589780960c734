"""What a run prints while it runs: progress inside rounds."""

from fmlray import progress
from fmlray.config import load_config
from fmlray.progress import Console
from fmlray.simulation import run_experiment


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_plain_log_gets_a_status_line_only_every_few_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    lines = []
    console = Console(lines.append, tty=False, every=5.0)
    phase = console.phase("  training round 2/9", 50)
    for done, at in ((5, 1.0), (10, 4.9), (20, 5.0), (30, 7.0), (40, 10.0)):
        clock.now = 100.0 + at
        phase(done)
    # nothing before 5 s (a short round prints what it always did), then at most one line per 5 s
    assert lines == ["  training round 2/9: 20/50 clients, 5s, about 8s left",
                     "  training round 2/9: 40/50 clients, 10s, about 2s left"]


def test_on_a_terminal_the_status_is_rewritten_in_place_and_cleared_before_a_line(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    lines = []
    console = Console(lines.append, tty=True)
    phase = console.phase("  evaluating round 1/1", 4)
    clock.now += 1.5
    phase(1)
    clock.now += 0.5
    phase(2)  # within a second of the last: not shown
    console("round 1/1  local 0.9")
    out = capsys.readouterr().out
    assert out == "\r\x1b[K  evaluating round 1/1: 1/4 clients, 2s, about 4s left\r\x1b[K"
    assert lines == ["round 1/1  local 0.9"]


def test_a_run_reports_every_client_of_its_rounds_and_evaluations(tmp_path):
    lines = []
    cfg = load_config(None, ["engine.kind='serial'", "run.rounds=2", "run.eval_every=2", "training.epochs=1",
                             "clients.fraction=0.5", f"run.output_dir='{tmp_path}'"])
    run_experiment(cfg, echo=Console(lines.append, tty=False, every=0.0))
    status = [s.split(",")[0] for s in lines if " clients, " in s]
    assert status == ([f"  training round 1/2: {k}/10 clients" for k in range(1, 11)]
                      + [f"  training round 2/2: {k}/10 clients" for k in range(1, 11)]
                      + [f"  evaluating round 2/2: {k}/20 clients" for k in range(1, 21)])
    assert lines[0].startswith("digits-fml: fml on digits") and lines[1].startswith("data: 1438 training")
