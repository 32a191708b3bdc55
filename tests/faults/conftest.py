"""Fault-injection tests: real processes against real runs on CPU. Every test is checked for
processes it leaves behind (see ``jobs.survivors``)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults import jobs


@pytest.fixture(scope="session", autouse=True)
def _subreaper():
    if not jobs.become_subreaper():
        pytest.skip("the orphan check needs Linux's PR_SET_CHILD_SUBREAPER")


@pytest.fixture(autouse=True)
def no_orphans():
    """Fails the test if any process it started (or any orphan of one) is still alive after it;
    the survivors are killed so the next test starts clean."""
    before = set(jobs.children())
    yield
    left = jobs.survivors(before)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    jobs.reap_zombies()
    assert not left, f"processes survived the test: {left}"


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, quickstart_assets):
    """The quickstart's synthetic assets (tiny Wan DiT, VAE and text encoder, model/data JSONs)."""
    return quickstart_assets(tmp_path_factory.mktemp("faults_qs"))


def train_args(assets, *flags: str, iters: int = 6) -> list[str]:
    """pretrain_t2v.py's arguments for the quickstart model (2 samples a step, logged every step)."""
    return ["--mm-model", str(assets / "model.json"), "--mm-data", str(assets / "data.json"),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", str(iters),
            "--log-interval", "1", "--num-workers", "0", "--seed", "7", *flags]
