#!/usr/bin/env python3
"""Socket-level checks for benches/uring/smoke.sh (standard library only).

  smoke.py echo --port P               echo server: every byte back, EOF -> shutdown
  smoke.py bulk --port P --mb N [--delay-read S]
                                       N MB of random bytes through an echo,
                                       sha256 of what came back must match
  smoke.py halfclose --port P --payload TEXT --expect TEXT
                                       send, shut the write half, read to EOF
  smoke.py refused --port P            the proxy must close us (its backend refuses)
  smoke.py idle --port P --count N --pid PID --base FDS
                                       N idle connections: the proxy must hold
                                       2N more descriptors, then close them
                                       (half with a reset)

Each client exits 0 on success and 1 with a message on failure.
"""

import argparse
import hashlib
import os
import socket
import struct
import sys
import threading
import time


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def echo(args):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(1024)

    def serve(c):
        with c:
            try:
                while True:
                    b = c.recv(65536)
                    if not b:
                        c.shutdown(socket.SHUT_WR)
                        # Wait for the peer's close before ours.
                        while c.recv(65536):
                            pass
                        return
                    c.sendall(b)
            except OSError:
                pass

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def bulk(args):
    total = args.mb * 1_000_000
    chunk = 1 << 20
    s = connect(args.port)
    sent = hashlib.sha256()
    err = []

    def send():
        try:
            left = total
            while left:
                b = os.urandom(min(chunk, left))
                sent.update(b)
                s.sendall(b)
                left -= len(b)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=send)
    t.start()
    # A reader that starts late makes the proxy hold back (backpressure).
    time.sleep(args.delay_read)
    got = hashlib.sha256()
    n = 0
    s.settimeout(30)
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        got.update(b)
        n += len(b)
    t.join()
    s.close()
    if err:
        fail(f"bulk send: {err[0]}")
    if n != total or got.digest() != sent.digest():
        fail(f"bulk: sent {total} bytes, got back {n}, digests {'match' if got.digest() == sent.digest() else 'differ'}")
    print(f"bulk: {total} bytes each way, sha256 matches")


def halfclose(args):
    s = connect(args.port)
    s.sendall(args.payload.encode().decode("unicode_escape").encode())
    s.shutdown(socket.SHUT_WR)
    s.settimeout(5)
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    if args.expect.encode() not in data:
        fail(f"half-close: expected {args.expect!r} in the reply, got {data[:200]!r}")
    print(f"half-close: {len(data)} bytes back after shutting the write half")


def refused(args):
    s = connect(args.port)
    s.settimeout(5)
    try:
        b = s.recv(1)
    except ConnectionResetError:
        b = b""
    except socket.timeout:
        fail("refused backend: the proxy kept the client open for 5 s")
    if b:
        fail(f"refused backend: got data {b!r}")
    print("refused: the client was closed")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds(pid, want, secs):
    deadline = time.time() + secs
    while time.time() < deadline:
        if fds(pid) == want:
            return True
        time.sleep(0.05)
    return False


def idle(args):
    conns = []
    for _ in range(args.count):
        conns.append(connect(args.port))
    want = args.base + 2 * args.count
    if not wait_fds(args.pid, want, 10):
        fail(f"idle: the proxy holds {fds(args.pid)} descriptors, expected {want}")
    # Half close with a reset, half with a FIN.
    for i, s in enumerate(conns):
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    if not wait_fds(args.pid, args.base, 10):
        fail(f"idle: after closing, the proxy holds {fds(args.pid)} descriptors, expected {args.base}")
    print(f"idle: {args.count} connections held with {2 * args.count} descriptors, all released")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("bulk")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--delay-read", type=float, default=0)
    p = sub.add_parser("halfclose")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--expect", required=True)
    p = sub.add_parser("refused")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("idle")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--base", type=int, required=True)
    args = ap.parse_args()
    {"echo": echo, "bulk": bulk, "halfclose": halfclose, "refused": refused, "idle": idle}[args.cmd](args)


if __name__ == "__main__":
    main()
