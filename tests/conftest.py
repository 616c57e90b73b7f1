"""Suite-wide hooks: leave the test process without the interpreter's teardown."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the run's exit status for :func:`pytest_unconfigure`."""
    session.config.stash[_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with the run's status once pytest has reported everything.

    After ~380 tests the process holds Ray core-worker, gRPC and torch threads; tearing the
    interpreter down under them once crashed with a segmentation fault after every test had
    passed (make saw the signal, CI went red). Every test stops its own clusters and servers, so
    nothing is left for the interpreter's teardown to do.
    """
    status = config.stash.get(_STATUS, None)
    if status is None:  # e.g. --collect-only or a usage error: keep pytest's own exit
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_STATUS = pytest.StashKey[int]()
