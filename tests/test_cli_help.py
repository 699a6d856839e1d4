"""The command-line tools answer --help and usage errors without importing torch (which
takes seconds), document every flag, and offer the library's choices."""

import subprocess
import sys
from pathlib import Path

import pytest

import app
import compute_ae_scale
import distill
import evaluate
import export_model
import precompute_latents
import sample
import train_autoencoder
import train_latent_diffusion
from ccld import cli
from ccld.diffusion import sampling, schedule
from ccld.models import exports
from ccld.sample import features

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {'train_latent_diffusion.py': train_latent_diffusion, 'sample.py': sample,
         'compute_ae_scale.py': compute_ae_scale, 'precompute_latents.py': precompute_latents,
         'export_model.py': export_model, 'evaluate.py': evaluate,
         'train_autoencoder.py': train_autoencoder, 'distill.py': distill, 'app.py': app}

# Runs a script as `python SCRIPT ARGS...` would, then reports whether torch was imported.
WRAPPER = '''
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rpartition('/')[0])
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as e:
    code = e.code
print('exit', code, 'torch' in sys.modules)
'''


@pytest.mark.parametrize('script', TOOLS)
@pytest.mark.parametrize('args, code', [(['--help'], 0), (['--no-such-flag'], 2)])
def test_help_and_usage_errors_do_not_import_torch(script, args, code):
    run = subprocess.run([sys.executable, '-c', WRAPPER, str(ROOT / script), *args],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == f'exit {code} False', run.stdout + run.stderr
    if code:  # one line (a missing required argument may be named first)
        err = run.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f'{script}: error: '), run.stderr


@pytest.mark.parametrize('script', TOOLS)
def test_every_flag_has_a_help_text_and_shows_its_default(script):
    parser = TOOLS[script].parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f'{script}: {action.dest} has no help'
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, [], '==SUPPRESS=='):
            assert f'(default: {action.default})' in ' '.join(text.split()), \
                f'{script}: the default of {action.option_strings[0]} is not shown'


def test_choices_named_in_the_scripts_are_the_librarys():
    from ccld.diffusion import distillation
    from ccld.train import distill_flags
    assert cli.SAMPLING_METHODS == sampling.METHODS
    assert distill_flags.WEIGHTINGS == distillation.WEIGHTINGS
    assert cli.SCHEDULES == tuple(schedule.SCHEDULES)
    assert export_model.DTYPES == tuple(exports.DTYPES)
    assert evaluate.FEATURES == features.FEATURES
