"""The error policy's vocabulary: which failures a user can fix, and how to say so in one line.

``UserError`` marks a problem with the user's input (a file, a flag, a config key). The CLI also
treats as the user's: a path that does not exist or cannot be read, and the ``ValueError`` /
``KeyError`` / ``TypeError`` our own code raises to reject an input (its message names the file
and line, key or flag at fault). The same exception types raised inside a library (JAX, NumPy)
are unexpected: they get the exception type and the ``-v`` hint.
"""

from __future__ import annotations

import errno
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)

# OS errors about a path or an address the user named.
_USER_OS_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EADDRINUSE,
    errno.ECONNREFUSED,
    errno.EADDRNOTAVAIL,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}


class UserError(Exception):
    """An input problem the user can fix; the message says what is wrong and what is accepted."""


def _raised_by_us(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR)


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, UserError):
        return True
    if isinstance(err, OSError) and err.errno in _USER_OS_ERRNOS:
        return True
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    return isinstance(err, (ValueError, KeyError, TypeError)) and _raised_by_us(err)


def one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError quotes its argument; OS errors name the path)."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror.lower()}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
