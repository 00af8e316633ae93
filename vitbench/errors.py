"""The one error type a user sees as one line, and how an edge prints it.

Every module raises its own subclass (DataError, PrecisionError, ...) for input the user must fix; only the
command-line edges turn it into `error: ...` and exit status 2, each through `exit_status` (report.py,
prep_shards.py, `python -m vitbench.data.demo`) or `print_user_error` (train_vit.py's edge, vitbench.cli.run).
"""

import sys


class UserError(Exception):
    """Bad input or a state the user must change: one line naming the file or flag, never a traceback."""


EXIT_USER_ERROR = 2


def one_line(e: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its worker's traceback (the
    re-raised error keeps the type and carries the original's `Type: message` as its last line)."""
    text = str(e).strip()
    marker = f"{type(e).__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text.splitlines()[-1] if text else repr(e)


def print_user_error(e: UserError) -> int:
    """E as the one line a user reads, on stderr; returns the exit status that goes with it."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR


def exit_status(command, *args, **kwargs) -> int:
    """COMMAND(*ARGS, **KWARGS)'s exit status (0 when it returns None); a UserError it raises is one line and
    EXIT_USER_ERROR, never a traceback."""
    try:
        code = command(*args, **kwargs)
    except UserError as e:
        return print_user_error(e)
    return 0 if code is None else code
