"""Attack tests: what a lease holder tries, through the real client, tunnel and gateway.

Each test names one attempt and asserts that it is refused, and the refusal's
reason. The end-to-end helpers live in tests/broker/aldaas_e2e.py.
"""

from __future__ import annotations

import pathlib
import sys

_BROKER_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "broker")
if _BROKER_TESTS not in sys.path:
    sys.path.append(_BROKER_TESTS)
