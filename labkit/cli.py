"""Command line: `labkit run` (or `python -m labkit run`) executes the notebooks into a run folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from labkit import pipeline


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the ordered notebooks into runs/<name>/")
    run.add_argument("--name", help="run folder name under the runs folder (default: date-time)")
    run.add_argument("--runs-dir", help="folder that holds run folders (default: runs/ of the checkout)")
    run.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a notebook parameter for every notebook that declares it (value read as JSON when it parses)",
    )
    run.add_argument("--only", nargs="+", metavar="NN", help="run only the notebooks with these prefixes")
    run.add_argument("--overwrite", action="store_true", help="allow running into a non-empty run folder")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    run.add_argument("--no-progress", action="store_true", help="hide papermill's progress bars")
    commands.add_parser("params", help="list every notebook's parameters and defaults")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "params":
        for path in pipeline.discover_notebooks():
            print(f"{path.name}: {json.dumps(pipeline.notebook_parameters(path))}")
        return 0
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
    except (pipeline.RunFolderError, pipeline.NotebookFailed, ValueError, FileNotFoundError) as error:
        print(f"labkit run: {error}", file=sys.stderr)
        return 1
    print(f"Run finished: {result.run_dir}")
    for executed in result.executed:
        print(f"  {executed.name}  ({result.seconds[executed.name]} s)")
    print(f"  metrics: {result.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
