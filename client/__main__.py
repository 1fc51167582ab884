"""``python -m aldaas.client`` is the ``aldaas`` program."""

import sys

from ._program import main

sys.exit(main())
