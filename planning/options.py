"""The options of a plan and of resolving a checkpoint, each declared once: a frozen dataclass per group.

Every field carries its type, its default, its help text and how the ``meshload`` command line writes it
(``option``); ``__post_init__`` validates the values once, where the object is made, with an
``OptionError`` naming the option and the value. The API's keywords (``orchestrator.plan``/``load``) are
these fields, the command line's flags are built from them (``orchestrator.cli``), and the objects travel
whole: ``PlanOptions`` into ``planning.planner.make_plan``, ``SourceOptions`` into
``workers.sources.resolve_model``. The load's own group (cluster, ranks, fetch) is
``orchestrator.load_options.LoadOptions``, declared the same way.

Pure data: no Ray, no I/O. Runs on the driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from planning.errors import OptionError, PlanError

if TYPE_CHECKING:
    import torch
    from transformers.utils.quantization_config import QuantizationConfigMixin

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cpu", "cuda")
FETCH_MODES = ("files", "ranges")  # how a node fetches (planning.fetch_list): whole files, or the ranges read


@dataclass(frozen=True)
class Flag:
    """How the command line writes one option: ``--name VALUE`` parsed by ``parse``, or a switch that sets
    ``on`` when given, or (``from_file``) the path of a file whose first line is the value (a secret kept off
    the command line). ``name`` defaults to the field's name with dashes."""

    name: str | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    switch: bool = False
    on: Any = True
    from_file: bool = False


def option(default: Any, help: str, *, flag: Flag | None = Flag(), no_flag: str | None = None, secret: bool = False):
    """A field of an option group: its default, its help text and its command-line flag (``flag=None``
    with ``no_flag`` saying why the command line has none: a Python object). ``secret``: left out of
    ``repr`` (a token)."""
    if flag is None and not no_flag:
        raise TypeError("an option without a command-line flag must say why (no_flag=...)")
    return field(default=default, repr=not secret, metadata={"help": help, "flag": flag, "no_flag": no_flag})


def flag_name(f: dataclasses.Field) -> str | None:
    """The command-line flag of option field ``f`` (``--cache-dir``), or None if it has none."""
    flag = f.metadata["flag"]
    if flag is None:
        return None
    return flag.name or "--" + f.name.replace("_", "-")


def changed(options) -> dict[str, Any]:
    """The options of a group whose values differ from their defaults, by name."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) is not f.default and getattr(options, f.name) != f.default}


def json_object(text: str) -> dict:
    """A command-line JSON object (``--tp-plan '{"glob": "colwise"}'``)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def memory_budget(text: str) -> str | dict:
    """``--max-memory``: a size (``40GiB``) or a JSON object (``{"cuda": "20GiB", "cpu": "64GiB"}``, or per rank
    ``{"0": {...}}``: JSON keys are strings, so digit keys are ranks)."""
    if not text.lstrip().startswith("{"):
        return text
    return {int(k) if k.isdigit() else k: v for k, v in json_object(text).items()}


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(f"{name}={value!r} must be a positive integer")


def _mapping_or_none(name: str, value: object) -> None:
    if value is not None and not isinstance(value, dict):
        raise OptionError(f"{name}={value!r}: expected a dict (or None)")


