"""Prompts as users write them: "text" or "text:weight", on the command line or one a
line in a file, and the file-name slugs that say which prompt an image was made for."""

import math
import re
import unicodedata

from ..errors import UserError

SLUG_LENGTH = 40
# A suffix meant as a weight that is not a number ('1,5', '1.5.2'). Other suffixes that
# are not numbers ('//example.com/fox.png', ' with a colon') are part of the text.
NUMBER_LIKE = re.compile(r'[+-]?[\d.,]*\d[\d.,]*')


def parse_prompt(prompt, default_weight):
    """'text' or 'text:weight' -> (text, weight).

    Only a trailing ':number' is a weight, so URLs and other colons stay in the text.
    UserError for a weight that is not a finite number and for a prompt without text:
    guessing would sample something the user did not ask for.
    """
    text, colon, suffix = prompt.rpartition(':')
    try:
        weight = float(suffix) if colon else None
    except ValueError:
        if NUMBER_LIKE.fullmatch(suffix.strip()):
            raise UserError(f'prompt {prompt!r}: the weight {suffix.strip()!r} is not a number; '
                            'write it like 1.5.') from None
        weight = None
    if weight is None:
        text, weight = prompt, default_weight
    elif not math.isfinite(weight):
        raise UserError(f'prompt {prompt!r}: the weight {suffix.strip()} is not a finite '
                        'number; use one like 1.5 or -1.')
    if not text.strip():
        raise UserError(f'prompt {prompt!r} has no text; write "text" or "text:weight".')
    return text, weight


def read_prompts_file(path, default_weight):
    """(line number, text, weight) of every prompt in a file of one prompt a line; blank
    lines and lines starting with '#' are skipped. UserError naming the line of the
    first bad one, so that a long run does not stop at it hours in."""
    from ..files import read_numbered_lines
    prompts = []
    for number, line in read_numbered_lines(path, '--prompts-file'):
        if line.startswith('#'):
            continue
        try:
            prompts.append((number, *parse_prompt(line, default_weight)))
        except UserError as e:
            raise UserError(f'--prompts-file {path} line {number}: {e}') from None
    if not prompts:
        raise UserError(f'--prompts-file {path} holds no prompts; write one prompt a line.')
    return prompts


def slug(text, length=SLUG_LENGTH):
    """'A Lighthouse at Dusk!' -> 'a-lighthouse-at-dusk': lowercase ASCII words (accents
    dropped) joined by '-', as many whole words as fit in `length` characters; 'prompt'
    when no ASCII letter or digit is left."""
    ascii_text = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode()
    words = re.findall(r'[a-z0-9]+', ascii_text.lower())
    if not words:
        return 'prompt'
    kept = words[0][:length]
    for word in words[1:]:
        if len(kept) + 1 + len(word) > length:
            break
        kept += f'-{word}'
    return kept
