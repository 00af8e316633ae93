"""The one error type a user sees as one line.

Every module raises its own subclass (DataError, PrecisionError, ...) for input the user must fix; only the
command-line edges (train_vit.py, report.py, prep_shards.py) turn it into `error: ...` and exit status 2.
"""


class UserError(Exception):
    """Bad input or a state the user must change: one line naming the file or flag, never a traceback."""


EXIT_USER_ERROR = 2
