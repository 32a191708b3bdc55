"""mm.accelerator.notices: each known notice is silenced by its exact message and module only, once per
process; the switch (MM_VERBOSE, --verbose) shows them on rank 0 and never on the other ranks."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from mm.accelerator import notices
from mm.accelerator.notices import NOTICES, quiet_known_notices, show_known_notices, verbose_requested


def _example(notice) -> str:
    """A message the notice's pattern describes: the pattern with its escapes undone."""
    text = notice.message.removesuffix(r"\Z")
    text = text.replace("[^']*", "/usr/local").replace(r"\w+", "WanTransformer3DModel").replace(".*", "['norm1']. ")
    return re.sub(r"\\(.)", r"\1", text)


def _module_name(notice) -> str:
    return notice.module.split("|")[0].replace("\\", "")


@pytest.fixture
def clean():
    """No notice filters during the test (an earlier test of the session may have imported a CLI module that
    installs them); afterwards the module's state and the process's warning filters as they were."""
    was = notices.notices_silenced()
    if was:
        show_known_notices(environ={})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
        if notices.notices_silenced():
            show_known_notices(environ={})
    if was:
        quiet_known_notices(argv=[], environ={})


def _shown(notice, module: str | None = None) -> bool:
    """Whether ``notice`` from ``module`` (default: its own) comes out."""
    module = module or _module_name(notice)
    if notice.kind == "warning":
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit(_example(notice), notice.category, f"/{module.replace('.', '/')}.py", 1,
                                   module=module, registry={})
        return bool(caught)
    logger = logging.getLogger(module)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning(_example(notice))
    finally:
        logger.removeHandler(handler)
    return bool(records)


def test_every_example_message_matches_its_own_pattern():
    for notice in NOTICES:
        assert re.match(notice.message, _example(notice), re.I), notice.message
        assert notice.kind in ("warning", "log") and notice.why


def test_silenced_by_exact_message_and_module_only(clean):
    assert all(_shown(n) for n in NOTICES)
    assert quiet_known_notices(argv=[], environ={})
    assert quiet_known_notices(argv=[], environ={})  # a second call adds nothing
    assert len([f for f in warnings.filters if f[0] == "ignore" and f[1] is not None and f[3] is not None
                and any(f[1].pattern == n.message for n in NOTICES)]) == sum(n.kind == "warning" for n in NOTICES)
    for notice in NOTICES:
        assert not _shown(notice), notice.message
        assert _shown(notice, module="mm.training.pretrain"), notice.message  # the same words from mm's code
    # another message of the same module stays visible, and so does a longer one
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to Torch optimizers. "
                               "And something else.", UserWarning, "x.py", 1, module="megatron.core.optimizer",
                               registry={})
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 2, module="megatron.core.optimizer",
                               registry={})
    assert len(caught) == 2
    logger = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("DistributedDataParallel: something else")
        logger.error(_example(next(n for n in NOTICES if n.module == logger.name)))  # an error is never silenced
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    show_known_notices(environ={"RANK": "0"})
    assert all(_shown(n) for n in NOTICES)


def test_the_switch_shows_them_on_rank_0_only(clean):
    assert not quiet_known_notices(argv=[], environ={"MM_VERBOSE": "1"})
    assert not quiet_known_notices(argv=["--lr", "1", "--verbose"], environ={"RANK": "0"})
    assert all(_shown(n) for n in NOTICES)
    assert quiet_known_notices(argv=["--verbose"], environ={"RANK": "1", "MM_VERBOSE": "1"})
    assert not any(_shown(n) for n in NOTICES)
    show_known_notices(environ={"RANK": "1"})  # --verbose parsed later on rank 1: still silenced
    assert not any(_shown(n) for n in NOTICES)
    show_known_notices(environ={"RANK": "0"})
    assert all(_shown(n) for n in NOTICES)


def test_verbose_requested():
    assert verbose_requested([], {"MM_VERBOSE": "true"}) and verbose_requested(["--verbose"], {})
    assert not verbose_requested(["--verbosity"], {"MM_VERBOSE": "0"}) and not verbose_requested([], {})


def test_verbose_is_a_flag_of_the_entry_points():
    from mm.arguments import parse_flags

    assert parse_flags(["--mm-model", "m.json", "--verbose"]).verbose
    assert not parse_flags(["--mm-model", "m.json"]).verbose


def test_the_cpu_mode_attributes_the_non_leaf_grad_warning_to_its_reader():
    """Under the CPU redirection a non-leaf tensor's missing .grad warns from the line that read it (as on a
    GPU), once per line; a gradient that is there, or retained, reads without a warning."""
    import torch

    from mm.accelerator import cuda_on_cpu

    def read(t):
        return t.grad

    installed = cuda_on_cpu.is_installed()
    try:
        x = torch.ones(2, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            cuda_on_cpu.install()
            warnings.filterwarnings("default", message=re.escape(cuda_on_cpu.NON_LEAF_GRAD), module=re.escape(__name__))
            for _ in range(3):
                assert read(x * 2) is None
            retained = x * 3
            retained.retain_grad()
            assert read(retained) is None
            given = x * 4
            given.grad = torch.zeros(2)
            assert torch.equal(read(given), torch.zeros(2))
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert caught[0].filename == __file__ and str(caught[0].message).startswith(cuda_on_cpu.NON_LEAF_GRAD)
    finally:
        if not installed:
            cuda_on_cpu.uninstall()
