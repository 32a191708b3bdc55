"""Stand-in modules for importing reference code (a package whose ``__init__`` needs what is not
installed here), in place only while the reference is imported."""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def modules_replaced(stubs: dict[str, types.ModuleType]) -> Iterator[None]:
    """``sys.modules`` with ``stubs`` in place for the duration; afterwards as it was."""
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
