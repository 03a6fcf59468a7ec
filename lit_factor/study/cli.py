"""``python cli.py study {run,status,report}``: run a grid of fits as one resumable Optuna study, and report it.

See docs/studies/README.md for the study file format, the storage (SQLite by default, any SQLAlchemy URL for many
machines), what counts as failed or errored, and what the report contains.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lit_factor.errors import UserError, fail
from lit_factor.study import storage as st
from lit_factor.study.spec import load_spec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (the project's convention), not argparse's usage dump
        fail(f"{message} (see: {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cli.py study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run (or resume) a study file")
    run.add_argument("file", help="study YAML file (studies/*.yaml)")
    run.add_argument("--workers", type=int, default=1, help="parallel fits on this machine (default 1)")
    run.add_argument("--threads", type=int, help="CPU threads per worker (default: cores // workers)")
    run.add_argument("--gpus", help="comma-separated GPU ids, one per worker in turn (default: all visible)")
    run.add_argument("--data-dir", help="GLUE TSV root passed to every fit as --data.data_dir (default: $GLUE_DIR)")
    run.add_argument("--heartbeat", type=int, default=30, help="seconds between heartbeats (default 30)")
    run.add_argument("--retry-errors", action="store_true",
                     help="re-queue grid points whose every try crashed (not invalid settings), after fixing the cause")
    run.add_argument("--grace", type=int, help="a trial silent this long is re-queued (default 4 heartbeats)")
    for sp in (sub.add_parser("status", help="done / running / failed / errored per grid cell"),
               sub.add_parser("report", help="CSV, Markdown tables and figures of a study")):
        sp.add_argument("study", help="study YAML file, or the study's name")
    sub.choices["report"].add_argument("--out", required=True, help="folder for trials.csv, tables and figures")
    sub.choices["report"].add_argument("--publish", help="also write this Markdown page (e.g. docs/results.md)")
    sub.choices["report"].add_argument("--tensorboard", help="TensorBoard folder (default: OUT/tensorboard)")
    sub.choices["report"].add_argument("--reread", action="store_true",
                                       help="read results again from the run directories on this machine")
    sub.choices["report"].add_argument("--with", dest="joined", action="append", default=[], metavar="STUDY",
                                       help="also report this study's trials in the same tables (repeatable; "
                                            "added to the study file's report_with)")
    for sp in sub.choices.values():
        sp.add_argument("--variant", help="a variant of the study file (e.g. full); run: several, comma-separated "
                                          "(mrpc,rte), run as a queue, one study after the other")
        sp.add_argument("--storage", help="SQLAlchemy URL or journal:///path "
                                                 "(default: the record docs/studies/<name>/journal.log)")
        sp.add_argument("--root", default=str(st.ROOT), help="run directories and default databases (logs/studies)")
    return p


def _open(args):
    """(spec or None, study) for ``status``/``report``: a file gives the name, else the name is given."""
    path = Path(args.study)
    spec = load_spec(path, args.variant) if path.suffix in (".yaml", ".yml") or path.is_file() else None
    return spec, _load(spec.name if spec else args.study + (f"-{args.variant}" if args.variant else ""), args)


def _load(name: str, args):
    """The study ``name`` from --storage, else from its own record (nothing is created to find out)."""
    if not args.storage and not st.record_exists(name, Path(args.root)):
        raise UserError(f"no study record {st.record_path(name, Path(args.root))} (run it first, or give --storage)")
    return st.load(name, st.storage(args.storage or st.default_storage(name, Path(args.root))))


def check_run_options(args) -> None:
    """``study run``'s numbers, before anything is opened or written."""
    for option, value in (("--workers", args.workers), ("--threads", args.threads), ("--heartbeat", args.heartbeat),
                          ("--grace", args.grace)):
        if value is not None and value < 1:
            unit = " (seconds)" if option in ("--heartbeat", "--grace") else ""
            raise UserError(f"{option} {value}: must be at least 1{unit}")


def _command(argv: list[str] | None) -> str:
    """The command as typed, for the report; a --storage URL may hold a password, so it is masked, and an absolute
    --data-dir is written relative to the working directory (the checkout it ran in), so that the report's commands
    name no machine's paths and run in any checkout laid out alike."""
    words = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(words):
        if word == "--storage" and i + 1 < len(words):
            words[i + 1] = "URL"
        elif word.startswith("--storage="):
            words[i] = "--storage=URL"
        elif word == "--data-dir" and i + 1 < len(words) and os.path.isabs(words[i + 1]):
            words[i + 1] = os.path.relpath(words[i + 1])
    return "python cli.py study " + shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "run":
            from lit_factor.study.runner import RunOptions, run

            check_run_options(args)
            opts = RunOptions(workers=args.workers, storage=args.storage, root=Path(args.root),
                              data_dir=args.data_dir, gpus=args.gpus.split(",") if args.gpus else None,
                              threads=args.threads, heartbeat=args.heartbeat, grace=args.grace,
                              retry_errors=args.retry_errors)
            variants = args.variant.split(",") if args.variant else [None]
            if len(set(variants)) != len(variants):
                raise UserError(f"--variant {args.variant}: a variant is named twice")
            return run(args.file, [(load_spec(args.file, v), v) for v in variants], opts, _command(argv))
        spec, study = _open(args)
        if args.command == "status":
            from lit_factor.study.status import cell_table

            print(f"study {study.study_name}")
            print(cell_table(study))
            return 0
        from lit_factor.study.report import write_report

        names = dict.fromkeys([*(spec.report_with if spec else []), *args.joined])
        joined = [_load(name, args) for name in names if name != study.study_name]
        written = write_report(study, Path(args.out), publish=args.publish and Path(args.publish),
                               tensorboard=args.tensorboard and Path(args.tensorboard),
                               command=_command(argv), reread=args.reread, joined=joined,
                               order=load_spec(args.study).search_space() if spec and joined else None)
        for what, path in written.items():
            print(f"wrote {what}: {path}")
        return 0
    except UserError as err:
        fail(err)


if __name__ == "__main__":
    raise SystemExit(main())
