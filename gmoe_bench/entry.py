"""Console entry points (``[project.scripts]`` in pyproject.toml).

Each command's module is imported only when the command is called, inside a Ctrl-C guard: importing
torch and PyG takes seconds, and a Ctrl-C during them would otherwise print Python's traceback
instead of one line and exit 130, as it does later.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C


@contextmanager
def interruptible(prog: str, consequence: str) -> Iterator[None]:
    """Turn a Ctrl-C inside the block into one line on stderr naming ``consequence`` and exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {consequence}.", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED) from None


_BEFORE_START = "it had not started, so nothing was written"
_PARTIAL = "what it wrote may be incomplete: run the same command again"


def train() -> None:
    """``gmoe-train``; once it runs, its own handler keeps finished seeds and says how to resume."""
    with interruptible("gmoe-train", _BEFORE_START):
        from gmoe_bench.train import main
    main()


def report() -> int:
    """``gmoe-report``."""
    with interruptible("gmoe-report", _PARTIAL):
        from gmoe_bench.reports.cli import main
        return main()


def select() -> int:
    """``gmoe-select``."""
    with interruptible("gmoe-select", "nothing was chosen"):
        from gmoe_bench.reports.cli import select_main
        return select_main()


def routing() -> int:
    """``gmoe-routing``."""
    with interruptible("gmoe-routing", _PARTIAL):
        from gmoe_bench.analysis.routing import main
        return main()


def heterogeneity() -> None:
    """``gmoe-heterogeneity``."""
    with interruptible("gmoe-heterogeneity", _PARTIAL):
        from gmoe_bench.analysis.heterogeneity import main
        main()


def structure_gain() -> int:
    """``gmoe-structure-gain``."""
    with interruptible("gmoe-structure-gain", _PARTIAL):
        from gmoe_bench.analysis.structure_gain import main
        return main()
