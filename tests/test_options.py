"""The option groups (``planning.options``, ``orchestrator.load_options``) are the one list of options: every
field is a ``meshload`` flag and an API keyword with the same default, a bad value is refused once, with
the same ``OptionError`` through the API and the command line, before any checkpoint is read or any
cluster contacted.

Unit tests: no Ray (the loads here fail on their options before connecting).
"""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

import orchestrator
from orchestrator.cli import build_parser, main, options_from_args
from orchestrator.load_options import LoadOptions
from planning.errors import OptionError, PlanError
from planning.options import PlanOptions, SourceOptions, flag_name, option_groups

COMMANDS = {"plan": (PlanOptions, SourceOptions), "load": (PlanOptions, SourceOptions, LoadOptions)}
API = {"plan": orchestrator.plan, "load": orchestrator.load}


def _subparser(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_a_flag_of_the_command_with_the_same_default(command):
    sub = _subparser(command)
    flags = {s: a for a in sub._actions for s in a.option_strings}
    parsed = build_parser().parse_args([command, "some/model"])
    given = options_from_args(parsed, *COMMANDS[command])
    for group in COMMANDS[command]:
        for f in fields(group):
            name = flag_name(f)
            if name is None:
                assert f.metadata["no_flag"], f"{group.__name__}.{f.name} has no flag and says not why"
                continue
            assert name in flags, f"{group.__name__}.{f.name}: no {name} flag on `meshload {command}`"
            assert flags[name].dest == f.name
            assert flags[name].help == f.metadata["help"]
            assert given[f.name] == f.default, f"{name}: default {given[f.name]!r}, the option's is {f.default!r}"


def test_only_python_objects_have_no_flag():
    no_flag = {f.name for g in (PlanOptions, SourceOptions, LoadOptions) for f in fields(g) if flag_name(f) is None}
    assert no_flag == {"worker_cls", "fetcher_cls"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_a_keyword_of_the_api_with_the_same_default(command):
    signature = inspect.signature(API[command])
    params = signature.parameters
    rest = [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    for group in COMMANDS[command]:
        for f in fields(group):
            if f.name in params:
                assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
                assert params[f.name].default == f.default, f"{command}({f.name}=...): default differs from the option's"
            else:  # load passes the plan's options on as **plan_options
                assert command == "load" and group is not LoadOptions and rest, f"{command} has no keyword {f.name}"
    declared = {f.name for g in COMMANDS[command] for f in fields(g)}
    assert set(params) - {"model"} - {p.name for p in rest} <= declared, "a keyword that no option group declares"


BAD = [
    # (options, flags, message)
    (dict(tp=0), ["--tp", "0"], "tp=0 must be a positive integer"),
    (dict(tp=2, nodes=3), ["--tp", "2", "--nodes", "3"], "nodes=3 but only 2 rank(s)"),
    (dict(device="tpu"), ["--device", "tpu"], "device='tpu': expected one of ('cpu', 'cuda')"),
    (dict(attn_implementation="fast"), ["--attn-implementation", "fast"], "attn_implementation='fast': expected one of"),
    (dict(attn_implementation="flash_attention_2"), ["--attn-implementation", "flash_attention_2"], "needs device='cuda'"),
    (dict(tp_plan=["colwise"]), None, "tp_plan=['colwise']: expected a dict"),
]
BAD_LOAD = [
    (dict(fetch="everything"), ["--fetch", "everything"], "fetch='everything': expected one of ('files', 'ranges')"),
    (dict(fetch_gap_bytes=-1), ["--fetch-gap", "-1"], "fetch_gap_bytes=-1 must be a whole number of bytes >= 0"),
    (dict(max_restarts=-1), ["--max-restarts", "-1"], "max_restarts=-1 must be a whole number >= 0"),
    (dict(timeout_s=0.0), ["--timeout", "0"], "timeout_s=0.0 must be a positive number"),
    (dict(cpus_per_rank=0.0), ["--cpus-per-rank", "0"], "cpus_per_rank=0.0 must be a positive number"),
]


def _same_error(capsys, command: str, model: str, options: dict, flags: list[str] | None, message: str) -> None:
    with pytest.raises(OptionError) as err:
        API[command](model, **options)
    assert message in str(err.value)
    assert isinstance(err.value, PlanError)  # callers catching PlanError (or ValueError) still do
    if flags is not None:
        capsys.readouterr()
        assert main([command, model, *flags]) == 2
        assert capsys.readouterr().err.strip() == f"meshload: error: {err.value}"


@pytest.mark.parametrize(("options", "flags", "message"), BAD)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_plan_option_is_the_same_error_through_api_and_cli(tmp_path, capsys, command, options, flags, message):
    """Refused before the model is looked at: the model here does not exist."""
    _same_error(capsys, command, str(tmp_path / "absent"), options, flags, message)


@pytest.mark.parametrize(("options", "flags", "message"), BAD_LOAD)
def test_a_bad_load_option_is_the_same_error_through_api_and_cli(tmp_path, capsys, options, flags, message):
    """Refused before planning and before any cluster is contacted (the address would fail)."""
    _same_error(capsys, "load", str(tmp_path / "absent"), {**options, "address": "127.0.0.1:1"},
                [*flags, "--address", "127.0.0.1:1"], message)


def test_a_keyword_no_group_declares_is_a_type_error_naming_it(tmp_path):
    with pytest.raises(TypeError, match="tensor_parallel"):
        orchestrator.plan(str(tmp_path), tensor_parallel=2)
    with pytest.raises(TypeError, match=r"\['tensor_parallel'\]"):
        orchestrator.load(str(tmp_path), tensor_parallel=2)


def test_groups_are_frozen_and_the_token_stays_out_of_repr():
    source = SourceOptions(token="hf_secret", cache_dir="/tmp/c")
    assert "hf_secret" not in repr(source)
    with pytest.raises(AttributeError):
        source.token = "other"  # type: ignore[misc]
    plan, source2 = option_groups(dict(tp=2, revision="v1"), PlanOptions, SourceOptions)
    assert (plan.tp, plan.pp, source2.revision) == (2, 1, "v1")


def test_flags_reach_the_api_as_the_options_they_name(tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_abc\n")
    args = build_parser().parse_args([
        "load", "m", "--tp", "2", "--dequantize", "--token-file", str(token), "--plan-cache", "off",
        "--no-zero-copy", "--fetch", "files", "--fetch-gap", "0", "--max-memory", '{"0": "1GiB"}',
        "--renamings", '{"a.": "b."}',
    ])
    given = options_from_args(args, *COMMANDS["load"])
    plan, source, load = option_groups(given, *COMMANDS["load"])
    assert (plan.tp, plan.quantization, plan.max_memory, plan.renamings) == (2, {"dequantize": True}, {0: "1GiB"}, {"a.": "b."})
    assert source.token == "hf_abc"
    assert (load.plan_cache, load.zero_copy, load.fetch, load.fetch_gap_bytes) == (False, False, "files", 0)
    fetch = load.fetch_options()
    assert (fetch.mode, fetch.max_gap_bytes) == ("files", 0)


def test_the_readme_table_of_options_names_every_option_and_no_other():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("Options of `plan` and `load`"):readme.index("Errors are typed")]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    declared = {f.name for g in (PlanOptions, SourceOptions, LoadOptions) for f in fields(g)}
    assert documented == declared, f"README only: {documented - declared}; undocumented: {declared - documented}"


def test_the_plan_cache_key_is_the_options_whatever_way_they_were_given(tmp_path):
    """A plan is cached under its topology and every option given a value other than its default: the same
    options (a default written out or left out) reuse it; another dtype, or where the token lives, do not."""
    from orchestrator.api import _Planning
    from tests import checkpoints

    path = checkpoints.llama(str(tmp_path / "llama"))
    cache = str(tmp_path / "plans")

    def start(**given):
        plan, source = option_groups(given, PlanOptions, SourceOptions)
        return _Planning.start(path, plan, source, plan_cache=cache)

    first = start(tp=2, nodes=2, dtype="float32")
    assert not first.cached and first.result().dtype == "float32"
    again = start(tp=2, nodes=2, dtype="float32", pp=1, model_class=None, cache_dir=str(tmp_path / "hub"))
    assert again.cached and again.result() == first.result()
    other = start(tp=2, nodes=2, dtype="bfloat16")
    assert not other.cached and other.result().dtype == "bfloat16"


def test_making_the_options_imports_neither_numpy_nor_torch():
    """A driver given a cached plan imports no heavy module until it handles tensors (tests/test_plan_cache.py):
    the options of a load, fetch options included, are made without them."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from orchestrator.cli import build_parser, options_from_args\n"
        "from orchestrator.load_options import LoadOptions\n"
        "from planning.options import PlanOptions, SourceOptions, option_groups\n"
        "args = build_parser().parse_args(['load', 'm', '--tp', '2', '--nodes', '2', '--fetch', 'files'])\n"
        "option_groups(options_from_args(args, PlanOptions, SourceOptions, LoadOptions), PlanOptions, SourceOptions, LoadOptions)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('numpy', 'torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
