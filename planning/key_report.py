"""Which checkpoint keys a load ignores and which model tensors it leaves initialised, by transformers' rules.

transformers' ``from_pretrained`` refuses neither unexpected nor missing keys: a checkpoint tensor that
matches nothing is not loaded ("UNEXPECTED"), a model tensor nothing fills keeps the value the model's
``_init_weights`` gives it ("MISSING"), and both are reported — except the keys the model class declares
it expects to see or to lack (``_keys_to_ignore_on_load_unexpected`` / ``_keys_to_ignore_on_load_missing``,
gathered from every submodule) and the legacy buffers older versions saved (per-layer rotary
``inv_freq``, ``position_ids``), which it drops from the report silently. ``classify`` applies those
rules by calling transformers' own ``_adjust_missing_and_unexpected_keys`` on the meta model, so the
lists stay transformers' and are never retyped here.

``KeyReport`` is what a ``LoadPlan`` carries (``plan.keys``) and what ``meshload plan``/``load`` print.

Pure; runs on the driver while planning.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyReport:
    """transformers' loading report for this checkpoint and model class (every list sorted)."""

    unexpected: tuple[str, ...] = ()  # checkpoint tensors not loaded; transformers reports them as UNEXPECTED
    missing: tuple[str, ...] = ()  # model tensors no checkpoint tensor fills, initialised on the ranks (MISSING)
    ignored: tuple[str, ...] = ()  # checkpoint tensors not loaded that the class says to ignore (not reported by transformers)
    ignored_missing: tuple[str, ...] = ()  # model tensors initialised that the class says may be absent (not reported)

    @property
    def clean(self) -> bool:
        """Nothing transformers would report."""
        return not self.unexpected and not self.missing

    def lines(self) -> list[str]:
        """Plain-text lines for a terminal or a job log; empty when there is nothing to say."""
        return [f"{text.format(n=len(names))}: {_clip(names)}" for field, text in _LINES if (names := getattr(self, field))]


_LINES = (
    ("unexpected", "not loaded: {n} checkpoint tensor(s) that match no model tensor (transformers: UNEXPECTED)"),
    ("missing", "initialised: {n} model tensor(s) the checkpoint does not hold, left at their initialised value "
                "(transformers: MISSING)"),
    ("ignored", "ignored: {n} checkpoint tensor(s) the model class declares it ignores"),
    ("ignored_missing", "initialised as the class allows: {n} model tensor(s)"),
)


def _clip(names: tuple[str, ...], limit: int = 12) -> str:
    shown = list(names[:limit])
    return str(shown) if len(names) <= limit else f"{shown[:-1]} ... and {len(names) - limit + 1} more"


def classify(model, *, unexpected: dict[str, str], missing: set[str]) -> KeyReport:
    """Split raw unexpected/missing keys into reported and ignored ones, as transformers does.

    ``unexpected`` maps the key as transformers matches it (after renaming and base-model prefix
    handling) to the checkpoint key it came from; ``missing`` holds model tensor names. ``model``
    is the meta model the plan was made for.
    """
    from transformers.utils.loading_report import LoadStateDictInfo

    info = LoadStateDictInfo(
        missing_keys=set(missing),
        unexpected_keys=set(unexpected),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    model._adjust_missing_and_unexpected_keys(info)
    return KeyReport(
        unexpected=tuple(sorted(unexpected[k] for k in info.unexpected_keys)),
        missing=tuple(sorted(info.missing_keys)),
        ignored=tuple(sorted(unexpected[k] for k in set(unexpected) - info.unexpected_keys)),
        ignored_missing=tuple(sorted(missing - info.missing_keys)),
    )
