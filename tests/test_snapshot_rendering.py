"""/status, /metrics and the log context rendered in-process from hand-made Snapshots (issue 13:
the seam between the driver and what reports on it). The exact /status text and the metric
names are the public contract; test_admin_api, test_metrics and test_logs see the same through
a real process."""

from __future__ import annotations

import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from drainproxy.control.admin import render_status
from drainproxy.control.logs import DrainContext, JsonFormatter
from drainproxy.control.metrics import render_metrics
from drainproxy.core.lifecycle import DrainSource, Phase
from drainproxy.core.snapshot import Deadlines, DrainView, Snapshot
from drainproxy.core.stats import Counters

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

DRAIN = DrainView(
    sources=(DrainSource.ADMIN, DrainSource.SIGNAL),
    ended=False,
    forced=False,
    phase_seconds={Phase.PROPAGATING: 5.0004},
    seconds_since_start=10.00049,
)

DRAINING = Snapshot(
    at=100.0,
    phase=Phase.DRAINING,
    seconds_in_phase=4.99951,
    ready=False,
    app_reachable=True,
    in_flight=2,
    open_connections=3,
    deadlines=Deadlines(phase_ends_in=3.0, drain_min_in=None, drain_timeout_in=3.0),
    drain=DRAIN,
    last_drain=DRAIN,
    drains_completed=0,
    phases_entered={"propagating": 1, "draining": 1},
    counters=Counters(
        connections_accepted=4,
        requests_total=9,
        requests_by_phase={"serving": 7, "propagating": 2},
        responses_by_class={"2xx": 6, "5xx": 1},
        connections_closed={"after_response": 1},
        requests_rejected={"431": 1},
    ),
    last_connection_age=2.5,
)

#: Drained after a drain that cut connections; the app stop went as planned.
ENDED = DrainView(
    sources=(DrainSource.ADMIN,),
    ended=True,
    forced=True,
    phase_seconds={Phase.PROPAGATING: 5.0, Phase.DRAINING: 20.0, Phase.STOPPING_APP: 5.0},
    seconds_since_start=110.0,
)
DRAINED = Snapshot(
    at=200.0,
    phase=Phase.DRAINED,
    seconds_in_phase=80.0,
    ready=False,
    app_reachable=False,
    app_check_error="Connection refused",
    in_flight=0,
    open_connections=0,
    drain=ENDED,
    last_drain=ENDED,
    drains_completed=1,
    app_stop_outcome="preStop hooks released",
)

#: Nothing has happened yet.
SERVING = Snapshot(
    at=0.0,
    phase=Phase.SERVING,
    seconds_in_phase=0.0,
    ready=True,
    app_reachable=True,
    in_flight=0,
    open_connections=0,
)


def samples(snapshot: Snapshot) -> Samples:
    body, content_type = render_metrics(snapshot)
    assert content_type.startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


# --- /status ----------------------------------------------------------------------------------


def test_status_renders_every_key_in_order_to_the_millisecond() -> None:
    assert render_status(DRAINING) == (
        b'{"phase": "draining", "seconds_in_phase": 5.0, "ready": false, '
        b'"app_reachable": true, "app_check_error": null, "in_flight": 2, '
        b'"open_connections": 3, "deadlines": {"phase_ends_in": 3.0, "drain_min_in": null, '
        b'"drain_timeout_in": 3.0}, "drain": {"sources": ["admin", "signal"], '
        b'"seconds_since_start": 10.0, "forced": false}, "requests_total": 9}'
    )


def test_status_of_a_drained_proxy_has_no_deadline_and_its_drain() -> None:
    status = json.loads(render_status(DRAINED))
    assert status["deadlines"] == {
        "phase_ends_in": None,
        "drain_min_in": None,
        "drain_timeout_in": None,
    }
    assert status["drain"] == {"sources": ["admin"], "seconds_since_start": 110.0, "forced": True}
    assert (status["app_reachable"], status["app_check_error"]) == (False, "Connection refused")


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_names_are_the_public_contract() -> None:
    body, _ = render_metrics(DRAINING)
    families = [(f.name, f.type) for f in text_string_to_metric_families(body.decode())]
    assert families == [
        ("drainproxy_phase", "gauge"),
        ("drainproxy_phase_transitions", "counter"),
        ("drainproxy_phase_elapsed_seconds", "gauge"),
        ("drainproxy_ready", "gauge"),
        ("drainproxy_app_reachable", "gauge"),
        ("drainproxy_drain_duration_seconds", "gauge"),
        ("drainproxy_drain_phase_duration_seconds", "gauge"),
        ("drainproxy_drain_forced", "gauge"),
        ("drainproxy_drains_completed", "counter"),
        ("drainproxy_app_stop_outcome", "gauge"),
        ("drainproxy_in_flight_requests", "gauge"),
        ("drainproxy_open_connections", "gauge"),
        ("drainproxy_connections_accepted", "counter"),
        ("drainproxy_connections_closed", "counter"),
        ("drainproxy_requests", "counter"),
        ("drainproxy_responses", "counter"),
        ("drainproxy_upstream_errors", "counter"),
        ("drainproxy_bad_requests", "counter"),
        ("drainproxy_requests_rejected", "counter"),
        ("drainproxy_timeouts", "counter"),
        ("drainproxy_connections_refused", "counter"),
        ("drainproxy_last_connection_age_seconds", "gauge"),
        ("drainproxy_tunnels_opened", "counter"),
        ("drainproxy_http2_connections", "counter"),
        ("drainproxy_http2_streams_reset_by_client", "counter"),
        ("drainproxy_http2_streams_cut", "counter"),
        ("drainproxy_http2_abusive_connections", "counter"),
    ]


