"""The one exception type the CLIs turn into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint).

    The message is a single line that says what is wrong and what to do.
    """
