"""The few exceptions the workbench raises on purpose.

Every message says what was wrong and what to do; panels and the CLI show ``str(err)`` as it is.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class: an error whose message is meant for the user."""


class ConfigError(WorkbenchError, ValueError):
    """Bad input (unknown model, bits out of range, group size that does not divide, ...), raised before heavy work."""


class RegistryError(WorkbenchError):
    """The run registry cannot be opened, read or written (corrupt file, wrong schema, driver error)."""


class RunInterrupted(WorkbenchError):
    """A run was cancelled by the user (stop button, Ctrl-C); it is recorded as ``interrupted``."""


__all__ = ["ConfigError", "RegistryError", "RunInterrupted", "WorkbenchError"]
