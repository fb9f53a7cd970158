#!/usr/bin/env python3
"""Open-loop-ish connection load for benches/upgrade.sh.

  connload.py --port P --out FILE [--marks FILE] [--threads 4]
              [--timeout 3] [--window 1] [--max-seconds 600]

Each of --threads threads opens a fresh TCP connection to 127.0.0.1:P as
soon as its previous one is done, sends one HTTP/1.1 GET with
"Connection: close", reads until the server closes, and records when the
request began (wall clock), how long it took, and what became of it:

  ok         a complete "HTTP/1.x 200" reply (body as long as Content-Length)
  refused    connect() refused (nothing listening)
  reset      ECONNRESET / EPIPE while connecting, sending or reading
  timeout    no connect, or no complete reply, within --timeout seconds
  bad_reply  the server closed with no reply, a partial one, or not a 200
  other      any other socket error (named in "detail")

It runs until SIGTERM or SIGINT (or --max-seconds), then reads --marks:
one hand-over per line, "BEGIN END [LABEL]", both Unix times in seconds
(a line with only BEGIN is a hand-over of no duration). It writes a JSON
summary to --out:

  overall   every request of the run
  around    requests that began within [BEGIN - window, END + window] of
            some hand-over (the union of those intervals)
  outside   the rest
  handovers each hand-over with its own window's counts

each with total, ok, failed (by kind), latency_ms (p50, p99, p99.9, max
over the successful requests, in ms, from before connect() until the
server closed) and longest_gap_ms (the longest time between two
successful replies). "detail" counts every failure by kind and where it
happened; "first_failures" lists the first 20 with their time relative
to the nearest hand-over.

Standard library only. wrk is not used for this: its closed loop retries
on the same few connections and folds connect errors into one counter.
"""

import argparse
import errno
import json
import signal
import socket
import sys
import threading
import time

KINDS = ("refused", "reset", "timeout", "bad_reply", "other")


def one_request(host, port, timeout, request):
    """Returns (kind, detail)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    phase = "connect"
    data = bytearray()
    try:
        s.connect((host, port))
        phase = "send"
        s.sendall(request)
        phase = "read"
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > 1 << 20:
                return "bad_reply", "reply over 1 MiB"
        return judge(bytes(data))
    except ConnectionRefusedError:
        return "refused", phase
    except (ConnectionResetError, BrokenPipeError) as e:
        if phase == "read" and judge(bytes(data))[0] == "ok":
            # The whole reply arrived, then a reset instead of a FIN.
            return "ok", "reset after a complete reply"
        return "reset", f"{phase} ({errno.errorcode.get(e.errno, e.errno)}, {len(data)} bytes read)"
    except socket.timeout:
        return "timeout", f"{phase} ({len(data)} bytes read)"
    except OSError as e:
        return "other", f"{phase}: {errno.errorcode.get(e.errno, e.errno)}"
    finally:
        s.close()


def judge(data):
    if not data:
        return "bad_reply", "closed without a reply"
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "bad_reply", f"closed within the headers ({len(data)} bytes)"
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ")
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or status[1] != b"200":
        return "bad_reply", "status line " + lines[0][:40].decode("latin-1")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                want = int(value.strip())
            except ValueError:
                return "bad_reply", "bad Content-Length"
            if len(body) != want:
                return "bad_reply", f"body {len(body)} of {want} bytes"
    return "ok", ""


def worker(args, request, stop, out):
    host, port, timeout = args.host, args.port, args.timeout
    rec = out.append
    clock, mono = time.time, time.perf_counter
    while not stop.is_set():
        t0 = clock()
        m0 = mono()
        kind, detail = one_request(host, port, timeout, request)
        rec((t0, (mono() - m0) * 1000.0, kind, detail))


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return round(sorted_vals[i], 3)


def summarize(recs):
    failed = {k: 0 for k in KINDS}
    lat = []
    done = []  # completion times of successful requests
    for t0, ms, kind, _ in recs:
        if kind == "ok":
            lat.append(ms)
            done.append(t0 + ms / 1000.0)
        else:
            failed[kind] += 1
    lat.sort()
    done.sort()
    gap = 0.0
    for a, b in zip(done, done[1:]):
        gap = max(gap, b - a)
    return {
        "total": len(recs),
        "ok": len(lat),
        "failed_total": len(recs) - len(lat),
        "failed": failed,
        "latency_ms": {
            "p50": pct(lat, 50),
            "p99": pct(lat, 99),
            "p99.9": pct(lat, 99.9),
            "max": round(lat[-1], 3) if lat else None,
        },
        "longest_gap_ms": round(gap * 1000.0, 1),
    }


def read_marks(path):
    marks = []
    if not path:
        return marks
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                begin = float(parts[0])
                end = float(parts[1]) if len(parts) > 1 else begin
                label = " ".join(parts[2:])
                marks.append((begin, end, label))
    except FileNotFoundError:
        pass
    return marks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--marks")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    args = ap.parse_args()

    request = (
        f"GET / HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "User-Agent: sluice-connload\r\nConnection: close\r\n\r\n"
    ).encode()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lists = [[] for _ in range(args.threads)]
    threads = [
        threading.Thread(target=worker, args=(args, request, stop, lists[i]), daemon=True)
        for i in range(args.threads)
    ]
    started = time.time()
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(0.1)
    stop.set()
    for t in threads:
        t.join(args.timeout + 5)
    ended = time.time()

    recs = sorted(r for l in lists for r in l)
    marks = read_marks(args.marks)
    w = args.window
    windows = [(b - w, e + w) for b, e, _ in marks]

    def inside(t):
        return any(lo <= t <= hi for lo, hi in windows)

    around = [r for r in recs if inside(r[0])]
    outside = [r for r in recs if not inside(r[0])]
    per = []
    for (b, e, label), (lo, hi) in zip(marks, windows):
        s = summarize([r for r in recs if lo <= r[0] <= hi])
        s.update({"begin": b, "end": e, "duration_ms": round((e - b) * 1000.0, 1), "label": label})
        per.append(s)
    around_summary = summarize(around)
    # Windows need not touch: the longest gap around the hand-overs is the
    # longest within one window, not the time between two windows.
    around_summary["longest_gap_ms"] = max((p["longest_gap_ms"] for p in per), default=0.0)

    detail = {}
    first = []
    for t0, ms, kind, d in recs:
        if kind == "ok" and not d:
            continue
        key = f"{kind}: {d}" if d else kind
        detail[key] = detail.get(key, 0) + 1
        if kind != "ok" and len(first) < 20:
            near = min(marks, key=lambda m: abs(t0 - m[0]), default=None)
            first.append({
                "time": round(t0, 6),
                "kind": kind,
                "detail": d,
                "latency_ms": round(ms, 3),
                "since_handover_begin_ms": round((t0 - near[0]) * 1000.0, 1) if near else None,
                "handover": near[2] if near else None,
            })

    result = {
        "threads": args.threads,
        "timeout_s": args.timeout,
        "window_s": w,
        "started": started,
        "ended": ended,
        "duration_s": round(ended - started, 3),
        "requests_per_s": round(len(recs) / max(ended - started, 1e-9), 1),
        "overall": summarize(recs),
        "around": around_summary,
        "outside": summarize(outside),
        "handovers": per,
        "detail": detail,
        "first_failures": first,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
