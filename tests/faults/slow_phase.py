"""Run an entry point with one function made slow on every rank that calls it, as a long phase of
a real run would be (a large VAE decode, encoders loading from a slow file system).

    MM_SLOW_PHASE=module:Qualified.name=seconds python slow_phase.py <script> <script's args>

The function sleeps ``seconds`` before doing its work; the script then runs as ``__main__``.
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys
import time


def make_slow(spec: str) -> None:
    target, seconds = spec.rsplit("=", 1)
    module, qualname = target.split(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    @functools.wraps(original)
    def slow(*args, **kwargs):
        print(f"slow_phase: {qualname} sleeps {seconds} s", flush=True)
        time.sleep(float(seconds))
        return original(*args, **kwargs)

    setattr(owner, name, slow)


if __name__ == "__main__":
    make_slow(os.environ["MM_SLOW_PHASE"])
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
