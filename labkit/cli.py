"""Command line, a thin shell over `labkit.pipeline` and `labkit.experiments`.

- `labkit run`: execute the ordered notebooks into a run folder;
- `labkit params`: every notebook's parameters and defaults;
- `labkit sweep --name NAME -p lr 1e-3 3e-3 -p miner all hard [--seeds 0 1 2]`: a grid of runs;
- `labkit compare RUN...`: the parameters that differ and the metrics side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from labkit import pipeline


def _add_common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--runs-dir", help="folder that holds run folders (default: runs/ of the checkout)")
    command.add_argument("--only", nargs="+", metavar="NN", help="run only the notebooks with these prefixes")
    command.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    command.add_argument("--no-progress", action="store_true", help="hide papermill's progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the ordered notebooks into runs/<name>/")
    run.add_argument("--name", help="run folder name under the runs folder (default: date-time)")
    run.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a notebook parameter for every notebook that declares it (value read as JSON when it parses)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty run folder (the earlier one is moved to <runs>/.replaced/ "
        "first and put back if the new run fails)",
    )
    _add_common(run)
    commands.add_parser("params", help="list every notebook's parameters and defaults")

    sweep = commands.add_parser("sweep", help="run the pipeline for every point of a parameter grid")
    sweep.add_argument("--name", required=True, help="sweep folder under the runs folder")
    sweep.add_argument(
        "-p",
        "--param",
        nargs="+",
        action="append",
        default=[],
        metavar="KEY VALUE",
        help="a grid parameter and its values: -p lr 1e-3 3e-3 (one value: the same for every point)",
    )
    sweep.add_argument("--seeds", nargs="+", type=int, help="run every point with each of these seeds")
    _add_common(sweep)

    compare = commands.add_parser("compare", help="compare runs: differing parameters and metrics")
    compare.add_argument("runs", nargs="+", help="run folders, or sweep folders (standing for their points)")
    compare.add_argument("--metrics", nargs="+", help="metrics to show (default: those every run has)")
    compare.add_argument("--no-group", action="store_true", help="one row per run, seeds not grouped")
    compare.add_argument("--csv", help="also write the table to this CSV file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "params":
        for path in pipeline.discover_notebooks(pipeline_only=False):
            print(f"{path.name}: {json.dumps(pipeline.notebook_parameters(path))}")
        return 0
    if args.command == "compare":
        return _compare(args)
    if args.command == "sweep":
        return _sweep(args)
    params = {key: pipeline.parse_value(value) for key, value in args.param}
    try:
        result = pipeline.run_pipeline(
            params,
            name=args.name,
            runs_dir=args.runs_dir,
            only=args.only,
            overwrite=args.overwrite,
            kernel=args.kernel,
            progress=not args.no_progress,
        )
    except pipeline.RunInterrupted as error:
        print(f"labkit run: {error}", file=sys.stderr)
        return 130
    except (pipeline.RunFolderError, pipeline.NotebookFailed, ValueError, FileNotFoundError) as error:
        print(f"labkit run: {error}", file=sys.stderr)
        return 1
    if result.replaced:
        print(f"The earlier run was moved to {result.replaced}")
    print(f"Run finished: {result.run_dir}")
    for executed in result.executed:
        print(f"  {executed.name}  ({result.seconds[executed.name]} s)")
    print(f"  metrics: {result.run_dir / 'metrics.json'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from labkit import experiments

    grid = {}
    for key, *values in args.param:
        if not values:
            print(f"labkit sweep: -p {key} needs at least one value", file=sys.stderr)
            return 2
        grid[key] = [pipeline.parse_value(v) for v in values]
    try:
        result = experiments.run_sweep(
            args.name,
            grid,
            seeds=args.seeds,
            runs_dir=args.runs_dir,
            only=args.only,
            kernel=args.kernel,
            progress=not args.no_progress,
            report=lambda line: print(line, flush=True),
        )
    except pipeline.RunInterrupted as error:
        print(f"labkit sweep: {error}; rerun the same command to finish the other points", file=sys.stderr)
        return 130
    except (experiments.SweepError, ValueError, FileNotFoundError) as error:
        print(f"labkit sweep: {error}", file=sys.stderr)
        return 1
    print(
        f"Sweep {result.sweep_dir}: {len(result.ran)} run, {len(result.skipped)} skipped (finished earlier), "
        f"{len(result.failed)} failed"
    )
    print(f"  summary: {result.sweep_dir / experiments.SUMMARY_CSV}")
    if len(result.summary):
        print(
            experiments.format_comparison(experiments.compare([result.sweep_dir]))
            if not result.failed and all(result.summary["state"] == "finished")
            else result.summary.to_string(index=False)
        )
    return 1 if result.failed else 0


def _compare(args: argparse.Namespace) -> int:
    from labkit import experiments

    try:
        table = experiments.compare(args.runs, metrics=args.metrics, group_seeds=not args.no_group)
    except (experiments.CompareError, FileNotFoundError) as error:
        print(f"labkit compare: {error}", file=sys.stderr)
        return 1
    print(experiments.format_comparison(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"written to {args.csv}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
