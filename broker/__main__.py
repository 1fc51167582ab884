"""``python -m aldaas.broker serve|settings|fetch-backup|restore-backup``: the broker's commands alone."""

import sys

from ._cli import main

sys.exit(main())
