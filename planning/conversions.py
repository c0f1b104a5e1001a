"""Map checkpoint tensors onto model parameters, through renames and layout conversions.

transformers v5 declares, per model family, how checkpoint names and layouts become module names
and layouts (``WeightRenaming``, and ``WeightConverter`` with ops such as ``MergeModulelist``,
``Concatenate``, ``Chunk``, ``Split``, ``Transpose``). We use those declarations — and
the family registry's and users' (``register_conversion``), written with the same classes, for layouts transformers does not know — but
instead of running the ops on loaded tensors, we turn each converted parameter into a
``planning.source_expr`` expression, so that planning can map any shard back to source byte ranges.

Keys follow transformers' rules (``planning.key_report``): a checkpoint key that fills nothing is
not loaded and a model tensor nothing fills is initialised on the ranks, as ``from_pretrained`` does,
both reported unless the model class declares them ignorable; the base-model prefix is added or
stripped as transformers does (a ``BertModel`` from a ``BertForMaskedLM`` checkpoint and the
reverse). Tied parameters are filled by their tie partner (whichever side the checkpoint holds). What
transformers refuses is refused here too: a shape that differs from what the config builds, a
conversion that cannot apply. One refusal is meshload's own: a checkpoint none of whose tensors fills
any model tensor (the wrong checkpoint, or names that need ``renamings``).

Pure; runs on the driver over a meta model and the checkpoint index.
"""

from __future__ import annotations

from dataclasses import dataclass

from planning.checkpoint_index import CheckpointIndex
from planning.errors import ConversionError
from planning.families import family_of
from planning.key_report import KeyReport, classify
from planning.quantization import Quantization, layout_quantizer
from planning.skeleton import Skeleton
from planning.source_expr import Cat, Expr, Narrow, Source, Stack, Transpose, check_expr, shape_of, sources_of

# Layouts transformers does not declare, in transformers' own spelling: a family's own (``planning.families``),
# then the user's, added with ``register_conversion`` (same spelling as transformers'
# ``register_checkpoint_conversion_mapping``), keyed by model_type.
MESHLOAD_CONVERSIONS: dict[str, list] = {}


def register_conversion(model_type: str, transforms: list) -> None:
    """Add ``WeightRenaming``/``WeightConverter`` entries for checkpoints of ``model_type``."""
    MESHLOAD_CONVERSIONS.setdefault(model_type, []).extend(transforms)


def extra_conversions(model_type: str) -> list:
    """The conversions meshload adds to transformers' for ``model_type``: its family's, then the user's."""
    family = family_of(model_type)
    return [*(family.conversions if family is not None else ()), *MESHLOAD_CONVERSIONS.get(model_type, [])]


@dataclass(frozen=True)
class SourceMap:
    """Where every tensor of the model comes from."""

    exprs: dict[str, Expr]  # parameter/buffer → expression over checkpoint tensors
    aliases: dict[str, str]  # tied parameter → the parameter whose value it shares
    computed: tuple[str, ...]  # tensors nothing in the checkpoint fills: initialised on the ranks (sorted)
    keys: KeyReport = KeyReport()  # what transformers would report: keys not loaded, tensors initialised


def _transforms(model, renamings: dict[str, str] | None, quantization: Quantization | None) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model, key_mapping=renamings)
    transforms.extend(extra_conversions(model.config.model_type))
    if quantization is not None:  # scales follow their weights (e.g. per-expert scales merged like the experts)
        transforms = layout_quantizer(quantization).update_weight_conversions(transforms, model)
    return transforms


def natural_key(name: str):
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(name)


