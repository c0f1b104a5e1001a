"""The ``meshload`` command: ``plan``, ``load`` and ``bench``.

Works the same under ``ray job submit -- meshload ...`` (it joins the cluster through RAY_ADDRESS)
and prints plain progress lines when its output is not a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

from orchestrator.load_options import LoadOptions
from planning.errors import MeshloadError
from planning.options import PlanOptions, SourceOptions, flag_name

if TYPE_CHECKING:
    from planning.plan import LoadPlan


def add_options(parser: argparse.ArgumentParser, *groups: type) -> None:
    """One flag per field of each option group (``planning.options``, ``orchestrator.load_options``): its
    name, default and help text come from the field; the group validates the value (``OptionError``)."""
    for group in groups:
        for f in fields(group):
            flag = f.metadata["flag"]
            if flag is None:  # a Python object (a class): the API only
                continue
            help_text = f.metadata["help"]
            if flag.switch:
                parser.add_argument(flag_name(f), dest=f.name, action="store_const", const=flag.on, default=f.default,
                                    help=help_text)
            else:
                parser.add_argument(flag_name(f), dest=f.name, type=flag.parse, default=f.default, metavar=flag.metavar,
                                    help=help_text)


def options_from_args(args: argparse.Namespace, *groups: type) -> dict:
    """The API keywords of ``groups`` from parsed flags: a ``from_file`` flag's file read (``read_value_file``)."""
    given = {}
    for group in groups:
        for f in fields(group):
            flag = f.metadata["flag"]
            if flag is None:
                continue
            value = getattr(args, f.name)
            given[f.name] = read_value_file(flag_name(f), value) if flag.from_file and value is not None else value
    return given


def read_value_file(flag: str, path: str) -> str:
    """The value in the first line of ``path`` (``-``: stdin), for a flag that takes a secret from a file
    (``--token-file``): a token on the command line itself would show in ``ps`` to every user of the
    machine and, under ``ray job submit``, in the job's entrypoint."""
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.readline()
    except OSError as exc:
        raise SystemExit(f"meshload: error: {flag} {path}: {exc.strerror}") from None
    value = text.strip()
    if not value:
        raise SystemExit(f"meshload: error: {flag} {path} holds no token")
    return value


def _refuse_token(args) -> None:
    """``--token TOKEN`` is refused (see ``read_value_file``); huggingface_hub otherwise uses ``HF_TOKEN`` or the login."""
    if args.token_argument is not None:
        raise SystemExit(
            "meshload: error: --token puts the token on the command line, where `ps` shows it to every user and "
            "`ray job submit` stores it in the job's entrypoint; use --token-file FILE (or - for stdin), or set "
            "HF_TOKEN / run `hf auth login` on each machine"
        )


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .safetensors file, or Hub repo id")
    p.add_argument("--token", dest="token_argument", default=None, help=argparse.SUPPRESS)  # refused: _refuse_token


def write_picture(plan, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Write the plan's SVG picture (``planning.plan_picture.plan_svg``) to ``path`` (UTF-8); returns the path written."""
    from planning.plan_picture import plan_svg

    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(plan_svg(plan, title=title))
    return path


def cmd_plan(args) -> int:
    from orchestrator.api import plan
    from planning.plan_json import plan_to_json
    from planning.summary import offload_table, rank_table, totals_text

    _refuse_token(args)
    load_plan = plan(args.model, **options_from_args(args, PlanOptions, SourceOptions))
    if args.svg:
        write_picture(load_plan, args.svg)
        print(f"plan picture written to {args.svg}", file=sys.stderr)
    if args.json:
        print(plan_to_json(load_plan, indent=2))
        return 0
    print(totals_text(load_plan))
    print()
    print(rank_table(load_plan))
    offloaded = offload_table(load_plan)
    if offloaded:
        print()
        print(f"offload (layers of {load_plan.layers_path}; embeddings, final norm and head stay on the device)")
        print(offloaded)
    _print_keys(load_plan)
    return 0


def _print_keys(load_plan: LoadPlan) -> None:
    """What transformers would report about the checkpoint's keys (not loaded, initialised), if anything."""
    lines = load_plan.keys.lines()
    if lines:
        print()
        print("\n".join(lines))


def parse_ids(text: str) -> list[list[int]]:
    """``"1,2,3"`` or ``"1,2,3;4,5,6"`` (one row per sequence)."""
    try:
        rows = [[int(x) for x in row.split(",") if x.strip()] for row in text.split(";")]
    except ValueError:
        raise SystemExit(f"--input-ids: expected comma-separated integers (rows separated by ';'), got {text!r}") from None
    if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
        raise SystemExit(f"--input-ids: every row needs the same, non-zero number of ids, got {text!r}")
    return rows


def cmd_load(args) -> int:
    from orchestrator.api import load
    from orchestrator.report_view import report_table
    from planning.plan_json import plan_to_json

    _refuse_token(args)
    with load(args.model, **options_from_args(args, PlanOptions, SourceOptions, LoadOptions)) as m:
        if m.plan_cached:
            print("plan reused from the plan cache (no planning)")
        print(report_table(m))
        _print_keys(m.plan)
        if args.report:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump({"plan": json.loads(plan_to_json(m.plan)), "report": [r.as_dict() for r in m.report]}, f, indent=2)
            print(f"report written to {args.report}")
        if args.input_ids:
            import torch

            ids = torch.tensor(parse_ids(args.input_ids), dtype=torch.long)
            out = m.generate(ids, max_new_tokens=args.max_new_tokens)
            for row in out.tolist():
                print("generated:", ",".join(map(str, row)))
    return 0


def cmd_bench(args) -> int:
    from orchestrator.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshload", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a load (headers only, no cluster) and print it")
    _model_argument(p)
    add_options(p, PlanOptions, SourceOptions)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--svg", default=None, metavar="FILE", help="also draw the plan (nodes, ranks, ties, files) as SVG into FILE")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("load", help="load onto Ray ranks and print the per-rank report")
    _model_argument(p)
    add_options(p, PlanOptions, SourceOptions, LoadOptions)
    p.add_argument("--report", default=None, help="write the plan and report as JSON to this file")
    p.add_argument("--input-ids", default=None, help="token ids for greedy generation across the ranks, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate with --input-ids")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("bench", help="measure meshload against transformers (TP and single) and a naive loader")
    from orchestrator.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except MeshloadError as exc:
        print(f"meshload: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
