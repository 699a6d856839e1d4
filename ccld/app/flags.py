"""The flags of app.py: sample.py's sampling flags (the page's defaults), several
checkpoints, and those that say who may reach the page and how much one request may ask.
Here, without torch or Gradio, so that --help and usage errors are quick."""

import argparse

from .. import cli
from ..sample.flags import add_sampling_flags

PROG = 'app.py'
DESCRIPTION = ('A web page to try CLOOB-conditioned latent diffusion models in the browser: '
               'text and image prompts, image to image, LoRA adapters and distilled students, '
               'with a gradio_client API (/generate).')
DEFAULT_PORT = 7860
PORTS_TRIED = 100  # without --port: the first free one from DEFAULT_PORT on


def auth_pair(text):
    """'USER:PASS' -> (USER, PASS), both non-empty."""
    user, colon, password = text.partition(':')
    if not colon or not user or not password:
        raise argparse.ArgumentTypeError('expected USER:PASS')
    return user, password


def port_number(text):
    """A TCP port: what the socket's bind takes."""
    return cli.whole_number(text, 1, 65535)


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument('--checkpoint', action='append', required=True,
                   help='a model to offer, as sample.py takes it (released state dict, export, '
                   'ccld or original training checkpoint, distilled student)' +
                   cli.HUB_FILE_HELP + '; repeat for a model menu')
    add_sampling_flags(p)
    network = p.add_argument_group('who may reach the page')
    network.add_argument('--port', type=port_number,
                         help=f'port (default: {DEFAULT_PORT}, or the next free one)')
    network.add_argument('--listen', action='store_true',
                         help='serve on all interfaces, not only 127.0.0.1 (needs --auth or '
                         '--auth-file, or --insecure-no-auth)')
    network.add_argument('--auth', type=auth_pair, metavar='USER:PASS',
                         help='ask for this user name and password')
    network.add_argument('--auth-file', metavar='FILE',
                         help='ask for the user names and passwords of FILE, one USER:PASS a '
                         'line (kept out of the process list, unlike --auth)')
    network.add_argument('--insecure-no-auth', action='store_true',
                         help='with --listen: serve without a password (anyone who can reach '
                         'the machine can use its GPU)')
    bounds = p.add_argument_group('what one request may ask')
    bounds.add_argument('--max-images', type=cli.positive_int, default=16,
                        help='images per request')
    bounds.add_argument('--max-size', type=cli.positive_int, default=1024,
                        help='image size in pixels')
    bounds.add_argument('--max-steps', type=cli.positive_int, default=500,
                        help='sampling steps')
    bounds.add_argument('--max-upload-mb', type=cli.positive_float, default=10,
                        help='size of an uploaded image file, in MB')
    p.add_argument('--share-dir', metavar='DIR',
                   help='also save every image made here, with its metadata')
    return p
