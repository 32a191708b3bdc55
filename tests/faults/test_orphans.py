"""The orphan check itself: a process that outlives its parent is seen and reported."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.faults import jobs


def test_an_orphaned_grandchild_is_found(tmp_path):
    before = set(jobs.children())
    # a parent that starts a sleeping child and exits at once: the child is orphaned
    code = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    subprocess.run([sys.executable, "-c", code], check=True)
    left = jobs.survivors(before, grace=1.0)
    try:
        assert len(left) == 1 and "time.sleep(60)" in next(iter(left.values())), left
    finally:
        for pid in left:
            subprocess.run(["kill", "-9", str(pid)])
        time.sleep(0.2)
        jobs.reap_zombies()
