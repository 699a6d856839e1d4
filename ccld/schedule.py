"""The first release's name for ccld.diffusion.schedule: the same module, under both names."""

import sys

from .diffusion import schedule

sys.modules[__name__] = schedule
