"""scripts/latency-windows.py on traces in the format `llm-router-bench
--trace-dir` writes: it must find the windows where everything stalled,
and count the slow requests in them."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "latency-windows.py"
START = 1_796_000_000_000_000  # microseconds since the Unix epoch


def run(trace_path, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(trace_path), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def write_trace(path, requests):
    lines = ["start_unix_us\tlatency_us\tconnection"]
    lines += [f"{START + start}\t{latency}\t{connection}" for start, latency, connection in requests]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_stall_of_every_connection_is_found_and_holds_the_slow_requests(tmp_path):
    # One second of 4 connections, a request each per ms at 2 ms; from
    # 500 to 550 ms every request takes 40 ms instead.
    requests = []
    for ms in range(1000):
        stalled = 500 <= ms < 550
        for connection in range(4):
            requests.append((ms * 1000, 40_000 if stalled else 2_000, connection))
    trace = tmp_path / "load-001.tsv"
    write_trace(trace, requests)

    answer = run(trace)
    assert answer.returncode == 0, answer.stderr
    assert "4000 requests" in answer.stdout
    stops = [line.split() for line in answer.stdout.splitlines() if line.strip().startswith("500 ")]
    assert len(stops) == 1, answer.stdout
    offset, wall_clock, count, p50, _p99, waited = stops[0]
    assert (offset, count, p50, waited) == ("500", "200", "40.0", "0"), answer.stdout
    assert float(wall_clock) == (START + 500_000) / 1e6
    # 5 % of the requests were slow: the p99 is 40 ms itself, and none is
    # over it; with 25 ms windows the same stop is two windows.
    assert "1 stops of 20 windows" in answer.stdout
    assert "2 stops of 40 windows" in run(trace, "--window-ms", "25").stdout


def test_the_slowest_requests_are_counted_where_they_started(tmp_path):
    # Three seconds at a request per ms. From 1,000 to 1,050 ms everything
    # stalls: each request started there takes 100 to 149 ms. Ten more,
    # scattered, take 200 ms each, alone in their windows. The p99 is then
    # the stall's 129 ms: over it are its last 20 and the scattered 10.
    requests = []
    for ms in range(3000):
        latency = 100_000 + (ms - 1000) * 1000 if 1000 <= ms < 1050 else 2_000
        requests.append((ms * 1000, latency, ms % 8))
    for n in range(10):
        requests.append((2_000_500 + n * 60_000, 200_000, n % 8))
    trace = tmp_path / "load-002.tsv"
    write_trace(trace, requests)

    answer = run(trace)
    assert answer.returncode == 0, answer.stderr
    assert "1 stops of 60 windows" in answer.stdout, answer.stdout
    assert "20 of the 30 requests over the p99 (129.0 ms)" in answer.stdout, answer.stdout


def test_a_file_that_is_not_a_trace_is_refused_by_name(tmp_path):
    not_a_trace = tmp_path / "other.tsv"
    not_a_trace.write_text("a\tb\tc\n1\t2\t3\n", encoding="utf-8")
    answer = run(not_a_trace)
    assert answer.returncode != 0
    assert "not a trace of llm-router-bench" in answer.stderr

    torn = tmp_path / "torn.tsv"
    torn.write_text("start_unix_us\tlatency_us\tconnection\n1\t2\n", encoding="utf-8")
    answer = run(torn)
    assert answer.returncode != 0
    assert "torn.tsv:2: expected 3 fields, found 2" in answer.stderr
