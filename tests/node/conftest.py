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


@pytest.fixture(scope="session")
def chaos_workload():
    """The namespace the chaos suite and the soak load: two app pods at 20 calls a second each."""
    from support import kubectl
    from test_3_chaos import CHAOS, settled

    kubectl("create", "namespace", CHAOS.namespace)
    kubectl("label", "namespace", CHAOS.namespace, "backstop.dev/inject=enabled")
    CHAOS.deploy(replicas=2, interval="50ms")
    for name in ("primary", "backup", CHAOS.app_name):
        kubectl("rollout", "status", f"deployment/{name}", "-n", CHAOS.namespace, "--timeout=120s", timeout=130)
    settled()
    return CHAOS
