"""The fault-injecting proxy that network tests put between a client and a server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tcp_proxy import FaultyProxy


def test_a_reset_reaches_a_client_that_is_waiting_for_the_server():
    """A reset drawn for the server's bytes resets the client's connection too, although another
    thread of the proxy is blocked reading from that client at that moment."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    connected = threading.Event()

    def greet() -> None:
        connection, _ = server.accept()
        accepted.append(connection)
        connected.wait(10)
        connection.sendall(b"hello")  # the server speaks first: its bytes draw the reset

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    with FaultyProxy("127.0.0.1", server.getsockname()[1], reset_probability=1.0) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        connected.set()
        try:
            with pytest.raises(ConnectionResetError):
                if client.recv(16) == b"":  # an orderly end would not be a reset either
                    pytest.fail("the client saw the connection end, not a reset")
        finally:
            client.close()
        assert proxy.resets == 1
    thread.join(5)
    for connection in accepted:
        connection.close()
    server.close()


def test_connections_that_end_in_order_release_their_sockets():
    """A long run makes thousands of connections: each one that both sides end is closed by the
    proxy, so its descriptors do not pile up until the process runs out of them."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo_once() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(connection.recv(16))

    thread = threading.Thread(target=echo_once, daemon=True)
    thread.start()
    with FaultyProxy("127.0.0.1", server.getsockname()[1]) as proxy:
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
                client.sendall(b"ping")
                assert client.recv(16) == b"ping"
                client.shutdown(socket.SHUT_WR)
                assert client.recv(16) == b""  # the server's end reached the client
        deadline = time.monotonic() + 10
        while proxy.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.connections == 50 and proxy.open_connections == 0
    stop.set()
    server.close()
    thread.join(5)
