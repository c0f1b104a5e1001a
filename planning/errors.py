"""Typed errors for everything a user can get wrong before a single weight byte is read.

Each class is also a ``ValueError`` so callers that only know the standard library can catch it.
Messages always name the file, tensor, rank or dimension involved and the values that disagree.
"""

from __future__ import annotations


class MeshloadError(Exception):
    """Base class of every error meshload raises on purpose."""


class CheckpointError(MeshloadError, ValueError):
    """A checkpoint file or index is missing, malformed, truncated or unsafe."""


class ConfigError(MeshloadError, ValueError):
    """``config.json`` cannot be turned into a model skeleton."""


class ConversionError(MeshloadError, ValueError):
    """Checkpoint names/layouts cannot be mapped onto the model's parameters."""


class PlanError(MeshloadError, ValueError):
    """The requested topology (tp, pp, nodes, budgets, TP plan) cannot work for this model."""


class OptionError(PlanError):
    """An option of ``plan``/``load`` (or a ``meshload`` flag) has a value it does not accept; the message names
    the option and the value (``planning.options``)."""
