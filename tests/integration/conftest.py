"""pytest fixtures for the sluice integration tests (see helpers.py for the machinery)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial_peers import ScriptedBackend  # noqa: E402
from helpers import BackendFactory, GatewayFactory  # noqa: E402


@pytest.fixture
def gateway(tmp_path):
    """Factory: gateway(yaml_template, **substitutions) -> Gateway. Teardown sends SIGTERM
    and asserts exit code 0 and a clean sanitizer log."""
    f = GatewayFactory(tmp_path)
    yield f.start
    problems = f.finish()
    assert not problems, "\n\n".join(problems)


@pytest.fixture
def scripted():
    """Factory: scripted(handler) -> a backend whose connections run handler(conn, reader,
    index); stopped at teardown."""
    started = []

    def make(handler):
        b = ScriptedBackend(handler)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def backend():
    """Factory: backend(mode="echo", **opts) -> peers.Backend, stopped at teardown."""
    f = BackendFactory()
    yield f
    f.finish()


@pytest.fixture(scope="module")
def module_gateway_factory(tmp_path_factory):
    f = GatewayFactory(tmp_path_factory.mktemp("gw"))
    yield f
    problems = f.finish()
    assert not problems, "\n\n".join(problems)


@pytest.fixture(scope="module")
def module_backend():
    f = BackendFactory()
    yield f
    f.finish()
