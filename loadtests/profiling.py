"""The host-side benchmarks' profile of one call: the functions that took the most time of their own."""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable


def top_functions(call: Callable[[], object], lines: int = 15) -> str:
    """Run `call` under cProfile; the report of its `lines` functions with the most time of their own."""
    profile = cProfile.Profile()
    profile.enable()
    call()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()
