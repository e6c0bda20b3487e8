"""Run by the ramdisk's own Python at build time (not imported): the agent's code with
the pruned standard library, down to a report over HTTP to a local socket."""

import socket
import sys
import threading

from corral.agent.cmdline import BootOrders
from corral.agent.facts import Facts
from corral.agent.main import Agent, Settings

# A one-shot HTTP server: the agent's report goes through http.client and email parsing.
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
seen: list[bytes] = []


def serve() -> None:
    conn, _ = listener.accept()
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    seen.append(data)
    body = b'{"ok": true}'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    conn.close()


thread = threading.Thread(target=serve, daemon=True)
thread.start()
port = listener.getsockname()[1]
orders = BootOrders.from_cmdline(f"corral.server=http://127.0.0.1:{port} corral.node=smoke")
agent = Agent(orders, settings=Settings(tries=1))
assert agent.report("booted", Facts("k", 1, 1).summary("10.0.0.1", "52:54:00:00:00:01"))
thread.join(5)
assert b'"phase": "booted"' in seen[0], seen
print("corral-agent smoke test: ok", sys.version.split()[0])
