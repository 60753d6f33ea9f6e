"""Fuzz the admin sidecar from its own OpenAPI schema (schemathesis): random paths, queries,
headers and bodies must never give a server error, and every answer must match the schema
(status codes, content types, response bodies). A live in-process scheduler channel stands in
for SGLang's scheduler, so activations really go through the control directory.

schemathesis' pytest plugin does not load under pytest 9 here, so the schema's own Hypothesis
strategy (``schema.as_strategy()``, all operations) is drawn from in plain Hypothesis tests.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from sidecar_fixtures import AUTH, fake_scheduler, sidecar_client

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "control"
    ch = fake_scheduler(d, os.getpid())
    with sidecar_client(d, activation_timeout_s=2.0) as client:
        yield schemathesis.openapi.from_asgi("/openapi.json", client.app), client
    ch.stop()


def test_schema_lists_every_route(api):
    schema, _ = api
    paths = set(schema.raw_schema["paths"])
    assert paths == {"/health", "/v1/profiles", "/v1/profiles/{name}",
                     "/v1/profiles/{name}/activate", "/v1/active", "/v1/history", "/metrics"}


def test_api_never_fails_and_matches_its_schema(api):
    schema, _ = api
    seen = set()

    @given(case=schema.as_strategy())
    @settings(max_examples=150, **SETTINGS)
    def run(case):
        seen.add((case.method, case.path))
        # positive_data_acceptance is off: a schema-valid profile can still be refused (422) for
        # what JSON Schema cannot state (see PROFILE_JSON_SCHEMA in sglang_kascade/profile.py).
        case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

    run()
    assert len(seen) >= 6, seen  # the strategy reached (nearly) every operation


def test_api_refuses_every_call_without_the_token(api):
    schema, _ = api

    @given(case=schema.as_strategy())
    @settings(max_examples=60, **SETTINGS)
    def run(case):
        case.headers = {k: v for k, v in (case.headers or {}).items()
                        if k.lower() != "authorization"}
        response = case.call()
        assert response.status_code == (200 if case.path == "/health" else 401), response.text

    run()
