"""The fault-injecting proxy that network tests put between a client and a server."""

from __future__ import annotations

import socket
import threading

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
