"""Connection hygiene over raw sockets: slow or oversized clients are cut off, and a flood of idle
connections cannot take the probes down. Every wait is bounded generously; none is a timing claim."""

from __future__ import annotations

import contextlib
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

BOUND_S = 60.0  # far above every configured limit: a loaded machine still passes, a hang fails


@pytest.fixture(scope="module")
def server(classifier_dir, tmp_path_factory):
    from finetune.server.serving import start_in_thread
    from finetune.server.settings import ServerSettings

    settings = ServerSettings(
        model_dir=classifier_dir, port=0, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_timeout_s=1.0,
        max_header_bytes=4096, max_connections=8, feedback_path=tmp_path_factory.mktemp("fb") / "f.jsonl",
    )
    with start_in_thread(settings) as running:
        yield running


def connect(server) -> socket.socket:
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=BOUND_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_a_connection_that_never_sends_a_request_is_closed(server):
    with connect(server) as sock:
        answer, took = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"headers did not arrive" in answer
    assert took < BOUND_S


def test_headers_sent_slowly_are_cut_off(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\n")
        answer, _ = read_until_closed(sock)  # the client never finishes its headers
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_never_completes_is_cut_off(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"instances\"")
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body did not arrive" in answer


@pytest.mark.parametrize("shape", ["one huge header", "many headers", "a huge url"])
def test_oversized_headers_get_431(server, shape):
    if shape == "one huge header":
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    elif shape == "many headers":
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 50)
                                                                     for i in range(200)) + b"\r\n"
    else:
        head = b"GET /healthz?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as sock:
        # The server may close before reading it all; what it sent first still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"headers_too_large" in answer


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_flood_of_idle_connections_leaves_room_for_the_probes(server):
    idle = [connect(server) for _ in range(30)]  # the cap is 8
    try:
        for _ in range(3):
            assert httpx.get(f"{server.url}/healthz", timeout=BOUND_S).status_code == 200
        predict = httpx.post(f"{server.url}/v1/models/tiny-sst2:predict", json={"instances": ["fine"]},
                             timeout=BOUND_S)
        assert predict.status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_well_behaved_keep_alive_clients_are_served(server):
    with httpx.Client(timeout=BOUND_S) as client:
        for _ in range(5):
            answer = client.post(f"{server.url}/v1/models/tiny-sst2:predict", json={"instances": ["ok"]})
            assert answer.status_code == 200


def test_a_content_length_with_trailing_space_still_gets_the_body_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\ncontent-length: 100 \r\n\r\n{")
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_slow_uploads_at_the_cap_leave_room_for_the_probes(server):
    uploads = [connect(server) for _ in range(12)]  # the cap is 8
    try:
        for sock in uploads:
            sock.sendall(b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{")
        assert httpx.get(f"{server.url}/healthz", timeout=BOUND_S).status_code == 200
    finally:
        for sock in uploads:
            sock.close()


def test_a_trickle_of_blank_lines_does_not_hold_a_connection(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(0.3)
        data, deadline = b"", time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"\r\n")
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the server kept a connection sending only blank lines open")
    assert data.startswith(b"HTTP/1.1 200 ")


def test_a_pipelined_request_is_not_evicted_while_the_one_before_it_is_answered(classifier_dir, start_server):
    running = start_server(classifier_dir, max_connections=2, header_timeout_s=30.0)
    with connect(running) as sock:
        body = b'{"instances": ["fine"]}'
        request = (b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n%s"
                   % (len(body), body))
        sock.sendall(request + request)
        others = [connect(running) for _ in range(4)]  # over the cap: idle ones go, this one must not
        try:
            sock.settimeout(BOUND_S)
            data = b""
            while data.count(b"HTTP/1.1 200 ") < 2:
                chunk = sock.recv(65536)
                assert chunk, f"the pipelined connection was closed: {data[:300]!r}"
                data += chunk
        finally:
            for other in others:
                other.close()


def test_a_413_before_the_body_is_read_closes_the_connection(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/models/tiny-sst2:predict HTTP/1.1\r\nHost: x\r\ncontent-length: 2000000\r\n"
                     b"expect: 100-continue\r\n\r\n")
        answer, _ = read_until_closed(sock)  # closed: the unread body is never taken for a next request
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
