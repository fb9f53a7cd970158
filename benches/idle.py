#!/usr/bin/env python3
"""Idle-connection helper for benches/run.sh.

  idle.py hold --port P --status FILE [--host H ...] [--max-seconds S]
      Accepts connections on 127.0.0.1:P (or on port P of each --host)
      and holds them open, sending nothing. Writes "live=N accepted=M"
      to FILE whenever it changes.

  idle.py open --port P --count N --status FILE [--source A ...] [--max-seconds S]
      Opens N connections to 127.0.0.1:P (--concurrency connects in flight
      at once, 100 by default), sends nothing, and holds them until SIGTERM or S seconds.
      With --source, the connections take turns among those local
      addresses (such as 127.0.0.2 to 127.0.0.5), so more than one
      address's ephemeral ports are used: about 28,000 each.
      Writes "open=N failed=F closed=C done=0|1" to FILE as it goes.

Both end by themselves after --max-seconds, so no run is unbounded.
"""

import argparse
import asyncio
import os
import signal
import sys


def write_status(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class Status:
    """Counters flushed to a file at most every 50 ms, and at the end."""

    def __init__(self, path, fmt):
        self.path, self.fmt, self.c = path, fmt, {}
        self.last = None

    def flush(self):
        text = self.fmt.format(**self.c)
        if text != self.last:
            write_status(self.path, text)
            self.last = text

    async def run(self, stop):
        while not stop.is_set():
            self.flush()
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        self.flush()


def stop_event(max_seconds):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(max_seconds, stop.set)
    return stop


async def hold(args):
    st = Status(args.status, "live={live} accepted={accepted}")
    st.c = {"live": 0, "accepted": 0}
    conns = set()

    async def on_conn(reader, writer):
        st.c["live"] += 1
        st.c["accepted"] += 1
        conns.add(writer)
        try:
            while await reader.read(65536):
                pass
        except (OSError, asyncio.CancelledError):
            # Cancelled at shutdown: end quietly rather than log each one.
            pass
        finally:
            st.c["live"] -= 1
            conns.discard(writer)
            writer.close()

    servers = [
        await asyncio.start_server(
            on_conn, host, args.port, backlog=4096, reuse_address=True
        )
        for host in (args.host or ["127.0.0.1"])
    ]
    stop = stop_event(args.max_seconds)
    await st.run(stop)
    for server in servers:
        server.close()
    for w in list(conns):
        w.close()


async def open_conns(args):
    st = Status(args.status, "open={open} failed={failed} closed={closed} done={done}")
    st.c = {"open": 0, "failed": 0, "closed": 0, "done": 0}
    stop = stop_event(args.max_seconds)
    sem = asyncio.Semaphore(args.concurrency)
    loop = asyncio.get_running_loop()
    writers = []
    watchers = []
    last_error = []

    async def watch(reader):
        # The proxy may close a connection it cannot serve: count it.
        try:
            await reader.read(1)
        except OSError:
            pass
        except asyncio.CancelledError:
            return
        st.c["open"] -= 1
        st.c["closed"] += 1

    sources = args.source or [None]

    async def one(i):
        async with sem:
            if stop.is_set():
                return
            src = sources[i % len(sources)]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1",
                        args.port,
                        local_addr=(src, 0) if src else None,
                    ),
                    10,
                )
            except (OSError, asyncio.TimeoutError) as e:
                st.c["failed"] += 1
                last_error[:] = [repr(e)]
                return
            writers.append(writer)
            st.c["open"] += 1
            watchers.append(loop.create_task(watch(reader)))

    status_task = loop.create_task(st.run(stop))
    await asyncio.gather(*(one(i) for i in range(args.count)))
    st.c["done"] = 1
    if last_error:
        print(f"idle.py: last connect error: {last_error[0]}", file=sys.stderr)
    await stop.wait()
    await status_task
    for w in writers:
        w.close()
    for t in watchers:
        t.cancel()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    o = sub.add_parser("open")
    for a in (h, o):
        a.add_argument("--port", type=int, required=True)
        a.add_argument("--status", required=True)
        a.add_argument("--max-seconds", type=float, default=600)
    h.add_argument("--host", action="append", help="address to listen on (repeatable)")
    o.add_argument("--source", action="append", help="local address to connect from (repeatable)")
    o.add_argument("--count", type=int, required=True)
    o.add_argument("--concurrency", type=int, default=100)
    args = p.parse_args()
    asyncio.run(hold(args) if args.cmd == "hold" else open_conns(args))


if __name__ == "__main__":
    main()
