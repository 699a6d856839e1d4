"""The exceptions the CLIs turn into a one-line message instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint): exit code 2.

    The message is a single line that says what is wrong and what to do.
    """


class RunError(Exception):
    """A run that cannot go on (diverged, no readable data, a failed write): exit code 1.

    The message is a single line that says what happened and what was kept.
    """


def reason(exception, limit=120):
    """What went wrong, short enough for a one-line error: the first sentence of the
    exception's message (libraries append paragraphs of advice), at most `limit`
    characters, or its type's name when it says nothing."""
    text = ' '.join(str(exception).split())
    if not text:
        return type(exception).__name__
    sentence = text.split('. ', 1)[0].rstrip('.')
    return sentence if len(sentence) <= limit else sentence[:limit - 3].rstrip() + '...'
