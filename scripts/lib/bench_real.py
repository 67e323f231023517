"""Routing with real servers: two llama.cpp servers (llama-cpp-python,
SmolLM2-135M, one thread each) behind llm-router under each balancer and
behind SGLang's model gateway (smg, cache-aware), on the same workloads:
multi-turn conversations with 1,500-token system prompts (6 turns, 1 and 4
at a time), independent prompts, one system prompt shared by many users.
Prints p50/p99 time to first token, p50 total time and tokens per second.
Every process listens on 127.0.0.1; the servers are restarted for each
router so that no run inherits another's prompt cache."""

import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.environ["LLAMA_VENV"]
MODEL = os.environ["MODEL_FILE"]
ROUTER = os.path.join(ROOT, "target", "release", "llm-router")
AGENT = os.path.join(ROOT, "target", "release", "llm-router-agent")
WORK = tempfile.mkdtemp(prefix="bench-real-")
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "16"))
processes = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name, command):
    log = open(os.path.join(WORK, f"{name}.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    processes.append(process)
    return process


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_http(port, path, what):
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not start on port {port}")


def words(seed, count):
    rng = random.Random(seed)
    vocabulary = ("model router fleet server cache prompt token answer question node request "
                  "latency memory thread queue system user reply context window length order").split()
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def system_prompt(seed):
    # About 1,500 tokens of SmolLM2's tokenizer.
    return f"You are assistant {seed}. Use this background: " + words(seed, 1_400)


def chat(port, messages):
    """One streamed chat: (time to first token, total time, tokens)."""
    body = json.dumps({"model": "smollm2", "messages": messages, "stream": True,
                       "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    began = time.time()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    first, tokens, text = None, 0, []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
        if delta:
            if first is None:
                first = time.time() - began
            tokens += 1
            text.append(delta)
    total = time.time() - began
    return (first if first is not None else total), total, tokens, "".join(text)


def run_parallel(jobs, concurrency):
    """Runs each job (a list of requests to make in order) on `concurrency` threads."""
    results, errors, lock = [], [0], threading.Lock()
    pending = list(jobs)

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            try:
                for sample in job():
                    with lock:
                        results.append(sample)
            except Exception as error:  # an error is counted, and shown
                print(f"   error: {error}", file=sys.stderr)
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors[0]


def conversation_job(port, seed, turns=6):
    def job():
        messages = [{"role": "system", "content": system_prompt(seed)}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Question {turn}: what does {words(seed * 10 + turn, 6)} mean?"})
            first, total, tokens, text = chat(port, messages)
            messages.append({"role": "assistant", "content": text})
            yield first, total, tokens
    return job


def single_job(port, messages):
    def job():
        first, total, tokens, _ = chat(port, messages)
        yield first, total, tokens
    return job


def workloads(port, salt):
    """(name, jobs, concurrency); `salt` keeps runs from sharing prompts."""
    shared = system_prompt(salt * 1000 + 999)
    return [
        ("conversations, 1 at a time (2 x 6 turns)", [conversation_job(port, salt * 1000 + c) for c in range(2)], 1),
        ("conversations, 4 at a time (4 x 6 turns)", [conversation_job(port, salt * 1000 + 10 + c) for c in range(4)], 4),
        ("independent prompts (8, 2 at a time)",
         [single_job(port, [{"role": "user", "content": words(salt * 1000 + 100 + n, 120)}]) for n in range(8)], 2),
        ("one system prompt, 8 users (2 at a time)",
         [single_job(port, [{"role": "system", "content": shared},
                            {"role": "user", "content": f"User {n}: {words(salt * 1000 + 200 + n, 8)}?"}]) for n in range(8)], 2),
    ]


def start_servers():
    servers = []
    for n in range(2):
        port = free_port()
        process = start(f"llama-{n}", [os.path.join(VENV, "bin", "python"), "-m", "llama_cpp.server",
                                       "--model", MODEL, "--model_alias", "smollm2", "--host", "127.0.0.1",
                                       "--port", str(port), "--n_ctx", "4096", "--n_threads", "1",
                                       "--n_threads_batch", "1",
                                       # By default a new request interrupts the one running,
                                       # which then ends with no tokens: queue them instead.
                                       "--interrupt_requests", "false"])
        servers.append((port, process))
    for port, _ in servers:
        wait_http(port, "/v1/models", "a llama.cpp server")
    return servers


def start_ours(balancer, servers):
    """The router and, beside each server, the real agent (heartbeats every
    5 s), as a user runs them."""
    port = free_port()
    started = [start(f"router-{balancer}", [ROUTER, "--host", "127.0.0.1", "--port", str(port),
                                             "--data-dir", os.path.join(WORK, f"data-{balancer}"),
                                             "--balancer", balancer])]
    wait_http(port, "/health", "llm-router")
    for n, (server_port, _) in enumerate(servers):
        started.append(start(f"agent-{balancer}-{n}", [AGENT, "--router-url", f"http://127.0.0.1:{port}",
                                                       "--backend-url", f"http://127.0.0.1:{server_port}",
                                                       "--machine-name", f"llama-{n}", "--advertise-ip", "127.0.0.1",
                                                       "--heartbeat-interval", "5",
                                                       "--state-dir", os.path.join(WORK, f"agent-{balancer}-{n}")]))
    deadline = time.time() + 60
    while time.time() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("GET", "/api/agents")
        agents = json.loads(connection.getresponse().read())
        if sum(1 for agent in agents if agent.get("routable")) == len(servers):
            return port, started
        time.sleep(0.2)
    sys.exit("the agents did not register")


def start_smg(servers):
    """smg's regular mode checks workers at GET /health, which
    llama-cpp-python's server lacks: an nginx shim in front of each server
    answers it and passes everything else through, unbuffered."""
    started, workers = [], []
    for n, (server_port, _) in enumerate(servers):
        shim = free_port()
        conf = os.path.join(WORK, f"shim-{n}.conf")
        with open(conf, "w") as f:
            f.write(f"""daemon off; worker_processes 1; pid {WORK}/shim-{n}.pid; error_log {WORK}/shim-{n}.err;
events {{ worker_connections 256; }}
http {{ access_log off; client_body_temp_path {WORK}/shim-{n}-body;
  server {{ listen 127.0.0.1:{shim};
    location = /health {{ return 200 "ok"; }}
    location / {{ proxy_pass http://127.0.0.1:{server_port}; proxy_http_version 1.1; proxy_buffering off;
                 proxy_read_timeout 600s; proxy_set_header Connection ""; }} }} }}
""")
        started.append(start(f"shim-{n}", ["nginx", "-c", conf, "-p", WORK]))
        wait_http(shim, "/health", "an nginx shim")
        workers.append(f"http://127.0.0.1:{shim}")
    port = free_port()
    started.append(start("smg", [os.path.join(VENV, "bin", "smg"), "launch", "--host", "127.0.0.1", "--port", str(port),
                                 "--worker-urls", *workers, "--policy", "cache_aware",
                                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]))
    wait_http(port, "/health", "smg")
    time.sleep(2)  # its first health round
    return port, started


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main():
    routers = os.environ.get("ROUTERS", "round-robin,least-busy,cache-aware,smg").split(",")
    table = {}
    for salt, name in enumerate(routers, start=1):
        print(f"== {name}", flush=True)
        servers = start_servers()
        port, started = start_smg(servers) if name == "smg" else start_ours(name, servers)
        for workload, jobs, concurrency in workloads(port, salt):
            began = time.time()
            results, errors = run_parallel(jobs, concurrency)
            elapsed = time.time() - began
            firsts = [r[0] for r in results] or [float("nan")]
            totals = [r[1] for r in results] or [float("nan")]
            tokens = sum(r[2] for r in results)
            row = (statistics.median(firsts), percentile(firsts, 0.99), statistics.median(totals),
                   tokens / elapsed if elapsed else 0.0, errors, len(results))
            table.setdefault(workload, {})[name] = row
            print(f"   {workload}: TTFT p50 {row[0]:.2f} s, p99 {row[1]:.2f} s, total p50 {row[2]:.2f} s, "
                  f"{row[3]:.2f} tokens/s, {errors} errors, {len(results)} requests", flush=True)
        for process in started:
            stop(process)
        for _, process in servers:
            stop(process)
    print()
    for workload, rows in table.items():
        print(f"**{workload}**\n")
        print("| router | TTFT p50 | TTFT p99 | total p50 | tokens/s | errors |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {row[0]:.2f} s | {row[1]:.2f} s | {row[2]:.2f} s | {row[3]:.2f} | {row[4]} |")
        print()


try:
    main()
finally:
    for process in processes:
        if process.poll() is None:
            process.kill()
