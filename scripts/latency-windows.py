#!/usr/bin/env python3
"""When did a load's slow requests happen? Reads a trace that
`llm-router-bench --trace-dir DIR` wrote (DIR/load-NNN.tsv: start in
microseconds since the Unix epoch, latency in microseconds, connection)
and prints:

- the latency percentiles of the whole load;
- each window (50 ms by default) whose median is over twice the load's: a
  *stop*, when the whole system stalled rather than one request being
  unlucky. Each stop is shown with its offset from the load's start, its
  start on the wall clock (to lay beside `perf sched` or a router's log),
  its requests, p50 and p99, and how many connections waited longer than
  the load's p99 in it;
- how many of the requests slower than the load's p99 started in a stop.

    python3 scripts/latency-windows.py DIR/load-001.tsv [--window-ms 50]
"""

import argparse
import sys


def quantile(sorted_values, q):
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a load-NNN.tsv written by llm-router-bench --trace-dir")
    parser.add_argument("--window-ms", type=float, default=50.0)
    args = parser.parse_args()

    requests = []
    with open(args.trace, encoding="utf-8") as lines:
        header = next(lines, "")
        if not header.startswith("start_unix_us"):
            sys.exit(f"{args.trace}: not a trace of llm-router-bench (no header line)")
        for number, line in enumerate(lines, start=2):
            fields = line.split("\t")
            if len(fields) != 3:
                sys.exit(f"{args.trace}:{number}: expected 3 fields, found {len(fields)}")
            requests.append((int(fields[0]), int(fields[1]), int(fields[2])))
    if not requests:
        sys.exit(f"{args.trace}: no requests")

    latencies = sorted(latency for _, latency, _ in requests)
    p50, p99 = quantile(latencies, 0.5), quantile(latencies, 0.99)
    print(f"{len(requests)} requests; latency in ms:")
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        print(f"  p{q * 100:g}: {quantile(latencies, q) / 1000:.1f}")
    print(f"  max: {latencies[-1] / 1000:.1f}")

    first = min(start for start, _, _ in requests)
    width = int(args.window_ms * 1000)
    windows = {}
    for start, latency, connection in requests:
        windows.setdefault((start - first) // width, []).append((latency, connection))

    stops = []
    for index in sorted(windows):
        window = windows[index]
        ordered = sorted(latency for latency, _ in window)
        if quantile(ordered, 0.5) > 2 * p50:
            stops.append((index, window, ordered))

    print(f"\nstops ({args.window_ms:g} ms windows with a median over twice the load's {p50 / 1000:.1f} ms):")
    print("  offset ms  wall clock (unix s)  requests  p50 ms  p99 ms  connections over the load's p99")
    for index, window, ordered in stops:
        waited = {connection for latency, connection in window if latency > p99}
        print(
            f"  {index * args.window_ms:9.0f}  {(first + index * width) / 1e6:19.3f}  {len(window):8d}"
            f"  {quantile(ordered, 0.5) / 1000:6.1f}  {quantile(ordered, 0.99) / 1000:6.1f}  {len(waited)}"
        )
    slow = sum(1 for latency in latencies if latency > p99)
    in_stops = sum(1 for _, window, _ in stops for latency, _ in window if latency > p99)
    share = 100 * in_stops / slow if slow else 0
    print(
        f"\n{len(stops)} stops of {len(windows)} windows; {in_stops} of the {slow} requests over the"
        f" p99 ({p99 / 1000:.1f} ms) started in one ({share:.0f} %)"
    )


if __name__ == "__main__":
    main()
