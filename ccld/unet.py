"""The first release's public name for ccld.models.unet: the same module, under both names."""

import sys

from .models import unet

sys.modules[__name__] = unet