def build_source_map(
    model, skeleton: Skeleton, index: CheckpointIndex, *, renamings: dict[str, str] | None = None,
    where: str = "checkpoint", quantization: Quantization | None = None,
) -> SourceMap:
    """Match every checkpoint key to the model; see the module docstring. ``quantization``: a pre-quantized
    checkpoint's, whose quantizer extends the conversions to the scales (transformers' ``update_weight_conversions``)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    targets = skeleton.by_name
    if not renamings and not extra_conversions(skeleton.model_type) and set(index.tensors) <= set(targets):
        # Every checkpoint key already names a model tensor (what save_pretrained writes for most families):
        # no renaming or conversion can apply, so skip building transformers' table of all families (~0.2 s).
        exprs = {k: Source(k, e.shape, e.dtype) for k, e in index.tensors.items()}
        return _finish(model, skeleton, exprs, {k: k for k in exprs}, {}, where=where)

    transforms = _transforms(model, renamings, quantization)
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = skeleton.base_model_prefix

    exprs: dict[str, Expr] = {}
    origin: dict[str, str] = {}
    groups: dict[tuple[int, str], dict[str, list[Source]]] = {}
    group_converter: dict[tuple[int, str], object] = {}
    unexpected: dict[str, str] = {}  # as transformers names it (renamed, prefix handled) → checkpoint key
    for key in sorted(index.tensors, key=natural_key):
        entry = index.tensors[key]
        src = Source(key, entry.shape, entry.dtype)
        renamed, pattern = rename_source_key(key, renames, converters, prefix, targets)
        if renamed not in targets and key in targets:
            renamed, pattern = key, None
        if renamed not in targets:
            unexpected[renamed] = key
            continue
        if pattern is None:
            if renamed in exprs:
                raise ConversionError(f"checkpoint tensors {origin[renamed]!r} and {key!r} both map to {renamed!r}")
            exprs[renamed], origin[renamed] = src, key
            continue
        converter = by_pattern[pattern]
        gid = (id(converter), renamed)
        groups.setdefault(gid, {}).setdefault(pattern, []).append(src)
        group_converter[gid] = converter

    for gid, collected in groups.items():
        renamed = gid[1]
        for name, expr in _apply_ops(group_converter[gid], collected, renamed, skeleton).items():
            if name not in targets:
                raise ConversionError(f"conversion of {renamed!r} produced {name!r}, which is not a parameter of the model")
            if name in exprs:
                raise ConversionError(f"parameter {name!r} is filled twice (by {origin.get(name)!r} and by a conversion)")
            exprs[name], origin[name] = expr, renamed
    return _finish(model, skeleton, exprs, origin, unexpected, where=where)


def _finish(
    model, skeleton: Skeleton, exprs: dict[str, Expr], origin: dict[str, str], unexpected: dict[str, str], *, where
) -> SourceMap:
    """Check shapes and dtype kinds, resolve ties, list what is initialised and what is reported."""
    if not exprs:
        raise ConversionError(
            f"{where}: none of the checkpoint's {len(unexpected)} tensor(s) fills a tensor of {skeleton.class_name} "
            f"(first: {sorted(unexpected.values())[:5]}). Is this the checkpoint of another model? "
            "Pass renamings={'old': 'new'} to map checkpoint names."
        )
    targets = skeleton.by_name
    mismatched = []
    for spec in skeleton.tensors:
        name = spec.name
        expr = exprs.get(name)
        if expr is None:
            continue
        try:
            check_expr(expr, what=name)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        _check_kinds(name, expr, spec.dtype, origin[name])
        got = shape_of(expr)
        if got != spec.shape:
            mismatched.append(f"{name!r}: checkpoint {list(got)} (from {origin[name]!r}), model {list(spec.shape)}")
    if mismatched:
        raise ConversionError(
            f"{len(mismatched)} parameter(s) whose checkpoint shape differs from what config.json builds: "
            + "; ".join(mismatched)
        )

    aliases = _resolve_ties(skeleton, exprs)
    unfilled = {spec.name for spec in skeleton.tensors if spec.name not in exprs}
    computed = sorted(n for n in unfilled if n not in aliases)
    # transformers reports a tied tensor as missing only when neither side of the tie was in the checkpoint
    missing = {n for n in unfilled if n not in aliases or aliases[n] in unfilled}
    return SourceMap(
        exprs=exprs,
        aliases=aliases,
        computed=tuple(computed),
        keys=classify(model, unexpected=unexpected, missing=missing),
    )


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def _check_kinds(name: str, expr: Expr, want: str, origin: str) -> None:
    """A cast between widths is fine (bf16 → fp32); between kinds (int32 → float) the checkpoint is wrong."""
    for src in sources_of(expr):
        if _is_float(src.dtype) != _is_float(want):
            raise ConversionError(
                f"parameter {name!r}: checkpoint tensor {src.tensor!r} is {src.dtype} but the model expects {want}; "
                f"the checkpoint does not match config.json"
            )


def _resolve_ties(skeleton: Skeleton, exprs: dict[str, Expr]) -> dict[str, str]:
    """Tied parameters take the value of whichever side the checkpoint holds (transformers' symmetric rule)."""
    aliases = {}
    for target, source in skeleton.ties.items():
        if target in exprs and source in exprs:
            continue  # both stored: each is read (transformers compares them and ties equal ones; values are the same)
        if target in exprs:
            aliases[source] = target
        else:  # the source holds the value, read or (neither side stored) initialised, as transformers ties them
            aliases[target] = source
    return aliases


def _apply_ops(converter, collected: dict[str, list[Source]], renamed: str, skeleton: Skeleton) -> dict[str, Expr]:
    """Run the converter's ops symbolically, mirroring transformers' ``convert`` semantics."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Split
    from transformers.core_model_loading import Transpose as TfTranspose

    sources, targets = list(converter.source_patterns), list(converter.target_patterns)
    state: dict[str, list[Expr] | Expr] = dict(collected)
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            n = len(state)
            new: dict[str, list[Expr] | Expr] = {}
            for pattern, value in state.items():
                name = targets[0] if n == 1 else pattern
                new[name] = Stack(tuple(value), op.dim) if isinstance(value, list) else value
            state = new
        elif isinstance(op, Concatenate):
            parts: list[Expr] = []
            for pattern in sources:
                if pattern in state:
                    value = state.pop(pattern)
                    parts.extend(value if isinstance(value, list) else [value])
            state = {targets[0]: Cat(tuple(parts), op.dim)}
        elif isinstance(op, (Chunk, Split)):
            (value,) = state.values()
            expr = value[0] if isinstance(value, list) else value
            size = shape_of(expr)[op.dim]
            if isinstance(op, Chunk):  # torch.chunk: equal parts of ceil(size / n), the last ones shorter
                if op.num_shards_attribute is not None:
                    raise ConversionError(f"{renamed}: Chunk(num_shards_attribute=...) is not supported by meshload")
                step = -(-size // len(targets))
                lengths = [max(0, min(step, size - i * step)) for i in range(len(targets))]
            else:  # Split: each part sized like the model parameter it becomes
                lengths = [skeleton.by_name[_expand(renamed, targets[0], t)].shape[op.dim] for t in targets]
            state, at = {}, 0
            for name, length in zip(targets, lengths):
                state[name] = Narrow(expr, op.dim, at, length)
                at += length
        elif isinstance(op, TfTranspose):
            (pattern, value), = state.items()
            expr = value[0] if isinstance(value, list) else value
            name = targets[0] if len(targets) == 1 else sources[0]
            if op.check_dims and shape_of(expr) == skeleton.by_name[renamed].shape:
                state = {name: expr}
            else:
                state = {name: Transpose(expr, op.dim0, op.dim1)}
        else:
            raise ConversionError(
                f"{renamed}: conversion op {type(op).__name__} is not supported by meshload's slice planner "
                f"(supported: MergeModulelist, Concatenate, Chunk, Split, Transpose); convert the checkpoint once "
                f"(transformers' from_pretrained, then save_pretrained) and load the converted folder"
            )
    out = {}
    for pattern, value in state.items():
        expr = value[0] if isinstance(value, list) and len(value) == 1 else value
        if isinstance(expr, list):
            raise ConversionError(f"{renamed}: conversion left {len(expr)} unmerged tensors for {pattern!r}")
        out[_expand(renamed, targets[0], pattern)] = expr
    return out


def _expand(renamed: str, first_target: str, pattern: str) -> str:
    """Full parameter name for ``pattern``, given the key renamed with the first target pattern."""
    if first_target in renamed:
        head, _, tail = renamed.partition(first_target)
        return head + pattern + tail
    return renamed
