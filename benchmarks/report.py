"""docs/performance.md, rendered from the JSON results in benchmarks/results/ (nothing is measured here).

    python -m benchmarks.report                      # benchmarks/results/*.json → docs/performance.md
    python -m benchmarks.report --results DIR --out DIR/performance.md

`render_page` fills the template ``performance.md.j2`` (and ``serving.md.j2`` for §6) with the figures of
``run_all.json`` (the run: command, date, machine), ``train_step.json``, ``train_step_all.json``,
``train_precision.json``, ``layers.json``, ``inference.json``, ``federated.json``, ``scaling.json``,
``serving.json`` and ``scoring.json``; a missing file drops its section. The tables are built by the functions of ``tables.py``;
the prose, with its placeholders, lives in the templates, so no figure is typed by hand (tests/test_benchmarks.py
re-renders the committed page).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jinja2

from asymlora.io import atomic_write_text

try:  # imported as the package `benchmarks` (the tests, `python -m benchmarks.report`)
    from benchmarks import tables
    from benchmarks.common import RESULTS, ROOT
except ImportError:  # run as a script: Python puts this folder first on sys.path
    import tables
    from common import RESULTS, ROOT

HERE = Path(__file__).resolve().parent
RESULT_FILES = (
    "run_all",
    "train_step",
    "train_step_all",
    "train_precision",
    "layers",
    "inference",
    "federated",
    "scaling",
    "serving",
    "scoring",
)
"""The JSON files of a results folder, by stem (``<stem>.json``)."""


def load_results(results: Path) -> dict[str, Any]:
    """Every present ``<stem>.json`` of `RESULT_FILES` in ``results``, by stem (None when absent).

    Raises FileNotFoundError when ``run_all.json`` (the run's command, date and machine) is missing."""
    if not (results / "run_all.json").is_file():
        raise FileNotFoundError(
            f"{results / 'run_all.json'} not found: run `python benchmarks/run_all.py` (it writes every "
            "result there), or pass --results with a folder that has one"
        )
    return {
        stem: json.loads((results / f"{stem}.json").read_text())
        if (results / f"{stem}.json").is_file()
        else None
        for stem in RESULT_FILES
    }


def environment() -> jinja2.Environment:
    """The templates' environment: ``fmt`` (Python's format spec) and ``ratio`` (``1.020×``) filters, the table
    builders of ``tables.py`` as globals; undefined names raise instead of rendering as blanks."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters["fmt"] = format
    env.filters["ratio"] = tables.fmt_ratio
    env.globals.update({name: getattr(tables, name) for name in tables.TEMPLATE_FUNCTIONS})
    return env


def reproduce_commands(res: dict[str, Any]) -> list[str]:
    """The command of every benchmark in the page, in the page's order (serving, then scoring, last).

    ``train_precision``, ``serving`` and ``scoring`` carry their own ``command`` (they are usually run alone,
    with ``--save``); the others the ``_run`` record of ``run_all.py``."""
    keys = ("layers", "train_step", "train_step_all", "train_precision", "inference", "scaling", "federated")
    commands = []
    for key in keys:
        found = res.get(key) or {}
        command = found.get("command") if key == "train_precision" else found.get("_run", {}).get("command")
        if command:
            commands.append(command)
    commands += [res[key]["command"] for key in ("serving", "scoring") if res.get(key)]
    return commands


def render_page(results: Path = RESULTS, plot: str | None = "scaling.png") -> str:
    """docs/performance.md from the JSON files in ``results`` (see the module docstring); ``plot`` is the
    scaling figure's path relative to the page (None: no image)."""
    res = load_results(results)
    run = res["run_all"]
    trows = tables.target_rows(res)
    for row in trows:
        row["why"] = tables.why_missed(row, res)
    context = {
        "run": run,
        "mach": run["machine"],
        "ts": res["train_step"],
        "ts7": res["train_step_all"],
        "tp": res["train_precision"],
        "ly": res["layers"],
        "inf": res["inference"],
        "fed": res["federated"],
        "sc": res["scaling"],
        "sv": res["serving"],
        "scr": res["scoring"],
        "plot": plot,
        "targets_table": tables.targets_table(trows),
        "missed": [row for row in trows if not row["met"]],
        "commands": reproduce_commands(res),
    }
    return environment().get_template("performance.md.j2").render(context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md", help="the page written")
    parser.add_argument("--no-plot", action="store_true", help="leave the scaling plot out of the page")
    args = parser.parse_args(argv)
    try:
        page = render_page(args.results, None if args.no_plot else "scaling.png")
    except FileNotFoundError as e:
        print(f"benchmarks/report.py: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, page)
    print(f"wrote {args.out} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
