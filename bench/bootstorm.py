"""Benchmark: a boot storm against one `corral serve`.

N simulated nodes (default 1,000) start at once, each as a real TCP client bound to its
own reserved address (all on the loopback of a private network namespace, so the
server's source-address checks apply). Each fetches its iPXE script (rendered live),
then the kernel, the initrd and its token initrd named in that script. Prints requests
per second, p50/p99 latency, errors, total time, and the time a 1 and a 10 Gbit/s server
link alone would need for the bytes moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.run import stop as stop_process
from corral.run import unwind_on_sigterm

NS = f"cbs{os.getpid()}"
SERVER = "10.200.0.1"
PORT = 8080


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def node_ip(i: int) -> str:
    return f"10.200.{1 + i // 250}.{1 + i % 250}"


async def get(ip: str, path: str, lat: list[float]) -> tuple[int, bytes]:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(SERVER, PORT, local_addr=(ip, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {SERVER}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    keep = path.endswith(".ipxe")
    body = bytearray()
    size = 0
    while chunk := await reader.read(1 << 20):
        size += len(chunk)
        if keep:
            body += chunk
    writer.close()
    lat.append(time.perf_counter() - start)
    return status, bytes(body) if keep else size.to_bytes(8, "big")


async def boot(i: int, lat: list[float], errors: list[str], moved: list[int]) -> None:
    ip, mac = node_ip(i), f"52-54-00-c8-{i >> 8:02x}-{i & 255:02x}"
    try:
        status, script = await get(ip, f"/boot/{mac}.ipxe", lat)
        if status != 200:
            errors.append(f"script {status}")
            return
        urls = [w for w in script.decode().split() if w.startswith("http://")]
        for url in dict.fromkeys(urls):
            status, size = await get(ip, url.split(f":{PORT}", 1)[1], lat)
            if status != 200:
                errors.append(f"{url} {status}")
            moved.append(int.from_bytes(size, "big"))
    except OSError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


async def storm(n: int) -> dict[str, float]:
    lat: list[float] = []
    errors: list[str] = []
    moved: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(*(boot(i, lat, errors, moved) for i in range(n)))
    total = time.perf_counter() - start
    lat.sort()
    return {
        "requests": len(lat),
        "errors": len(errors),
        "first_errors": errors[:3],  # type: ignore[dict-item]
        "total_s": round(total, 2),
        "requests_per_s": round(len(lat) / total, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
        "gbytes": round(sum(moved) / 1e9, 2),
        "link_1gbit_s": round(sum(moved) * 8 / 1e9, 1),
        "link_10gbit_s": round(sum(moved) * 8 / 1e10, 1),
    }


def client(n: int) -> None:
    print(json.dumps(asyncio.run(storm(n))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--kernel-mb", type=int, default=8)
    parser.add_argument("--initrd-mb", type=int, default=22)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.nodes)
        return
    unwind_on_sigterm()  # kill removes the namespace and stops the server too
    work = Path(tempfile.mkdtemp(prefix="corral-bootstorm-"))
    env = dict(os.environ, CORRAL_HOME=str(work / "home"))
    home = work / "home"
    (home / "ramdisk").mkdir(parents=True)
    for name, mb in (("vmlinuz", args.kernel_mb), ("initrd.img", args.initrd_mb)):
        (home / "ramdisk" / name).write_bytes(os.urandom(mb << 20))
    (home / "corral.toml").write_text(f'server_url = "http://{SERVER}:{PORT}"\n')
    nodes = "\n".join(
        f"  - {{name: b{i:04d}, install_method: image, interfaces: "
        f"[{{mac: '52:54:00:c8:{i >> 8:02x}:{i & 255:02x}', ip: {node_ip(i)}}}]}}"
        for i in range(args.nodes)
    )
    (work / "cluster.yaml").write_text(f"nodes:\n{nodes}\n")
    corral = [sys.executable, "-m", "corral"]
    subprocess.run(
        [*corral, "apply", "-f", str(work / "cluster.yaml")],
        env=env,
        check=True,
        capture_output=True,
    )
    server = None
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "addr", "add", "10.200.0.1/16", "dev", "lo")
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NS,
                *corral,
                "serve",
                "--address",
                SERVER,
                "--http-port",
                str(PORT),
                "--tftp-port",
                "0",
                "--dhcp",
                "off",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            probe = subprocess.run(
                ["ip", "netns", "exec", NS, "curl", "-sf", f"http://{SERVER}:{PORT}/boot/ipxe"],
                capture_output=True,
            )
            if probe.returncode == 0:
                break
            time.sleep(0.2)
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                NS,
                sys.executable,
                __file__,
                "--client",
                "--nodes",
                str(args.nodes),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(result.stdout)
        figures["nodes"] = args.nodes
        figures["pair_mb"] = args.kernel_mb + args.initrd_mb
        print(json.dumps(figures))
    finally:
        if server is not None:
            stop_process(server, 15)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
