"""``python -m llava_mole.cli`` (as torchrun runs it): the ``llava-mole`` command."""

import sys

from . import main

sys.exit(main())
