#!/usr/bin/env python3
"""Latency of one admin API call, for benches/scale.sh.

  admin_latency.py --admin 127.0.0.1:9000 --path /backends [--n 100]

Sends the GET --n times, each on a new connection as curl would, reads
the whole reply, and prints "p50_ms p99_ms max_ms bytes" (bytes of the
last reply). Exits 1 on any status other than 200.
"""

import argparse
import http.client
import math
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--admin", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    host, port = args.admin.rsplit(":", 1)
    times = []
    size = 0
    for _ in range(args.n):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("GET", args.path)
        r = c.getresponse()
        body = r.read()
        c.close()
        times.append((time.perf_counter() - t0) * 1000)
        if r.status != 200:
            print(f"admin_latency.py: GET {args.path}: {r.status} {body[:200]!r}", file=sys.stderr)
            sys.exit(1)
        size = len(body)
    times.sort()
    # The nearest-rank percentile: with 100 samples, p99 is the 99th.
    pick = lambda q: times[max(0, math.ceil(q * len(times)) - 1)]
    print(f"{pick(0.5):.2f} {pick(0.99):.2f} {times[-1]:.2f} {size}")


if __name__ == "__main__":
    main()
