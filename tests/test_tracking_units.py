"""The tracking layer's decisions alone: the outage buffer (order, bound, a refused call), the claim
rule (pure, over run records) and which store errors are worth waiting out. Fast; no server."""

from __future__ import annotations

import time

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from tracking import claims
from tracking.delivery import Contact, Delivery
from tracking.store import TrackingOutage, TrackingRefused, is_transient, server_message, status_code


def down(message="connection refused"):
    raise requests.exceptions.ConnectionError(message)


def refused():
    # what MLflow raises when the server answers 500 (no retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES=0)
    raise MlflowException("API request to endpoint /api/2.0/mlflow-artifacts/artifacts/1/x/plots/pca.png failed "
                          "with error code 500 != 200. Response body: '[Errno 28] No space left on device'")


class Store:
    """A stand-in for the server's side of the calls: up or down, recording what arrived in order."""

    def __init__(self):
        self.up, self.got = True, []

    def call(self, value):
        def run():
            if not self.up:
                down()
            self.got.append(value)
            return value
        return run


def delivery(outage=60.0):
    # a sqlite URI: the health probe always answers, so retries are paced by retry_every alone
    return Delivery("sqlite:////nowhere/mlflow.db", outage, retry_every=0.0)


def test_calls_are_kept_in_order_through_an_outage():
    store, d = Store(), delivery()
    assert d.send("one", store.call(1)) == 1
    store.up = False
    for i in (2, 3, 4):
        assert d.send(f"epoch {i}", store.call(i)) is None  # buffered, training goes on
    assert store.got == [1] and len(d.queue) == 3
    store.up = True
    assert d.send("five", store.call(5), wait=True) == 5
    assert store.got == [1, 2, 3, 4, 5] and not d.queue
    assert d.delivered_late == 4 and d.outage_seconds_total > 0


def test_the_bound_ends_waiting_and_the_contact_stays_lost():
    store, d = Store(), delivery(outage=0.3)
    store.up = False
    d.send("epoch 1", store.call(1))
    with pytest.raises(TrackingOutage, match="unreachable for more than 0 s"):
        d.send("scores", store.call(2), wait=True)
    store.up = True  # the server is back, but this trial's claim may have expired meanwhile
    with pytest.raises(TrackingOutage):
        d.send("the end of the run", store.call(3), wait=True)
    assert store.got == []


def test_a_refused_call_is_raised_once_with_the_servers_words_and_the_rest_still_goes():
    store, d = Store(), delivery()
    store.up = False
    d.send("epoch 1", store.call(1))
    d.send("plots/pca.png", refused)
    d.send("epoch 2", store.call(2))
    store.up = True
    with pytest.raises(TrackingRefused, match=r"refused plots/pca.png: HTTP 500: \[Errno 28\] No space left on device"):
        d.drain()
    assert store.got == [1]  # delivered in order up to the refused call
    d.drain()  # the refused call is not at the head of the queue any more
    assert store.got == [1, 2] and not d.queue


def test_an_error_that_is_not_the_stores_is_raised_as_it_is():
    d = delivery()
    with pytest.raises(ZeroDivisionError):
        d.send("scores", lambda: 1 / 0, wait=True)
    assert not d.queue


def test_a_shared_contact_counts_the_heartbeats_failures():
    contact = Contact(0.2)
    d = Delivery("sqlite:////nowhere/mlflow.db", 0.2, retry_every=0.0, contact=contact)
    contact.failed()  # the heartbeat found the store away; no call of the delivery has failed yet
    time.sleep(0.3)
    assert contact.lost()
    with pytest.raises(TrackingOutage):
        d.send("epoch 3", lambda: None)
    contact.ok()  # too late: a lost contact stays lost
    assert contact.lost()


@pytest.mark.parametrize("error, transient", [
    (requests.exceptions.ConnectionError("refused"), True),
    (requests.exceptions.ReadTimeout("read timed out"), True),
    (MlflowException("API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception "
                     "HTTPConnectionPool(host='h', port=5000): Max retries exceeded"), True),
    (MlflowException("API request to endpoint /x failed with error code 503 != 200. Response body: ''"), True),
    (MlflowException("API request to endpoint /x failed with error code 504 != 200. Response body: ''"), True),
    (MlflowException("API request to endpoint /x failed with error code 500 != 200. Response body: 'disk'"), False),
    (MlflowException("API request to http://h/x failed with exception ... too many 500 error responses"), False),
    (requests.HTTPError("500 Server Error: INTERNAL SERVER ERROR for url: http://h/x"), False),
    (MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found"), False),
    (Exception("(sqlite3.OperationalError) database is locked"), True),
    # the server's own JSON error, as MLflow's REST store raises it
    (RestException({"error_code": "BAD_REQUEST", "message": "UNIQUE constraint failed"}), False),
    (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
])
def test_which_errors_are_worth_waiting_out(error, transient):
    assert is_transient(error) is transient


def test_server_message_keeps_what_the_server_said():
    err = MlflowException('API request to endpoint /x failed with error code 400 != 200. Response body: '
                          '\'{"error_code": "INVALID_PARAMETER_VALUE", "message": "Param value too long"}\'')
    assert status_code(err) == 400 and server_message(err) == "HTTP 400: Param value too long"
    err = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "Param value too long"})
    assert status_code(err) == 400 and server_message(err) == "HTTP 400: Param value too long"


