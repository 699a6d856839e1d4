"""The exceptions the CLIs turn into a one-line message instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint): exit code 2.

    The message is a single line that says what is wrong and what to do.
    """


class RunError(Exception):
    """A run that cannot go on (diverged, no readable data, a failed write): exit code 1.

    The message is a single line that says what happened and what was kept.
    """
