"""The errors mtkd raises on purpose. The CLI turns them into exit codes in one place (cli.py).

`MtkdError` is the root. `BadInputError` and its children mean the user gave us something we refuse
(exit 2, nothing written); every message names the culprit (a file, a flag, a teacher, a row).
"""

from __future__ import annotations


class MtkdError(Exception):
    """Root of mtkd's own errors; anything else escaping a command is a bug (exit 1)."""

    exit_code = 1


class BadInputError(MtkdError, ValueError):
    """The user's input is wrong: a flag, a spec, a file. Exit 2, nothing written."""

    exit_code = 2


class SpecError(BadInputError):
    """A data spec or a model TOML that cannot be parsed, found, imported or built."""


class CheckpointError(SpecError):
    """A checkpoint or TorchScript file that is missing or does not load into its model."""


class StoreMismatchError(BadInputError):
    """A store that does not belong to the data, teachers or model it is used with."""


class IncompleteStoreError(BadInputError):
    """A store whose chosen teachers have rows not yet written."""


class CorruptStoreError(BadInputError):
    """A store whose stored data is damaged: a checksum mismatch, NaN/inf, a record without its chunk."""


class TeacherOutputError(BadInputError):
    """A teacher that returns NaN/inf, the wrong shape, or a class count unlike the others."""


class TeacherFailedError(MtkdError):
    """A teacher that raises while stage one runs, after its first batch passed (exit 1: not the input's fault)."""


class NonFiniteLossError(MtkdError):
    """A training loss that turned NaN/inf: the run stops, its last good checkpoint kept (exit 1)."""


class RunMismatchError(BadInputError):
    """A run directory that cannot be resumed with the given configuration."""
