"""``python -m aldaas.broker`` is the ``aldaas`` program."""

import sys

from ._cli import main

sys.exit(main())
