"""User-facing errors: one ``error: ...`` line on stderr and exit status 2, never a traceback.

Every error that means "your settings or your data are wrong" derives from :class:`UserError`; the command-line
doors (``cli.py`` and its ``study`` / ``analyze`` / ``export`` subcommands) catch it and call :func:`fail`.
Pure Python: every floor of the package may import it.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(ValueError):
    """Bad settings or bad data: reported as one line naming the value and what is allowed (exit status 2)."""


#: exit status of a run that trained but failed (diverged, or ended at or below the majority-class baseline)
EXIT_RUN_FAILED = 3
#: exit status of bad settings or data
EXIT_USAGE = 2
#: exit status of a run stopped by SIGTERM before it finished (128 + 15, the shell's convention)
EXIT_TERMINATED = 143


def fail(message: str | BaseException) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with status 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)
