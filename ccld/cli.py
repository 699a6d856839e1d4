"""What every command-line entry point shares: user errors become one line and exit 2."""

import argparse
import sys

from .errors import UserError


def run(main, prog):
    """Calls main(); a UserError prints `prog: error: message` and exits with code 2."""
    try:
        main()
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        sys.exit(130)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 0, got {text!r}')
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be greater than 0, got {value}')
    return value


def multipliers(text):
    """'4,4,8,8' -> [4, 4, 8, 8]; exactly four positive integers."""
    try:
        values = [int(part) for part in text.split(',')]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f'expected four positive integers like 4,4,8,8, got {text!r}')
    return values