@dataclass(frozen=True)
class PlanOptions:
    """What plan to make: topology, dtype, device, TP plan overrides, offload, model class, conversions."""

    tp: int = option(1, "tensor-parallel degree (ranks per stage)", flag=Flag(parse=int))
    pp: int = option(1, "pipeline-parallel degree (stages)", flag=Flag(parse=int))
    nodes: int = option(1, "number of nodes to spread the ranks over (contiguous blocks)", flag=Flag(parse=int))
    dtype: str | torch.dtype = option("auto", "'auto' (config, else the checkpoint's dtype) or e.g. bfloat16, float32")
    device: str = option("cpu", "where the ranks compute: cpu or cuda", flag=Flag(metavar="{cpu,cuda}"))
    attn_implementation: str | None = option(
        None, "sdpa, eager or flash_attention_2; default: transformers' choice for the class (sdpa where supported)",
        flag=Flag(metavar="{sdpa,eager,flash_attention_2}"),
    )
    model_class: str | None = option(None, "transformers class to build, e.g. BertModel (default: config's architectures)")
    tp_plan: dict[str, str] | None = option(
        None, "JSON object of glob -> style overriding the model's TP plan", flag=Flag(parse=json_object, metavar="JSON"))
    device_map: dict[str, int | str] | None = option(
        None, "JSON object: module prefix -> stage index, \"cpu\" or \"disk\" (e.g. '{\"model.layers.20\": \"disk\"}')",
        flag=Flag(parse=json_object, metavar="JSON"),
    )
    max_memory: Any = option(
        None, "per-rank parameter budget, e.g. 40GiB, or JSON per device (offloads what does not fit): "
              "'{\"cuda\": \"20GiB\", \"cpu\": \"64GiB\"}'", flag=Flag(parse=memory_budget, metavar="SIZE|JSON"),
    )
    renamings: dict[str, str] | None = option(
        None, "JSON object of extra checkpoint -> model key renamings (transformers' key_mapping), e.g. '{\"old_prefix\": \"new_prefix\"}'",
        flag=Flag(parse=json_object, metavar="JSON"),
    )
    quantization: QuantizationConfigMixin | dict | None = option(
        None, "a pre-quantized checkpoint (FP8): read as published, dequantized on each rank to --dtype",
        flag=Flag(name="--dequantize", switch=True, on={"dequantize": True}),
    )

    def __post_init__(self) -> None:
        from planning.build import node_blocks

        for name in ("tp", "pp", "nodes"):
            _positive_int(name, getattr(self, name))
        try:
            node_blocks(self.tp * self.pp, self.nodes)
        except PlanError as exc:  # nodes without a rank
            raise OptionError(str(exc)) from None
        if not isinstance(self.dtype, str) and type(self.dtype).__name__ != "dtype":  # a torch.dtype, torch not imported
            # (a dtype name is checked where it is resolved, against the config: planning.planner.resolve_dtype)
            raise OptionError(f"dtype={self.dtype!r}: expected 'auto', a dtype name or a torch.dtype")
        if self.device not in DEVICES:
            raise OptionError(f"device={self.device!r}: expected one of {DEVICES}")
        attn = self.attn_implementation
        if attn is not None and attn not in ATTENTION_IMPLEMENTATIONS:
            raise OptionError(
                f"attn_implementation={attn!r}: expected one of {ATTENTION_IMPLEMENTATIONS} (or None for transformers' choice)"
            )
        if attn == "flash_attention_2":
            from planning.skeleton import flash_attention_available

            if self.device != "cuda":
                raise OptionError("attn_implementation='flash_attention_2' needs device='cuda' (flash-attn has no CPU kernels)")
            if not flash_attention_available():
                raise OptionError(
                    "attn_implementation='flash_attention_2' but flash-attn is not installed here "
                    "(pip install 'meshload[flash]'); no weight was fetched"
                )
        if self.model_class is not None and not isinstance(self.model_class, str):
            raise OptionError(f"model_class={self.model_class!r}: expected a transformers class name")
        for name in ("tp_plan", "device_map", "renamings"):
            _mapping_or_none(name, getattr(self, name))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class SourceOptions:
    """Where and how the checkpoint is found (``workers.sources``): its version, the Hub cache, credentials."""

    revision: str | None = option(None, "Hub revision (branch, tag or commit)")
    cache_dir: str | os.PathLike | None = option(None, "Hub cache folder (default: $MESHLOAD_CACHE_DIR, else huggingface_hub's)")
    token: str | bool | None = option(
        None, "read the Hub token from FILE ('-': stdin); default: HF_TOKEN or the stored login",
        flag=Flag(name="--token-file", from_file=True, metavar="FILE"), secret=True,
    )
    allow_pickle: bool = option(False, "accept legacy .bin checkpoints (read with weights_only)", flag=Flag(switch=True))

    def __post_init__(self) -> None:
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise OptionError(f"revision={self.revision!r}: expected a branch, tag or commit name")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise OptionError(f"cache_dir={self.cache_dir!r}: expected a folder path")
        if self.token is not None and not isinstance(self.token, (str, bool)):
            raise OptionError(f"token of type {type(self.token).__name__}: expected a string, True/False or None")
        if not isinstance(self.allow_pickle, bool):
            raise OptionError(f"allow_pickle={self.allow_pickle!r}: expected True or False")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))



def option_groups(given: dict[str, Any], *groups: type) -> tuple:
    """One object of each option group in ``groups``, made from the keyword arguments ``given`` (the fields
    of each group, the rest at their defaults); a ``TypeError`` names a keyword no group has."""
    names = [{f.name for f in dataclasses.fields(g)} for g in groups]
    unknown = sorted(set(given) - set().union(*names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}: the options are those of "
                        + ", ".join(g.__name__ for g in groups) + " (planning.options)")
    return tuple(g(**{k: v for k, v in given.items() if k in n}) for g, n in zip(groups, names))
