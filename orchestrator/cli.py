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
from typing import TYPE_CHECKING

from planning.errors import MeshloadError

if TYPE_CHECKING:
    from planning.plan import LoadPlan


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .safetensors file, or Hub repo id")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (ranks per stage)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (stages)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes to spread the ranks over")
    p.add_argument("--dtype", default="auto", help="'auto' (config/checkpoint) or e.g. bfloat16, float32")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--attn-implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                   help="default: transformers' choice for the class (sdpa where supported, else eager)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the Hub token from FILE ('-': stdin); default: HF_TOKEN or the stored login")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: see read_token
    p.add_argument("--model-class", default=None, help="transformers class to build, e.g. BertModel")
    p.add_argument("--tp-plan", default=None, help="JSON object of glob -> style overriding the TP plan")
    p.add_argument("--max-memory", default=None, type=_max_memory,
                   help="per-rank parameter budget, e.g. 40GiB, or JSON per device (offloads what does not fit): "
                        "'{\"cuda\": \"20GiB\", \"cpu\": \"64GiB\"}'")
    p.add_argument("--device-map", default=None, type=json.loads,
                   help="JSON object: module prefix -> stage index, \"cpu\" or \"disk\" (e.g. '{\"model.layers.20\": \"disk\"}')")
    p.add_argument("--allow-pickle", action="store_true", help="accept legacy .bin checkpoints (weights_only)")
    p.add_argument("--dequantize", action="store_true",
                   help="a pre-quantized checkpoint (FP8): read as published, dequantized on each rank to --dtype")


def _max_memory(text: str):
    """``--max-memory``: a size (``40GiB``) or a JSON object (``{"cuda": "20GiB", "cpu": "64GiB"}``, or per rank
    ``{"0": {...}}``: JSON keys are strings, so digit keys are ranks)."""
    if not text.lstrip().startswith("{"):
        return text
    value = json.loads(text)
    return {int(k) if k.isdigit() else k: v for k, v in value.items()}


def read_token(args) -> str | None:
    """The Hub token from ``--token-file`` (a file, or ``-`` for stdin), else None (huggingface_hub then uses
    ``HF_TOKEN`` or the stored login). A token on the command line itself is refused: it would show in
    ``ps`` to every user of the machine and, under ``ray job submit``, in the job's entrypoint."""
    if args.token is not None:
        raise SystemExit(
            "meshload: error: --token puts the token on the command line, where `ps` shows it to every user and "
            "`ray job submit` stores it in the job's entrypoint; use --token-file FILE (or - for stdin), or set "
            "HF_TOKEN / run `hf auth login` on each machine"
        )
    if args.token_file is None:
        return None
    try:
        if args.token_file == "-":
            text = sys.stdin.readline()
        else:
            with open(args.token_file, encoding="utf-8") as f:
                text = f.readline()
    except OSError as exc:
        raise SystemExit(f"meshload: error: --token-file {args.token_file}: {exc.strerror}") from None
    token = text.strip()
    if not token:
        raise SystemExit(f"meshload: error: --token-file {args.token_file} holds no token")
    return token


def _plan_kwargs(args) -> dict:
    return dict(
        tp=args.tp,
        pp=args.pp,
        nodes=args.nodes,
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn_implementation,
        revision=args.revision,
        cache_dir=args.cache_dir,
        token=read_token(args),
        model_class=args.model_class,
        tp_plan=json.loads(args.tp_plan) if args.tp_plan else None,
        max_memory=args.max_memory,
        device_map=args.device_map,
        allow_pickle=args.allow_pickle,
        quantization={"dequantize": True} if args.dequantize else None,
    )


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

    load_plan = plan(args.model, **_plan_kwargs(args))
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

    kwargs = _plan_kwargs(args)
    plan_cache = {None: True, "off": False}.get(args.plan_cache, args.plan_cache)
    with load(args.model, address=args.address, timeout_s=args.timeout, fetch=args.fetch,
              fetch_gap_bytes=args.fetch_gap, plan_cache=plan_cache, **kwargs) as m:
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
    _common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--svg", default=None, metavar="FILE", help="also draw the plan (nodes, ranks, ties, files) as SVG into FILE")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("load", help="load onto Ray ranks and print the per-rank report")
    _common(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, a running cluster, or embedded)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a step of the load is abandoned")
    p.add_argument("--fetch", choices=["ranges", "files"], default=None,
                   help="Hub checkpoints: download only the byte ranges the node's ranks read (default) or whole files")
    p.add_argument("--fetch-gap", type=int, default=None, metavar="BYTES",
                   help="ranges closer than this are downloaded as one request (default 1 MiB; 0 = exact)")
    p.add_argument("--plan-cache", default=None, metavar="DIR|off",
                   help="reuse plans kept here (default: $MESHLOAD_PLAN_CACHE or ~/.cache/meshload/plans); 'off' to always plan")
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
