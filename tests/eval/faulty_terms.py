"""A reward term that hangs on demand: the pool's timeout is a fault real text cannot cause at will.

Kept in a module of its own that imports nothing heavy, since every reward worker imports it
under the pool's memory limit.
"""

from __future__ import annotations

import time


def hang_term(response: str, reference) -> float:
    """0.0, after hanging for a minute when the response contains the word HANG."""
    if "HANG" in response:
        time.sleep(60)
    return 0.0
