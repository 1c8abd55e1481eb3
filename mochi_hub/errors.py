"""Errors a user can fix, told apart from bugs.

A `UserError` is something the person at the command line can put right: an option, an input file, the disk, the
network, a run stopped on purpose. Its message says what happened and names the option or the file; the CLI prints it
as one line (`Error: ...`) and exits with its `exit_code`. Any other exception is a bug and keeps its traceback.

    OptionError  an option or argument wrong on its face, found before any work             exit 2 (usage)
    InputError   an input whose content cannot be used (a corrupt checkpoint, bad annotations) exit 1
    UserError    anything else the user can fix, found while working (a full disk, a stopped run) exit 1

This module is a leaf: every layer, `mochi_hub.config` included, may raise these.
"""

from __future__ import annotations

import errno

USAGE, FAILURE = 2, 1  # exit codes: bad usage, a failure at run time


class UserError(Exception):
    """Something the user can fix, found while working: exit 1, one line, no traceback."""

    exit_code = FAILURE


class OptionError(UserError, ValueError):
    """An option or argument that is wrong on its face (a value out of range, a name that exists nowhere, a path
    that cannot be read or written), found before any work: exit 2, as a usage error."""

    exit_code = USAGE


class InputError(UserError, ValueError):
    """An input whose content cannot be used (a corrupt or foreign file, a folder of the wrong layout), found while
    reading it: exit 1."""


class DiskFullError(UserError):
    """The disk (or the user's quota) filled up while writing; the message names the file and what survived."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, from Python's own I/O or from safetensors' Rust writer (which reports "os error 28")."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"(os error {errno.ENOSPC})" in str(error) or f"(os error {errno.EDQUOT})" in str(error)
