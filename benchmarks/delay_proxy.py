"""A TCP proxy that delays every byte by a fixed time each way: a network's latency on loopback.

    python benchmarks/delay_proxy.py DELAY_MS TARGET_PORT [TARGET_PORT ...]

For each target port on 127.0.0.1 it listens on a free port and prints one line per target,
"PROXY_PORT TARGET_PORT", then forwards both ways, each chunk written DELAY_MS after it was read
(in order). benchmarks/pipeline.py puts one in front of each node (--delay-ms), so that every
crossing, client to node and node to node, pays the latency a real network would add. (netem
would do this in the kernel; it is not available on every machine.) Stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    async def send():
        while (item := await queue.get()) is not None:
            due, data = item
            await asyncio.sleep(max(due - loop.time(), 0))
            writer.write(data)
        writer.close()

    sender = asyncio.ensure_future(send())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait(None)
    await sender


def no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def main(delay: float, targets: list[int]) -> None:
    def handler(target: int):
        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
                no_delay(writer)
                no_delay(up_writer)
                await asyncio.gather(pipe(reader, up_writer, delay), pipe(up_reader, writer, delay))
            except (OSError, asyncio.CancelledError):  # (a cancelled handler's traceback on 3.11 is noise)
                writer.close()
        return handle

    servers = []
    for target in targets:
        server = await asyncio.start_server(handler(target), "127.0.0.1", 0)
        servers.append(server)
        print(server.sockets[0].getsockname()[1], target, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) / 1000, [int(p) for p in sys.argv[2:]]))
