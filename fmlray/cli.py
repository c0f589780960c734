"""`fmlray run | compare | sweep | tune | report | partition | config`. Bad input ends with one line and exit code 2.

The config is checked before torch or Ray is imported (seconds), so a bad key answers at once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fmlray import signals
from fmlray.errors import FmlrayError
from fmlray.progress import Console, plain_warnings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _path(text: str) -> str:
    """A path argument: an empty one would silently mean "none given" (e.g. `--resume ''` a new run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return text


def _overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if already there (only a folder fmlray made, and only once the new run "
                   "has its first checkpoint; without this flag an existing folder is refused)")


def _config_args(p: argparse.ArgumentParser, address: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="FILE", type=_path, help="TOML config (default: the embedded digits default)")
    p.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set training.lr=0.05 (repeatable)")
    if address:  # not for `partition`, which starts no Ray
        p.add_argument("--address", metavar="ADDR",
                       help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (same as --set engine.address=ADDR)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fmlray", description="Federated Mutual Learning simulator on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one experiment and write runs/<name>/")
    _config_args(run)
    run.add_argument("--resume", metavar="RUN_DIR", type=_path, help="continue runs/<name> from its last checkpoint "
                     "(its own config; --set may extend run.rounds)")
    _overwrite_arg(run, "runs/<name>/")
    compare = sub.add_parser("compare", help="run several algorithms on the same partition and seed")
    _config_args(compare)
    compare.add_argument("--algorithms", default="fml,fedavg,fedprox,local",
                         help="comma-separated, or \"all\" (default: fml,fedavg,fedprox,local; all adds ditto, "
                         "fedper, fedrep, fedbn, apfl, lgfedavg, dml)")
    _overwrite_arg(compare, "the runs/<name>-<algorithm>/ folders")
    compare.add_argument("--resume", action="store_true",
                         help="continue a stopped compare (same config and algorithms): runs it finished are kept, "
                         "a stopped one goes on from its checkpoint, the others run")
    sweep = sub.add_parser("sweep", help="run a grid of experiments from a sweep file (resumable)")
    sweep.add_argument("sweep_file", type=_path, help="a TOML sweep file, e.g. experiments/digits.toml")
    sweep.add_argument("--parallel", metavar="N|auto",
                       help="run the grid as Ray Tune trials, N at once (auto: as many as the cluster holds), each "
                       "in a placement group sized to its run (same as executor = \"tune\" in [sweep])")
    sweep.add_argument("--sequential", action="store_true",
                       help="one run after another in this process, whatever the sweep file's executor says")
    tune = sub.add_parser("tune", help="search ranges of config keys with Ray Tune (a scheduler such as ASHA); "
                          "print the best configs and write them as presets")
    tune.add_argument("tune_file", type=_path, help="a TOML tune file, e.g. experiments/tune-digits.toml")
    tune.add_argument("--parallel", metavar="N|auto", help="trials at once (default: the file's tune.parallel)")
    tune.add_argument("--resume", action="store_true",
                      help="continue a stopped or crashed search in its folder: finished trials are kept, the "
                      "others go on from their checkpoints (the tune file must plan the same search)")
    report = sub.add_parser("report", help="reprint a finished run's summary")
    report.add_argument("run_dir", type=_path, help="a folder written by fmlray run, e.g. runs/digits-fml")
    part = sub.add_parser("partition", help="print (and save) the client × class table of a config's partition")
    _config_args(part, address=False)
    part.add_argument("--save", metavar="FILE.csv", type=_path, help="also write the table as CSV")
    config = sub.add_parser("config", help="list every config key with its value, default and meaning")
    _config_args(config)
    return parser


def _overrides(args) -> list[str]:
    from fmlray.config import quoted
    address = getattr(args, "address", None)
    return [*args.overrides, *([f"engine.address={quoted(address)}"] if address is not None else [])]


def _load(args):
    from fmlray.config import load_config
    return load_config(args.config, _overrides(args))


def cmd_run(args) -> int:
    from fmlray.config import ConfigError
    from fmlray.jobs import check_path

    if args.resume is not None:
        from fmlray.rundir import resumable_config
        if args.config:
            raise ConfigError("--resume uses the run's own config.toml; drop --config")
        check_path(args.resume, "--resume")
        if args.overwrite:
            raise ConfigError("--resume continues the run in its folder; drop --overwrite")
        cfg = resumable_config(args.resume, _overrides(args))
    else:
        cfg = _load(args)
    check_path(cfg.run.output_dir, "run.output_dir")
    from fmlray.metrics import format_summary
    from fmlray.simulation import RunDropped, RunInterrupted, run_experiment, title

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    try:
        with _run_hint(run_dir):
            path, summary = run_experiment(cfg, echo=Console(),
                                           resume_dir=None if args.resume is None else run_dir,
                                           overwrite=args.overwrite)
    except RunInterrupted as stop:
        print(f"fmlray: stopped after round {stop.round}; continue with: fmlray run --resume {run_dir}",
              file=sys.stderr)
        return 130
    except RunDropped as stop:
        print(f"fmlray: {_dropped(stop)}", file=sys.stderr)
        return 130
    try:
        print(format_summary(summary, title(cfg)))
        print(f"wrote {path}")
    except (KeyboardInterrupt, signals.Terminated) as exc:  # the run is written: nothing was dropped
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"fmlray: {what} while printing the summary; the run was written to {path}", file=sys.stderr)
        return 130
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from fmlray.config import ALGORITHMS, ConfigError
    from fmlray.jobs import check_path
    from fmlray.rundir import check_new
    from fmlray.sweep import check_found

    names = list(ALGORITHMS) if args.algorithms.strip() == "all" else \
        [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ALGORITHMS]
    if "all" in unknown:
        raise ConfigError(f"--algorithms {args.algorithms!r}: \"all\" stands alone (every algorithm); give it "
                          "alone, or list the algorithms")
    if not names:
        raise ConfigError(f"--algorithms {args.algorithms!r} names no algorithm; give at least one, e.g. "
                          "--algorithms fml,fedavg (or all)")
    if unknown:
        raise ConfigError(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--algorithms names one twice ({args.algorithms}); their runs would share a folder")
    cfg = _load(args)
    check_path(cfg.run.output_dir, "run.output_dir")
    runs = {}
    for name in names:  # each run's folder name must hold too
        try:
            runs[name] = replace(cfg, algorithm=replace(cfg.algorithm, name=name),
                                 run=replace(cfg.run, name=f"{cfg.run.name}-{name}"))
        except ConfigError as exc:
            raise ConfigError(f"compare's {name} run ({cfg.run.name}-{name}): {exc}") from None
    if args.resume and args.overwrite:
        raise ConfigError("--resume keeps what the compare's runs did, --overwrite replaces them; give one")
    for name, one in runs.items():  # every folder checked before the data is loaded (each run locks its own)
        run_dir = Path(one.run.output_dir) / one.run.name
        if args.resume:  # this compare's run (finished, or stopped: resumable) or nothing
            check_found(run_dir, one.run.name, one, "this compare", "choose another run.name or run.output_dir")
        else:
            check_new(run_dir, args.overwrite, hint="; or add --resume to continue a compare that stopped")
    from fmlray.checkpoint import exists as checkpoint_exists
    from fmlray.metrics import format_comparison, summaries
    from fmlray.rundir import finished, read_run
    from fmlray.simulation import RunDropped, RunInterrupted, check_algorithm, prepare, run_experiment

    prepared = prepare(next(iter(runs.values())))  # one dataset and partition for every algorithm
    for name, one in runs.items():  # each algorithm's own settings, before any run is written
        try:
            check_algorithm(one, prepared.dataset)
        except ConfigError as exc:
            raise ConfigError(f"compare's {name} run: {exc}") from None
    finals = {}
    with _shared_ray(cfg):
        for name, one in runs.items():
            run_dir = Path(one.run.output_dir) / one.run.name
            left = [n for n in runs if n != name and n not in finals]
            if args.resume and finished(run_dir):
                finals[name] = summaries(read_run(run_dir)[0])[-1]
                print(f"{name}: done ({run_dir})", flush=True)
                continue
            resume = run_dir if args.resume and checkpoint_exists(run_dir) else None
            mark = signals.asked()
            try:
                with _run_hint(run_dir):
                    path, finals[name] = run_experiment(one, prepared, echo=Console(), resume_dir=resume,
                                                        overwrite=args.overwrite)
            except (RunInterrupted, RunDropped) as stop:
                what = (f"the {name} run {_dropped(stop)}" if isinstance(stop, RunDropped) else
                        f"stopped the {name} run after round {stop.round}")
                print(f"fmlray: {what}" + (f" (not started: {', '.join(left)})" if left else "")
                      + _CONTINUE_COMPARE * (not isinstance(stop, RunDropped)), file=sys.stderr)
                return 130
            print(f"wrote {path}", flush=True)
            came = signals.asked_since(mark)
            if came and left:  # it came in the run's last round, or while it wrote its outputs: the run finished
                print(f"fmlray: {came}: stopped after the {name} run finished (not started: {', '.join(left)})"
                      + _CONTINUE_COMPARE, file=sys.stderr)
                return 130
    print(format_comparison(finals))
    return 0


_CONTINUE_COMPARE = "; continue with the same command and --resume"


def _dropped(stop) -> str:
    return (f"stopped in round {stop.round}, before it replaced the earlier run: {stop.kept} is left as it was, "
            "and nothing of this run was kept (--overwrite replaces it once the new run has its first checkpoint)")


@contextlib.contextmanager
def _resume_hint(command: str, resumable: Callable[[], bool]):
    """A second Ctrl-C, a SIGTERM outside the rounds, or an OSError no check foresaw (output to a closed pipe or a
    full disk) ends the command at once: where it left something `resumable` (a run's checkpoint, a search's
    recorded plan), `main`'s one line ends with the `command` that continues it; so does a lost node's or actor's
    error that ends saying the last checkpoint is resumable."""
    from fmlray.errors import RESUMABLE, ResourceError
    try:
        yield
    except BaseException as exc:
        raised = signals.raised_by_handler(exc) or exc
        if isinstance(raised, (KeyboardInterrupt, signals.Terminated, OSError)) and resumable():
            raised.add_note(f"continue with: {command}")
        elif isinstance(raised, ResourceError) and str(raised).endswith(RESUMABLE) and resumable():
            raised.args = (f"{str(raised).removesuffix(RESUMABLE)}continue from the last checkpoint with: {command}",)
        raise


def _run_hint(run_dir: Path):
    from fmlray.rundir import resumable
    return _resume_hint(f"fmlray run --resume {run_dir}", lambda: resumable(run_dir))


@contextlib.contextmanager
def _shared_ray(cfg):
    """One Ray for several runs (each engine leaves alone a Ray it did not start), and each run's actors
    reused by the next where they fit (`reusing_actors`)."""
    if cfg.engine.kind != "ray":
        yield
        return
    from fmlray.engine.connect import connect, shut_down
    from fmlray.engine.ray_engine import reusing_actors
    started = connect(cfg.engine.address)
    try:
        with reusing_actors():
            yield
    finally:
        if started:
            shut_down()


def cmd_sweep(args) -> int:
    from fmlray.config import ConfigError
    from fmlray.jobs import check_path
    from fmlray.rundir import check_length, check_writable, finished, writing
    from fmlray.sweep import SweepStopped, parallel_value, plan_sweep, run_planned

    sweep = plan_sweep(args.sweep_file)  # every config checked before the first run starts
    check_path(sweep.folder, "the sweep's output_dir")
    check_writable(sweep.folder, "sweep.output_dir")  # as a run's folder is checked: before anything starts
    check_length(max((sweep.folder / r.name for r in sweep.runs), key=lambda p: len(str(p))),
                 "sweep.output_dir, sweep.name and the run names")
    if args.sequential and args.parallel is not None:
        raise ConfigError("--sequential and --parallel contradict each other; give one")
    parallel = None if args.parallel is None else parallel_value(args.parallel, "--parallel")
    tune = not args.sequential and (parallel is not None or sweep.executor == "tune")
    from fmlray.simulation import RunInterrupted
    from fmlray.trials import TrialsStopped

    echo = lambda s: print(s, flush=True)  # noqa: E731
    try:
        with writing(sweep.folder, "sweep.output_dir"):  # before Ray starts: a second sweep refuses at once
            if tune:  # the trials' Ray: joined or started by the executor, which leaves it as it found it
                out = run_planned(sweep, args.sweep_file, echo, parallel or sweep.parallel, False)
            else:
                left = [r for r in sweep.runs if not finished(sweep.folder / r.name)]  # none: no Ray to start
                with _shared_ray(left[0].cfg) if left else contextlib.nullcontext():
                    out = run_planned(sweep, args.sweep_file, Console(), None, True)
    except RunInterrupted as stop:
        print(f"fmlray: stopped after round {stop.round}; run the same sweep again to continue", file=sys.stderr)
        return 130
    except SweepStopped as stop:
        print(f"fmlray: {stop.signal}: stopped after run {stop.run} finished; run the same sweep again to continue",
              file=sys.stderr)
        return 130
    except TrialsStopped as stop:
        print(f"fmlray: stopped with {len(stop.unfinished)} run(s) unfinished; run the same sweep again to finish "
              "them (each from its last checkpoint, if it reached one)", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def cmd_tune(args) -> int:
    from fmlray.jobs import check_path
    from fmlray.rundir import check_writable
    from fmlray.search import RECORD, failures, format_best, plan_search, ranks, run_search, unranked
    from fmlray.sweep import parallel_value
    from fmlray.trials import TrialsStopped

    search = plan_search(args.tune_file)  # every key and range checked before Ray starts
    check_path(search.folder, "the search's output_dir")
    check_writable(search.folder, "tune.output_dir")  # it failed with exit 1 once the trials were planned
    parallel = None if args.parallel is None else parallel_value(args.parallel, "--parallel")
    try:
        with _resume_hint(f"fmlray tune {args.tune_file} --resume", (search.folder / RECORD).is_file):
            folder, rows = run_search(args.tune_file, echo=lambda s: print(s, flush=True), parallel=parallel,
                                      resume=args.resume, search=search)
    except TrialsStopped:
        print("fmlray: stopped; unfinished trials go on from their last checkpoint, if they reached one; continue "
              f"with: fmlray tune {args.tune_file} --resume", file=sys.stderr)
        return 130
    print(format_best(rows, search))
    for warning in (unranked(search, rows), failures(rows)):
        if warning:
            print(f"fmlray: warning: {warning}", file=sys.stderr)
    print(f"wrote {folder / 'trials.parquet'} and " + ", ".join(
        str(folder / f"best-{i}.toml") for i in range(1, min(search.top, len(ranks(rows))) + 1)))
    return 0


def cmd_report(args) -> int:
    from fmlray.metrics import format_summary, summaries
    from fmlray.rundir import read_run

    table, title = read_run(args.run_dir)
    print(format_summary(summaries(table)[-1], title))
    return 0


def cmd_partition(args) -> int:
    from fmlray.jobs import check_path

    cfg = _load(args)
    save = None if args.save is None else Path(args.save)
    if save is not None:
        check_path(save, "--save")
        folder = save.is_dir() or args.save.endswith(("/", os.sep))  # Path drops a trailing slash
        if folder or not save.parent.is_dir():
            what = ("is a folder" if folder else f"is in {save.parent}, which is a file, not a folder"
                    if save.parent.exists() else f"is in a folder that does not exist ({save.parent})")
            raise FmlrayError(f"--save {args.save} {what}; give a file path in an existing folder, e.g. partition.csv")
        if not os.access(save.parent, os.W_OK):  # before the table is computed and printed
            raise FmlrayError(f"--save {save}: its folder {save.parent} cannot be written; choose a writable path")
        if os.path.lexists(save):  # before the data is loaded; checked again, atomically, by write_new
            raise FmlrayError(_exists(save))
    import io

    import pyarrow.csv

    from fmlray.data import format_partition, partition_counts
    from fmlray.rundir import write_new
    from fmlray.simulation import prepare

    prepared = prepare(cfg)
    table = partition_counts(prepared.dataset, prepared.partition)
    print(format_partition(table))
    if save is not None:
        buf = io.BytesIO()
        pyarrow.csv.write_csv(table, buf)
        try:
            write_new(save, buf.getvalue())
        except FileExistsError:  # made since the check above
            raise FmlrayError(_exists(save)) from None
        except OSError as exc:
            raise FmlrayError(f"--save {save}: cannot write it ({exc.strerror}); choose a writable path") from None
        print(f"wrote {save}")
    return 0


def _exists(save: Path) -> str:
    kind = "a symlink" if save.is_symlink() else "a file" if save.is_file() else "a special file"
    return f"--save {save} already exists ({kind}); fmlray never replaces it: give a new path or delete the old one"


def cmd_config(args) -> int:
    from fmlray.config import keys

    rows = [("key", "value", "default", "description")]
    rows += [(key, _literal(value), _literal(default), doc) for key, value, default, doc in keys(_load(args))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for key, value, default, doc in rows:
        print(f"{key:<{width[0]}}  {value:<{width[1]}}  {default:<{width[2]}}  {doc}")
    return 0


def _literal(value) -> str:
    """A config value as TOML writes it (what --set takes); groups by their names."""
    if value is None:
        return "(unset)"
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # TOML's basic strings escape as JSON does
    if isinstance(value, tuple):  # groups by their names; a task's list of labels as it is
        return f"[{', '.join(str(getattr(g, 'name', g)) for g in value)}]"
    return repr(value)


def command() -> None:
    """The `fmlray` command (and `python -m fmlray`): `main`, then an exit that skips what Python would do after
    its exit handlers. With torch, Ray and pyarrow loaded, tearing their modules down took ~0.65 s of CPU, and
    1.3 s of a digits run's wall on two cores (benchmarks/wholerun.py's "interpreter exit"), only to free memory
    the process gives back anyway. Threads are still joined and every exit handler still runs (Ray's shutdown,
    logging's flush, finalisers); only then, in a handler registered before any of theirs, so run after them all,
    are stdout and stderr flushed and the process ended with main's code. A process ending in a traceback, or
    whose flush fails, ends as Python ends it."""
    done: list[int] = []

    def end_now() -> None:
        if not done:  # an uncaught exception: Python reports it as usual
            return
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # Python's own exit says what went wrong
            return
        os._exit(done[0])

    def finished(signum, frame) -> None:  # the command's work is done: Ray's shutdown goes on, then the exit
        with contextlib.suppress(OSError):  # fd 2 closed: nothing to say it on
            os.write(2, f"fmlray: {signal.Signals(signum).name} after the command had finished; nothing was lost\n"
                     .encode())

    _usable_streams()
    atexit.register(end_now)
    done.append(main())
    signal.signal(signal.SIGTERM, finished)
    sys.exit(done[0])


def _usable_streams() -> None:
    """Streams every print can use: a closed stdout or stderr (a daemon's, cron's: Python leaves it None) goes to
    /dev/null, and text the terminal's encoding cannot show (`PYTHONIOENCODING=ascii`, a C locale without UTF-8
    mode) is escaped (\\xd7 for ×), as Python's stderr already does, instead of failing the run."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        elif isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return int(exit_.code or 0)
    commands = {"run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep, "tune": cmd_tune, "report": cmd_report,
                "partition": cmd_partition, "config": cmd_config}
    # Inside the rounds `simulation.StopOnSignal` turns SIGTERM into a stop after the round, with a checkpoint.
    main_thread = threading.current_thread() is threading.main_thread()
    signals.reset()
    before = signal.signal(signal.SIGTERM, signals.terminate) if main_thread else None
    try:
        try:
            with plain_warnings():
                return commands[args.command](args)
        except SystemError as exc:
            raised = signals.raised_by_handler(exc)
            if raised is None:
                raise
            raise raised from None
    except FmlrayError as exc:
        print(f"fmlray: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeEncodeError as exc:  # a name beyond an ASCII locale (Python's UTF-8 mode off): file names, output
        print(f"fmlray: error: {ascii(exc.object[exc.start:exc.end])} cannot be written in this locale's encoding "
              f"({exc.encoding}); run fmlray under a UTF-8 locale (e.g. LANG=C.UTF-8) or with PYTHONUTF8=1",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"fmlray: interrupted; what no checkpoint held yet was dropped{_notes(exc)}", file=sys.stderr)
        return 130
    except signals.Terminated as exc:
        print(f"fmlray: terminated (SIGTERM) outside a round; what no checkpoint held yet was dropped{_notes(exc)}",
              file=sys.stderr)
        return 130
    except BrokenPipeError as exc:  # stdout closed early (`fmlray partition | head`): stop, as a shell tool does
        _quiet_stdout()
        if _notes(exc):  # a run left resumable: stderr may still be read
            print(f"fmlray: output closed (broken pipe), so the run stopped{_notes(exc)}", file=sys.stderr)
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe ended
    except OSError as exc:  # what no check above foresaw, e.g. a full disk under stdout (`> /dev/full`)
        print(f"fmlray: error: {_os_error(exc)}", file=sys.stderr)
        _quiet_stdout()
        return EXIT_USAGE if exc.errno in _YOURS_TO_FIX else 1
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _quiet_stdout() -> None:
    """stdout onto /dev/null, so that Python's own flush at exit does not fail again on what is left unwritten."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # no file under it (a test's capture): nothing to flush there
        pass


_YOURS_TO_FIX = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space on that disk (its quota is full)",
                 errno.EACCES: "give this user access to it", errno.EPERM: "give this user access to it",
                 errno.EROFS: "use a writable place",
                 errno.ENAMETOOLONG: "use shorter names (a folder or file name holds at most 255 bytes)",
                 errno.ELOOP: "a symlink on that path leads back to itself: fix or remove it",
                 errno.ENOTDIR: "a part of that path is a file, not a folder: give a path through folders"}


def _os_error(exc: OSError) -> str:
    """An OSError no check foresaw as one line: what failed, where (when it says), what to change where the cause
    is the machine's (a full disk, a permission), and how to continue a run it left resumable."""
    where = f" ({exc.filename})" if exc.filename else ""
    fix = _YOURS_TO_FIX.get(exc.errno)
    return f"{exc.strerror or exc}{where}" + (f"; {fix}" if fix else "") + _notes(exc)


def _notes(exc: BaseException) -> str:
    return "".join(f"; {note}" for note in getattr(exc, "__notes__", []))


if __name__ == "__main__":
    sys.exit(main())
