"""``python -m kdgqa.cli`` (and ``torchrun -m kdgqa.cli``): the ``kdgqa`` command."""

import sys

from kdgqa.cli import main

sys.exit(main())
