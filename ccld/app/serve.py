"""How app.py serves the page: safe by default. It binds 127.0.0.1; --listen (all
interfaces) needs a password unless --insecure-no-auth says otherwise; no share link, no
analytics, nothing fetched from elsewhere; uploads limited in bytes (and in pixels, by
the engine); no server file reachable but the page's own outputs."""

import os
import socket
import sys

from ..errors import UserError
from ..files import read_text_lines
from .flags import DEFAULT_PORT, PORTS_TRIED, PROG

LOCAL = '127.0.0.1'
QUEUE_SIZE = 64  # requests waiting for the device; more are turned away


def check_access(args):
    """(host, auth) to serve with; UserError for --listen without a password."""
    if args.auth_file and args.auth:
        raise UserError('pass --auth or --auth-file, not both.')
    auth = [args.auth] if args.auth else read_auth_file(args.auth_file) \
        if args.auth_file else None
    if args.listen and auth is None and not args.insecure_no_auth:
        raise UserError('--listen serves the page to every machine that can reach this one; '
                        'pass --auth USER:PASS or --auth-file FILE (or --insecure-no-auth).')
    return ('0.0.0.0' if args.listen else LOCAL), auth


def read_auth_file(path):
    """The (USER, PASS) pairs of a file of USER:PASS lines."""
    pairs = []
    for line in read_text_lines(path, '--auth-file'):
        user, colon, password = line.partition(':')
        if not (colon and user and password):
            raise UserError(f'--auth-file {path}: every line must be USER:PASS.')
        pairs.append((user, password))
    if not pairs:
        raise UserError(f'--auth-file {path} holds no USER:PASS line.')
    return pairs


def free_port(host, port):
    """--port if given (UserError if it is taken), else the first free one from 7860."""
    candidates = [port] if port else range(DEFAULT_PORT, DEFAULT_PORT + PORTS_TRIED)
    for candidate in candidates:
        with socket.socket() as s:
            # As the server binds: a port a stopped server left in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, candidate))
                return candidate
            except OSError:
                continue
    raise UserError(f'port {port} is taken; pass another --port.' if port else
                    f'no free port from {DEFAULT_PORT} to {DEFAULT_PORT + PORTS_TRIED - 1}; '
                    'pass --port.')


def serve(args):
    """Loads the models, then serves the page until interrupted."""
    host, auth = check_access(args)  # before anything loads
    port = free_port(host, args.port)
    os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
    from .engine import Engine
    from .page import THEME, build
    engine = Engine(args)
    page = build(engine)
    blocked = [*args.checkpoint, *(path for path, _ in args.lora)]
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch(
        server_name=host, server_port=port, share=False, auth=auth, theme=THEME,
        max_file_size=f'{args.max_upload_mb:g}mb', allowed_paths=[], blocked_paths=blocked,
        ssr_mode=False, quiet=True, prevent_thread_lock=True, show_error=False)
    print(f'{PROG}: serving {", ".join(engine.models)} on http://{host}:{port}',
          file=sys.stderr, flush=True)
    page.block_thread()
