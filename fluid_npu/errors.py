"""The one user-facing error type.

A ``FluidError`` is bad input a user can fix (a config key, a dataset row, a checkpoint, a prompt, a
CLI flag). Its message names the problem and the fix; the CLI prints it as one line on stderr and
exits non-zero, with the traceback only under ``--debug``. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class FluidError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(FluidError):
    """A configuration key, value or type is wrong."""


class DataError(FluidError):
    """A dataset file or row is wrong."""


class CheckpointError(FluidError):
    """A model, adapter, K-head or trainer checkpoint is missing, truncated or mismatched."""


class NumericalError(FluidError):
    """The model's numbers broke (NaN or inf, an overflow): the message says where and the fix."""
