"""Old home of the video API, kept importable for one release: use `lmf_cli.io.video`."""

import warnings

from lmf_cli.io.video import *  # noqa: F403
from lmf_cli.io.video import __all__  # noqa: F401

warnings.warn("lmf_cli.video moved to lmf_cli.io.video; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
