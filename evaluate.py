#!/usr/bin/env python3
"""Compares diffusion checkpoints (say, a model and its finetune) on the same prompts and
seeds: the CLOOB score of each against its prompts, the Frechet distance and KID of its
images against a reference set, and the images side by side.

    python3 evaluate.py --checkpoint base.ckpt --checkpoint finetuned.ckpt \\
        --prompts-file eval_prompts.txt -n 4 --reference-set my_art_val.txt \\
        --autoencoder kl_f8 --output-dir eval/

A checkpoint may take its own sampler and steps, and a label: a teacher at 8 and 16
steps beside its student (which samples with its own steps):

    python3 evaluate.py --checkpoint teacher.ckpt:steps=8 \\
        --checkpoint teacher.ckpt:steps=16,label=teacher-16 --checkpoint student.ckpt ...

Writes OUTPUT_DIR/report.json, report.md, index.html (the gallery, opens from disk),
grids/LINE_SLUG.png (one per prompt: a column per checkpoint, a row per seed) and the
images under images/. Rerun the same command after an interruption: images already made
are kept, and the reference set's features are cached.
"""

from ccld import cli
from ccld.sample.flags import add_sampling_flags

PROG = 'evaluate.py'
FEATURES = ('inception', 'cloob')  # ccld.sample.features.FEATURES, named here without torch


def parser():
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', action='append', required=True, type=cli.checkpoint_spec,
                   metavar='FILE[:method=M,steps=N,label=NAME]',
                   help='a checkpoint to compare, of any kind sample.py takes; repeat the flag '
                   'for each (they are compared in this order), the same file too (say, '
                   'teacher.ckpt:steps=8 and teacher.ckpt:steps=16 beside student.ckpt). '
                   'After the last ":", its own sampler and steps (default: --method and '
                   '--steps, which a distilled student leaves for its own) and its column\'s '
                   'label, without "," or ":" (default: the file name with the parent folders '
                   'that tell it apart)' + cli.HUB_FILE_HELP)
    p.add_argument('--prompts-file', metavar='FILE',
                   help='one prompt a line ("text" or "text:weight"; blank lines and # comments '
                   'skipped), -n images of each (default: eval_prompts.txt beside evaluate.py)')
    reference = p.add_argument_group('the reference set')
    reference.add_argument('--reference-set', metavar='SET',
                           help='images to compare against: anything --train-set takes (a path '
                           'list, tar shards, parquet files, a Hugging Face dataset); without '
                           'it, no Frechet distance or KID')
    cli.add_table_flags(reference)
    p.add_argument('--features', default='inception', choices=FEATURES,
                   help='the network whose features are compared: InceptionV3 (the FID '
                   'network, comparable with papers; its weights download on first use) or the '
                   "--cloob-checkpoint's image tower (no download)")
    p.add_argument('--inception-weights', metavar='PATH',
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, fetched by "
                   'hand (default: downloaded into the torch hub cache)')
    p.add_argument('--reference-cache', metavar='DIR',
                   help='where the reference features are cached, by the set\'s listing and the '
                   'network (default: OUTPUT_DIR/reference_cache)')
    p.add_argument('--output-dir', default='eval',
                   help='report, grids, gallery and images go here')
    p.add_argument('--wandb-project',
                   help='also log the report and the images (prompt and seed rows, a column per '
                   'checkpoint) as wandb tables')
    p.add_argument('--num-gpus', '--devices', dest='num_gpus', type=cli.positive_int, default=1,
                   help='processes per node, which split the images (GPUs, or CPU processes '
                   'with --device cpu)')
    p.add_argument('--num-nodes', type=cli.positive_int, default=1,
                   help='nodes, each running --num-gpus processes (start the same command on each)')
    p.add_argument('--num-workers', type=cli.non_negative_int, default=4,
                   help='processes reading the reference images')
    add_sampling_flags(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.sample.evaluation import run
    run(args)


if __name__ == '__main__':
    cli.run(main, PROG)
