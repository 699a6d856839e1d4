#!/usr/bin/env python3
"""A web page to try a model in the browser: text and image prompts, image to image, LoRA
adapters and distilled students, the images sample.py would make with the same settings.

    python3 app.py --checkpoint my_run/checkpoints/last.ckpt     # then open http://127.0.0.1:7860
    python3 app.py --checkpoint yfcc_cfg.safetensors --checkpoint student.ckpt \\
        --lora wikiart.safetensors

Binds 127.0.0.1; --listen needs --auth USER:PASS or --auth-file. The page's generation is
also an API (/generate), for gradio_client scripts.
"""

from ccld import cli
from ccld.app.flags import PROG, parser


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.app.serve import serve
    serve(args)


if __name__ == '__main__':
    cli.run(main, PROG)
