"""The first release's public name for ccld.diffusion.sampling: the same module, under both names."""

import sys

from .diffusion import sampling

sys.modules[__name__] = sampling
