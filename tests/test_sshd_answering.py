"""How the harness sees that sshd answers: real sockets on the loopback, no guest."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from builder.instance import sshd_answering


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes]]]:
    """A listener whose behaviour is the first item of the list: the bytes it sends, or b"" for none."""
    plan: list[bytes] = []
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            with conn:
                if plan and plan[0]:
                    conn.sendall(plan[0])
                stop.wait(1.0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield lsock.getsockname()[1], plan
    stop.set()
    t.join()
    lsock.close()


def test_the_banner_is_left_for_the_login(server: tuple[int, list[bytes]]) -> None:
    port, plan = server
    plan.append(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    sock = sshd_answering(port, wait=2.0)
    assert sock is not None
    with sock:
        # The SSH client reads the whole banner from this same connection.
        assert sock.recv(64) == b"SSH-2.0-OpenSSH_9.2p1\r\n"


def test_a_connection_nobody_answers_on_is_not_sshd(server: tuple[int, list[bytes]]) -> None:
    # What QEMU's forward does before the guest's network is up: accept, then silence.
    port, plan = server
    plan.append(b"")
    start = time.monotonic()
    assert sshd_answering(port, wait=0.3) is None
    assert time.monotonic() - start < 1.0


def test_another_service_is_not_sshd(server: tuple[int, list[bytes]]) -> None:
    port, plan = server
    plan.append(b"HTTP/1.1 400 Bad Request\r\n")
    assert sshd_answering(port, wait=2.0) is None


def test_a_closed_port_is_not_sshd() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    assert sshd_answering(port, wait=1.0) is None
