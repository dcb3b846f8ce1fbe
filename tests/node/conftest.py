"""The node suite runs against the cluster `tests/cluster up` started (BACKSTOP_NODE_KUBECONFIG),
in file order: each step builds on the one before, as a user's session does."""

import time

import pytest

from support import KUBECONFIG, RELEASE_NAMESPACE, ROOT, STEPS, kubectl

DIAGNOSTICS = ROOT / "target" / "node-diagnostics"


def pytest_collection_modifyitems(items):
    if not KUBECONFIG:
        raise pytest.UsageError("BACKSTOP_NODE_KUBECONFIG is not set: run the node suite through tests/run (tests/cluster up)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    started = time.monotonic()
    outcome = yield
    result = "failed" if outcome.excinfo else "passed"
    STEPS.record(item.name, time.monotonic() - started, result, **getattr(item, "facts", {}))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed step keeps what explains it: the policies' status, the Lease, every pod's state
    and the operators' and sidecars' logs, under target/node-diagnostics/<step>/; the report
    shows the policies, the Lease and the operators' last lines, which CI keeps."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    folder = DIAGNOSTICS / item.name
    folder.mkdir(parents=True, exist_ok=True)
    shown = []

    def keep(name, *args, show=None):
        try:
            result = kubectl(*args, check=False, timeout=30)
            text = result.stdout + result.stderr
        except Exception as error:  # noqa: BLE001 - diagnostics must not hide the failure
            text = f"cannot run kubectl {' '.join(args)}: {error}"
        (folder / name).write_text(text)
        if show:
            shown.append((name, "\n".join(text.splitlines()[-show:])))

    keep("policies.yaml", "get", "fallbackpolicy", "-A", "-o", "yaml", show=400)
    keep("leases.yaml", "get", "lease", "-n", RELEASE_NAMESPACE, "-o", "yaml", show=60)
    keep("pods.txt", "get", "pods", "-A", "-o", "wide", show=40)
    try:
        listed = kubectl("get", "pods", "-A", "--no-headers", "-o",
                         "custom-columns=NS:.metadata.namespace,NAME:.metadata.name", check=False, timeout=30).stdout
    except Exception:  # noqa: BLE001 - as above
        listed = ""
    for line in listed.splitlines():
        namespace, name = line.split()
        if namespace == "kube-system":
            continue
        operator = namespace == RELEASE_NAMESPACE
        keep(f"{namespace}.{name}.log", "logs", "-n", namespace, name, "--all-containers", "--timestamps",
             "--tail=3000", show=150 if operator else None)
    for name, text in shown:
        report.sections.append((f"node diagnostics: {name}", text))
    report.sections.append(("node diagnostics", f"kept in {folder}"))


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
