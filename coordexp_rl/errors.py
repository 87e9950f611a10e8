"""Errors a user fixes in a config or a data file, and how every entry point reports them.

``UserError`` is their common base (``ConfigError``, ``DataError``, ``ImagePathError`` derive from it):
such an error ends a command with its message on stderr and exit code 2, no traceback (``--debug``: the
traceback first). Any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

USER_ERROR_EXIT = 2  # config and data errors (argparse's usage errors exit 2 as well)


class UserError(ValueError):
    """Something the user fixes in a config or a data file; ``kind`` starts the printed line."""

    kind = "error"


def user_error(exc: BaseException) -> UserError | None:
    """``exc`` when it is a UserError, else None. A Ray task's error that wraps one (``RayTaskError``)
    counts as its cause."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # only where Ray is in use already
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc if isinstance(exc, UserError) else None


def report_user_error(exc: BaseException, debug: bool = False) -> int | None:
    """For a config or data error: its message on stderr (after the traceback with ``debug``) and the exit
    code; None for any other error (the caller re-raises it)."""
    found = user_error(exc)
    if found is None:
        return None
    if debug:
        traceback.print_exception(exc)
    print(f"{found.kind}: {found}", file=sys.stderr)
    return USER_ERROR_EXIT


class OverwriteError(UserError):
    """An output path holds something this command did not ask to replace."""


def refuse_overwrite(path: str | Path, force: bool, inputs: tuple = ()) -> None:
    """A command writes its ``--out`` only where nothing is, or where ``--force`` lets it replace what is
    there; never onto one of its own ``inputs`` (even with --force)."""
    out = Path(path).expanduser().resolve()
    for given in inputs:
        if given is not None and Path(given).expanduser().resolve() == out:
            raise OverwriteError(f"--out {path} is an input of this command ({given}); choose another --out")
    if force:
        return
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        kind = "file" if out.is_file() else "non-empty folder"
        raise OverwriteError(f"--out {path} is an existing {kind}; pass --force to replace it, or choose another --out")


def add_force_argument(parser) -> None:
    parser.add_argument("--force", action="store_true", help="replace what --out holds (refused otherwise)")
