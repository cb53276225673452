"""Both HTTP APIs fuzzed from their own OpenAPI documents (schemathesis), against real
processes on a real broker: whatever the generated request, no answer is a 5xx."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import schemathesis
from helpers import own_cluster, report
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from leveret.cli.procs import Cluster

pytestmark = pytest.mark.broker

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def services(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A scheduler and a tracker shared by every fuzzed request."""
    with own_cluster(amqp_url, tmp_path_factory.mktemp("openapi-fuzz")) as c:
        c.start_tracker()
        c.start_scheduler()
        yield c
        for service in c.services:
            assert service.alive(), f"{service.name} died under fuzzing:\n{service.log()[-3000:]}"


def no_server_error(case: Case) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
        f"body: {str(case.body)[:500]}"
    )


def fuzz(openapi_url: str) -> list[str]:
    """Call every operation of the document with valid and with invalid requests; return
    the operations and modes exercised (an operation without parameters has no invalid
    requests)."""
    schema = schemathesis.openapi.from_url(openapi_url)
    exercised = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Case) -> None:
                no_server_error(case)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
                continue
            exercised.append(f"{operation.label} ({mode.value})")
    return exercised


@pytest.mark.parametrize("service", ["scheduler", "tracker"])
def test_api_never_answers_5xx(services: Cluster, service: str) -> None:
    base = services.scheduler_url if service == "scheduler" else services.tracker_url
    started = time.monotonic()
    exercised = fuzz(f"{base}/openapi.json")
    assert len(exercised) >= 4, exercised
    report(
        f"openapi fuzz {service}: {len(exercised)} operation/mode pairs x "
        f"{FUZZ.max_examples} examples, no 5xx, {time.monotonic() - started:.1f} s"
    )
