"""`fmlray run | compare | report | partition`. Bad input ends with one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace

from fmlray.errors import FmlrayError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it exists (only a folder fmlray made, and only once the new run "
                   "has its first checkpoint; without this flag an existing folder is refused)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: the embedded digits default)")
    p.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set training.lr=0.05 (repeatable)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (same as --set engine.address=ADDR)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fmlray", description="Federated Mutual Learning simulator on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one experiment and write runs/<name>/")
    _config_args(run)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<name> from its last checkpoint "
                     "(its own config; --set may extend run.rounds)")
    _overwrite_arg(run, "runs/<name>/")
    compare = sub.add_parser("compare", help="run several algorithms on the same partition and seed")
    _config_args(compare)
    compare.add_argument("--algorithms", default="fml,fedavg,fedprox,local",
                         help="comma-separated (default: fml,fedavg,fedprox,local)")
    _overwrite_arg(compare, "the runs/<name>-<algorithm>/ folders")
    sweep = sub.add_parser("sweep", help="run a grid of experiments from a sweep file (resumable)")
    sweep.add_argument("sweep_file", help="a TOML sweep file, e.g. experiments/digits.toml")
    report = sub.add_parser("report", help="reprint a finished run's summary")
    report.add_argument("run_dir", help="a folder written by fmlray run, e.g. runs/digits-fml")
    part = sub.add_parser("partition", help="print (and save) the client × class table of a config's partition")
    _config_args(part)
    part.add_argument("--save", metavar="FILE.csv", help="also write the table as CSV")
    return parser


def _overrides(args) -> list[str]:
    return [*args.overrides, *([f"engine.address={args.address!r}"] if args.address is not None else [])]


def _load(args):
    from fmlray.config import load_config
    return load_config(args.config, _overrides(args))


def cmd_run(args) -> int:
    from fmlray.config import ConfigError
    from fmlray.metrics import format_summary
    from fmlray.simulation import run_experiment, title

    from pathlib import Path

    from fmlray.rundir import resumable_config
    from fmlray.simulation import RunInterrupted

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.toml; drop --config")
        if args.overwrite:
            raise ConfigError("--resume continues the run in its folder; drop --overwrite")
        cfg = resumable_config(args.resume, _overrides(args))
    else:
        cfg = _load(args)
    try:
        path, summary = run_experiment(cfg, echo=lambda s: print(s, flush=True),
                                       resume_dir=Path(args.resume) if args.resume else None,
                                       overwrite=args.overwrite)
    except RunInterrupted as stop:
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        print(f"fmlray: stopped after round {stop.round}; continue with: fmlray run --resume {run_dir}",
              file=sys.stderr)
        return 130
    print(format_summary(summary, title(cfg)))
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from fmlray.config import ALGORITHMS, ConfigError
    from fmlray.metrics import format_comparison
    from fmlray.rundir import check_new
    from fmlray.simulation import prepare, run_experiment

    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ALGORITHMS]
    if not names or unknown:
        raise ConfigError(f"--algorithms: unknown {unknown or 'empty list'}; choose from {', '.join(ALGORITHMS)}")
    cfg = _load(args)
    runs = {name: replace(cfg, algorithm=replace(cfg.algorithm, name=name),
                          run=replace(cfg.run, name=f"{cfg.run.name}-{name}")) for name in names}
    for one in runs.values():  # every folder checked before the data is loaded (each run locks its own)
        check_new(Path(one.run.output_dir) / one.run.name, args.overwrite)
    prepared = prepare(cfg)  # one dataset and partition for every algorithm
    finals = {}
    with _shared_ray(cfg):
        for name, one in runs.items():
            path, finals[name] = run_experiment(one, prepared, echo=lambda s: print(s, flush=True),
                                                overwrite=args.overwrite)
            print(f"wrote {path}", flush=True)
    print(format_comparison(finals))
    return 0


@contextlib.contextmanager
def _shared_ray(cfg):
    """One Ray for several runs (each engine leaves alone a Ray it did not start)."""
    if cfg.engine.kind != "ray":
        yield
        return
    import ray

    from fmlray.engine.ray_engine import connect
    started = connect(cfg.engine.address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cmd_sweep(args) -> int:
    from fmlray.simulation import RunInterrupted
    from fmlray.sweep import plan, run_sweep

    _, runs = plan(args.sweep_file)  # every config checked before the first run starts
    try:
        with _shared_ray(runs[0].cfg):
            out = run_sweep(args.sweep_file, echo=lambda s: print(s, flush=True))
    except RunInterrupted as stop:
        print(f"fmlray: stopped after round {stop.round}; run the same sweep again to continue", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from fmlray.metrics import format_summary, summaries
    from fmlray.rundir import read_run

    table, title = read_run(args.run_dir)
    print(format_summary(summaries(table)[-1], title))
    return 0


def cmd_partition(args) -> int:
    import pyarrow.csv

    from fmlray.data import format_partition, partition_counts
    from fmlray.simulation import prepare

    prepared = prepare(_load(args))
    table = partition_counts(prepared.dataset, prepared.partition)
    print(format_partition(table))
    if args.save:
        pyarrow.csv.write_csv(table, args.save)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return int(exit_.code or 0)
    commands = {"run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep, "report": cmd_report,
                "partition": cmd_partition}
    try:
        return commands[args.command](args)
    except FmlrayError as exc:
        print(f"fmlray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fmlray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
