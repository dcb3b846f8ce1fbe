"""The node suite runs against the cluster `tests/cluster up` started (BACKSTOP_NODE_KUBECONFIG),
in file order: each step builds on the one before, as a user's session does."""

import time

import pytest

from support import KUBECONFIG, STEPS


def pytest_collection_modifyitems(items):
    if not KUBECONFIG:
        raise pytest.UsageError("BACKSTOP_NODE_KUBECONFIG is not set: run the node suite through tests/run (tests/cluster up)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    started = time.monotonic()
    outcome = yield
    result = "failed" if outcome.excinfo else "passed"
    STEPS.record(item.name, time.monotonic() - started, result, **getattr(item, "facts", {}))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("")
    terminalreporter.write_line("node suite, step by step:")
    for line in STEPS.table().splitlines():
        terminalreporter.write_line(line)


@pytest.fixture
def facts(request):
    """Numbers a step reports beside its time (requests sent and failed, seconds to converge)."""
    request.node.facts = {}
    return request.node.facts