def _loopback_server(answer: bytes | None):
    """A one-connection loopback server that answers ``answer`` (raw HTTP) or nothing at all."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        if answer is not None:
            conn.sendall(answer)
            conn.close()
        else:
            time.sleep(3)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", listener


def test_fmcs_own_rest_calls_are_worded_as_mlflows():
    """fmc's one-shot calls (create run, heartbeat) fail with MLflow's wording, so that the delivery
    buffer waits out a 502 and a dead server and refuses a 400 with the server's message."""
    from tracking.trial_logger import _post_once

    body = b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "No experiment 42"}'
    for status, transient in ((b"502 Bad Gateway", True), (b"400 Bad Request", False)):
        uri, listener = _loopback_server(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        with pytest.raises(RuntimeError) as err:
            _post_once(uri, "runs/create", {"experiment_id": "42"}, timeout=10)
        listener.close()
        assert is_transient(err.value) is transient
        assert server_message(err.value) == f"HTTP {status[:3].decode()}: No experiment 42"
    uri, listener = _loopback_server(None)
    listener.close()  # nobody listens now: refused
    with pytest.raises(OSError) as err:
        _post_once(uri, "runs/create", {}, timeout=5)
    assert is_transient(err.value)


def test_a_silent_server_is_reported_as_such_not_as_refused():
    from tracking.store import TrackingError, check_server

    uri, listener = _loopback_server(None)
    with pytest.raises(TrackingError, match=r"unreachable \(no answer within 1 s\)"):
        check_server(uri, timeout=1)
    listener.close()


def test_a_connection_dropped_unanswered_is_asked_again_within_the_timeout():
    """A server that accepts and drops a connection without answering (a worker it restarted under
    load) is asked again: the second connection's MLflow answer passes the check. One that drops every
    connection is unreachable once the timeout is spent, saying so."""
    import socket
    import threading

    from tracking.store import TrackingError, check_server

    def dropping(answers: int):
        listener = socket.create_server(("127.0.0.1", 0))

        def serve():
            for i in range(8):
                conn, _ = listener.accept()
                conn.recv(65536)
                if i >= 1 and answers:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n"
                                 b"Connection: close\r\n\r\n{\"experiments\":[]}")
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}", listener

    uri, listener = dropping(answers=1)
    check_server(uri, timeout=10)  # the first connection dropped, the second answered
    listener.close()
    uri, listener = dropping(answers=0)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"unreachable \(Remote end closed connection"):
        check_server(uri, timeout=5)
    assert time.monotonic() - start < 8
    listener.close()


# ---------------------------------------------------------------- claims


def run(run_id, status="RUNNING", start=0, age=0.0, claim="won", sweep="other", now=1000.0):
    tags = {claims.HEARTBEAT: str(now - age), "fmc.sweep": sweep, "fmc.host": "box"}
    if claim:
        tags[claims.CLAIM] = claim
    return {"run_id": run_id, "status": status, "start_time": start, "tags": tags}


MINE = {"run_id": "mine", "status": "RUNNING", "start_time": 50, "tags": {}}


def test_a_finished_run_holds_the_trial_unless_rerun_since_after_it():
    done = run("old", status="FINISHED", start=10)
    assert "finished already in run old" in claims.holder(MINE, [MINE, done], ttl=60, now=1000.0)
    assert claims.holder(MINE, [MINE, done], ttl=60, now=1000.0, rerun_since=40) is None  # --rerun
    later = run("new", status="FINISHED", start=45)  # another rerun finished after this one began
    assert claims.holder(MINE, [MINE, later], ttl=60, now=1000.0, rerun_since=40) is not None


def test_a_live_won_claim_holds_and_an_expired_one_does_not():
    assert "claimed by run live" in claims.holder(MINE, [run("live", age=5)], ttl=60, now=1000.0)
    assert claims.holder(MINE, [run("dead", age=500)], ttl=60, now=1000.0) is None
    assert claims.holder(MINE, [run("failed", status="FAILED")], ttl=60, now=1000.0) is None


def test_of_two_pending_claims_exactly_one_wins():
    a = {"run_id": "a", "status": "RUNNING", "start_time": 5, "tags": {}}
    b = {"run_id": "b", "status": "RUNNING", "start_time": 5, "tags": {}}
    seen_by_a = [run("b", start=5, claim="pending")]
    seen_by_b = [run("a", start=5, claim="pending")]
    decisions = [claims.holder(a, seen_by_a, ttl=60, now=1000.0), claims.holder(b, seen_by_b, ttl=60, now=1000.0)]
    assert decisions.count(None) == 1


def test_live_and_expired_split_running_runs():
    live, expired = claims.live_and_expired(
        [run("fresh", age=1) | {"tags": {**run("fresh", age=1)["tags"], "fmc.trial_key": "k1"}},
         run("stale", age=100), {"run_id": "never", "status": "RUNNING", "start_time": 0, "tags": {}}],
        ttl=60, now=1000.0)
    assert list(live) == ["k1"] and "heartbeat 1 s ago" in live["k1"]
    assert [(r["run_id"], why.split(":")[0]) for r, why in expired] == [("stale", "claim expired"),
                                                                        ("never", "claim expired")]


@pytest.mark.parametrize("outage", [6.0, 120.0, 600.0, 3600.0])
def test_a_claim_outlives_the_outage_bound_by_construction(outage):
    """A trial gives up writing after ``outage`` without an answer, noticed within a heartbeat; its
    claim must not expire before: TTL > bound + 2 heartbeats, whatever FMC_CLAIM_TTL_SECONDS says."""
    every = claims.heartbeat_every(outage)
    assert claims.claim_ttl(outage, floor=1.0) > outage + 2 * every
    assert claims.claim_ttl(outage, floor=10 * outage) == 10 * outage  # a longer floor is kept
