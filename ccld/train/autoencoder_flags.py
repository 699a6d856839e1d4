"""train_autoencoder.py's flags: the groups every training tool shares (images,
optimisation, the run, devices; a flag they share means the same in each), and its own
for the autoencoder, the loss and validation."""

from .. import cli
from . import flags

PROG = 'train_autoencoder.py'
DESCRIPTION = ('Finetunes a KL autoencoder (CompVis format) on your images with '
               'latent-diffusion\'s loss; decoder-only by default, so that its latents, '
               'and every U-Net and latent cache made with it, stay valid.')
DEFAULT_LR = 1e-5
DEFAULT_BATCH_SIZE = 8


def add_autoencoder_flags(p):
    g = p.add_argument_group('the autoencoder')
    g.add_argument('--vqgan-model', metavar='NAME',
                   help='the autoencoder to start from: NAME.yaml + NAME.ckpt (or '
                   'NAME.safetensors); or hf://OWNER/NAME[@REVISION][/NAME], the pair in a '
                   'Hugging Face hub repository')
    g.add_argument('--output-name', metavar='PATH/NAME',
                   help='write the finetuned autoencoder as PATH/NAME.ckpt + PATH/NAME.yaml '
                   '(at the end of the run, and when a signal stops it), for --vqgan-model and '
                   '--autoencoder PATH/NAME')
    mode = g.add_mutually_exclusive_group()
    mode.add_argument('--decoder-only', dest='full', action='store_false', default=False,
                      help='train the decoder alone (the default): the encoder and quant_conv '
                      'stay bit-identical, so the latents, the autoencoder scale, latent caches '
                      'and U-Nets made with --vqgan-model stay valid')
    mode.add_argument('--full', action='store_true',
                      help='train the encoder too: the latent space changes, so U-Nets and '
                      'caches made with --vqgan-model no longer fit, and the scale is measured '
                      'again at the end')
    return g


def add_loss_flags(p):
    """latent-diffusion's LPIPSWithDiscriminator; unset, each takes the value the starting
    autoencoder's config gives its lossconfig (kl-f8's: 1e-6, 50001, 0.5, 1)."""
    g = p.add_argument_group('the loss (unset: as the --vqgan-model config\'s lossconfig, '
                             'else as kl-f8\'s)')
    g.add_argument('--kl-weight', type=cli.non_negative_float,
                   help='weight of the KL term pulling the posterior to N(0, 1) (kl-f8: 1e-6)')
    g.add_argument('--disc-start', type=cli.non_negative_int,
                   help='the step from which the PatchGAN discriminator trains and its hinge '
                   'loss (at the adaptive weight) joins the autoencoder\'s (kl-f8: 50001)')
    g.add_argument('--disc-weight', type=cli.non_negative_float,
                   help='scales the adaptive weight of the adversarial term (kl-f8: 0.5)')
    g.add_argument('--perceptual-weight', type=cli.non_negative_float,
                   help='weight of LPIPS in the reconstruction loss; 0 trains without LPIPS, '
                   'and without its weights (kl-f8: 1)')
    g.add_argument('--lpips-weights', metavar='FILE',
                   help='the LPIPS VGG16 weights: torchvision\'s vgg16-397923af.pth, an LPIPS '
                   'state dict, or a CompVis checkpoint holding loss.perceptual_loss.* (default: '
                   'the --vqgan-model checkpoint\'s when it holds them, else torchvision\'s file '
                   'in the torch hub cache, downloaded on first use)')
    return g


def add_validation_flags(p):
    g = p.add_argument_group('validation')
    g.add_argument('--val-set', help='held-out images (a path list or tar shards, as '
                   '--train-set) for reconstruction grids and L1, PSNR and LPIPS')
    g.add_argument('--val-every', type=cli.positive_int, default=1000,
                   help='validate every this many steps (and at step 0, the starting '
                   'autoencoder\'s values)')
    g.add_argument('--val-images', dest='val_count', metavar='N', type=cli.positive_int,
                   default=64, help='validate on the first this many readable images of --val-set')
    return g


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_autoencoder_flags(p)
    images = flags.add_image_flags(p)
    images.add_argument('--random-flip', action='store_true',
                        help='mirror each training image left to right half of the time')
    add_loss_flags(p)
    add_validation_flags(p)
    flags.add_optimizer_flags(p, lr=DEFAULT_LR)
    flags.add_run_flags(p, resume_help='a checkpoint of a train_autoencoder.py run, or "auto": '
                        'the newest good one in --output-dir (a fresh start when there is none)'
                        + cli.HUB_FILE_HELP,
                        output_dir='autoencoder_outputs',
                        output_help='the run\'s checkpoints (for resuming), reconstruction grids '
                        'and local logs go here')
    flags.add_device_flags(p, peak_tflops=False)
    p.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
    return p
