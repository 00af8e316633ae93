"""The one error type a user sees as one line, and how an edge prints it.

Every module raises its own subclass (DataError, PrecisionError, ...) for input the user must fix; only the
command-line edges turn it into `error: ...` and exit status 2: train_vit.py (vitbench.cli), report.py,
shards/prep_shards.py and `python -m vitbench.demo`.
"""


class UserError(Exception):
    """Bad input or a state the user must change: one line naming the file or flag, never a traceback."""


EXIT_USER_ERROR = 2


def one_line(e: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its worker's traceback (the
    re-raised error keeps the type and carries the original's `Type: message` as its last line)."""
    text = str(e).strip()
    marker = f"{type(e).__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text.splitlines()[-1] if text else repr(e)
