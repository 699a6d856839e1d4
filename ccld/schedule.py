"""The first release's public name for ccld.diffusion.schedule: the same module, under both names."""

import sys

from .diffusion import schedule

sys.modules[__name__] = schedule
