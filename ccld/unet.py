"""The first release's name for ccld.models.unet: the same module, under both names."""

import sys

from .models import unet

sys.modules[__name__] = unet
