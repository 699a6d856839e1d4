"""The first release's name for ccld.diffusion.sampling: the same module, under both names."""

import sys

from .diffusion import sampling

sys.modules[__name__] = sampling