def test_metrics_of_a_drain_under_way() -> None:
    found = samples(DRAINING)
    phases = {
        dict(labels)["phase"]: v for (n, labels), v in found.items() if n == "drainproxy_phase"
    }
    assert phases == {phase.value: float(phase is Phase.DRAINING) for phase in Phase}
    assert value(found, "drainproxy_phase_transitions_total", phase="draining") == 1
    assert value(found, "drainproxy_phase_transitions_total", phase="stopped") == 0
    assert value(found, "drainproxy_phase_elapsed_seconds") == 4.99951
    assert value(found, "drainproxy_ready") == 0
    assert value(found, "drainproxy_drain_duration_seconds") == 10.00049  # so far
    assert value(found, "drainproxy_drain_phase_duration_seconds", phase="propagating") == 5.0004
    assert value(found, "drainproxy_in_flight_requests") == 2
    assert value(found, "drainproxy_open_connections") == 3
    assert value(found, "drainproxy_connections_accepted_total") == 4
    assert value(found, "drainproxy_requests_total", phase="propagating") == 2
    assert value(found, "drainproxy_responses_total", status_class="5xx") == 1
    assert value(found, "drainproxy_responses_total", status_class="3xx") == 0  # known, as 0
    assert value(found, "drainproxy_connections_closed_total", reason="forced") == 0
    assert value(found, "drainproxy_requests_rejected_total", status="431") == 1
    assert value(found, "drainproxy_last_connection_age_seconds") == 2.5
    assert not [key for key in found if key[0] == "drainproxy_app_stop_outcome"]


def test_metrics_of_an_ended_drain_report_its_phases_not_the_time_since() -> None:
    found = samples(DRAINED)
    assert value(found, "drainproxy_drain_duration_seconds") == 30.0
    assert value(found, "drainproxy_drain_forced") == 1
    assert value(found, "drainproxy_drains_completed_total") == 1
    assert value(found, "drainproxy_app_reachable") == 0
    outcome = "preStop hooks released"
    assert value(found, "drainproxy_app_stop_outcome", outcome=outcome) == 1
    assert not [key for key in found if key[0] == "drainproxy_last_connection_age_seconds"]


def test_metrics_before_any_drain() -> None:
    found = samples(SERVING)
    assert value(found, "drainproxy_drain_duration_seconds") == 0
    assert value(found, "drainproxy_drain_forced") == 0
    assert not [key for key in found if key[0] == "drainproxy_drain_phase_duration_seconds"]


# --- the log context --------------------------------------------------------------------------


def bound(snapshot: Snapshot) -> tuple[DrainContext, list[Snapshot]]:
    """A log context reading ``snapshot``; the list records each snapshot it took."""
    taken: list[Snapshot] = []

    def take() -> Snapshot:
        taken.append(snapshot)
        return snapshot

    context = DrainContext()
    context.phase = lambda: snapshot.phase
    context.snapshot = take
    return context, taken


def record(logger: str, **extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"name": logger, "msg": "m", "levelname": "INFO", **extra})


def test_the_driver_lines_carry_the_phase_the_counts_and_the_drain_phases() -> None:
    context, _ = bound(DRAINING)
    line = record("drainproxy")
    assert context.filter(line)
    entry = json.loads(JsonFormatter().format(line))
    assert entry["phase"] == "draining"
    assert entry["counts"] == {
        "in_flight": 2,
        "open_connections": 3,
        "requests_total": 9,
        "requests_by_phase": {"serving": 7, "propagating": 2},
        "responses_by_class": {"2xx": 6, "5xx": 1},
        "upstream_errors": {},
        "connections_closed": {"after_response": 1},
    }
    assert entry["drain_phase_seconds"] == {"propagating": 5.0}


def test_other_lines_carry_the_phase_alone_without_taking_a_snapshot() -> None:
    """The access log writes a line per request: it must not pay for a snapshot."""
    context, taken = bound(DRAINING)
    line = record("drainproxy.access")
    assert context.filter(line)
    assert vars(line)["phase"] == "draining"
    assert not hasattr(line, "counts")
    assert taken == []


def test_fields_the_caller_passed_win() -> None:
    context, _ = bound(DRAINING)
    line = record("drainproxy", phase="stopping_app", drain_phase_seconds={"x": 1})
    context.filter(line)
    assert (vars(line)["phase"], vars(line)["drain_phase_seconds"]) == ("stopping_app", {"x": 1})


def test_an_ended_drain_still_reports_its_phases_until_the_next_serving() -> None:
    context, _ = bound(DRAINED)
    line = record("drainproxy")
    context.filter(line)
    assert vars(line)["drain_phase_seconds"] == {
        "propagating": 5.0,
        "draining": 20.0,
        "stopping_app": 5.0,
    }


def test_without_a_drain_there_are_no_drain_phases() -> None:
    context, _ = bound(SERVING)
    line = record("drainproxy")
    context.filter(line)
    assert vars(line)["counts"]["in_flight"] == 0
    assert not hasattr(line, "drain_phase_seconds")
