#!/usr/bin/env bash
# User-space instructions the router spends per proxied request, per
# `GET /health`, per heartbeat and per registration, counted by valgrind's
# callgrind. The count repeats to about 1 % (0.3 % for /health), where CPU
# time on this shared two-core machine moves 5 % and throughput 10 %. It is
# the A/B measure for a change of a few percent in the router's own work (see
# BENCHMARKS.md); it does not count the kernel's part, which is the same
# for every proxy (four socket calls per request).
#
#   bash scripts/instructions.sh                      # target/release/llm-router
#   bash scripts/instructions.sh OLD_BINARY NEW_BINARY
#   KEEP_PROFILES=DIR bash scripts/instructions.sh BINARY   # keeps each
#       callgrind output as DIR/<binary>-<request>.out, for
#       `callgrind_annotate --inclusive=yes` (build with `--profile profiling`)
#
# Each binary serves on loopback in front of nginx answering a fixed JSON
# body; one keep-alive connection sends 300 requests to warm up, the
# counters are zeroed, then REQUESTS (3,000) chat requests and as many
# `GET /health` are counted. For heartbeats, 1,000 agents are registered
# (on loopback ports where nothing listens, health checks off, as in the
# suite's fleet), each heartbeats once to warm up, then REQUESTS
# heartbeats with the suite's report body go round them. Registrations:
# 300 to warm up, then REQUESTS more, each a new machine with the suite's
# storm body, counted at the router's default log level (their log line
# is part of their cost; the other requests log nothing). The writer
# thread's journal lines and fsyncs are counted with them. Needs valgrind
# and nginx (installed from Debian's packages when missing) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${REQUESTS:-3000}"

for package in valgrind nginx; do
  if ! command -v "$package" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$package" ]; then
    echo "==> Installing $package from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
  fi
done

if [ "$#" -eq 0 ]; then
  cargo build --release -q -p coordinator --bin llm-router
  set -- target/release/llm-router
fi

work="$(mktemp -d)"
nginx_pid=""
router_pid=""
cleanup() {
  [ -n "$router_pid" ] && kill "$router_pid" 2>/dev/null || true
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

server_port="$(free_port)"
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx/body;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$server_port;
        location / {
            default_type application/json;
            return 200 '{"model":"bench","created_at":"2026-01-01T00:00:00Z","response":"Hello from nginx","done":true}';
        }
    }
}
CONF
nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
nginx_pid=$!

# The client: registration, warm-up and the counted requests, on one
# keep-alive connection each; exits non-zero on any answer but 200.
cat > "$work/client.py" <<'PY'
import http.client, json, sys, time
port, command = int(sys.argv[1]), sys.argv[2]
deadline = time.time() + 60
while True:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/health")
        connection.getresponse().read()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the router did not answer /health within 60 s")
        time.sleep(0.2)
if command == "fleet":
    ids = []
    for n in range(1000):
        node = {"machine_name": f"node-{n}", "ip_address": "127.0.0.1", "port": 20000 + n,
                "runtime_version": "0.5.7", "models": ["llama3.1:8b"],
                "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 2, "total_memory": 1 << 30}}
        connection.request("POST", "/api/agents/register", json.dumps(node), {"Content-Type": "application/json"})
        answer = connection.getresponse()
        ids.append(json.loads(answer.read())["id"])
    json.dump(ids, open(sys.argv[3], "w"))
    sys.exit(0)
if command == "register":
    node = {"machine_name": "nginx", "ip_address": "127.0.0.1", "port": int(sys.argv[3]),
            "runtime_version": "0.5.7", "models": ["bench"],
            "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 2, "total_memory": 1 << 30}}
    connection.request("POST", "/api/agents/register", json.dumps(node), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    sys.exit(0 if answer.status in (200, 201) else f"registration answered {answer.status}")
count, path = int(sys.argv[3]), sys.argv[4]
body = b'{"model":"bench","messages":[{"role":"user","content":"Why is the sky blue?"}]}'
# Each registration a new machine: the warm-up and the counted run must not
# reuse a name, or the router would answer re-registrations instead.
first_machine = int(sys.argv[5]) if path == "register" else 0
if path == "heartbeat":
    ids = json.load(open(sys.argv[5]))
    # The suite's heartbeat body (bench/src/scenarios.rs, HEARTBEAT_BODY).
    body = b'{"models":["llama3.1:8b","qwen2.5:7b"],"loaded_models":["llama3.1:8b"],"requests_in_flight":1,"llm_server_up":true,"cpu_usage_percent":37.5,"memory_used":68719476736}'
for n in range(count):
    if path == "/health":
        connection.request("GET", path)
    elif path == "heartbeat":
        agent = ids[(n * 7919) % len(ids)]
        connection.request("POST", f"/api/agents/{agent}/heartbeat", body, {"Content-Type": "application/json"})
    elif path == "register":
        # The suite's storm body (bench/src/scenarios.rs, fleet_registration).
        machine = first_machine + n
        node = {"machine_name": f"gpu-{machine:06}", "ip_address": f"127.{(machine >> 16) & 255}.{(machine >> 8) & 255}.{max(machine & 255, 2)}",
                "port": 11434, "runtime_version": "0.5.7",
                "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 32, "total_memory": 137438953472},
                "models": ["llama3.1:8b", "qwen2.5:7b"]}
        connection.request("POST", "/api/agents/register", json.dumps(node), {"Content-Type": "application/json"})
    else:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    if answer.status != (201 if path == "register" else 200):
        sys.exit(f"{path} answered {answer.status}")
PY

# Instructions per request of `binary` on `path` (or per heartbeat).
count() {
  local binary="$1" path="$2"
  local port log_level warm_up=300 checks=()
  port="$(free_port)"
  rm -rf "$work/data" "$work"/callgrind.out*
  [ "$path" = heartbeat ] || [ "$path" = register ] && checks=(--health-check-interval 0)
  # A registration's log line is part of its cost, so it is counted at the
  # router's default level; the other requests log nothing at either level.
  log_level=warn
  [ "$path" = register ] && log_level=info
  RUST_LOG="$log_level" valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
    "$binary" --host 127.0.0.1 --port "$port" --data-dir "$work/data" --agent-timeout 3600 \
    "${checks[@]}" > "$work/router.log" 2>&1 &
  router_pid=$!
  if [ "$path" = heartbeat ]; then
    python3 "$work/client.py" "$port" fleet "$work/ids.json"
    warm_up=1000
  else
    python3 "$work/client.py" "$port" register "$server_port"
  fi
  # The last argument: the fleet's ids for heartbeats, the number of the
  # first new machine for registrations.
  local warm_up_from="$work/ids.json" counted_from="$work/ids.json"
  [ "$path" = register ] && warm_up_from=0 && counted_from="$warm_up"
  python3 "$work/client.py" "$port" requests "$warm_up" "$path" "$warm_up_from"
  callgrind_control -z "$router_pid" > /dev/null 2>&1
  python3 "$work/client.py" "$port" requests "$REQUESTS" "$path" "$counted_from"
  callgrind_control -d "$router_pid" > /dev/null 2>&1
  kill "$router_pid"
  wait "$router_pid" 2>/dev/null || true
  router_pid=""
  if [ -n "${KEEP_PROFILES:-}" ]; then
    mkdir -p "$KEEP_PROFILES"
    cp "$work/callgrind.out.1" "$KEEP_PROFILES/$(basename "$binary")-$(echo "$path" | tr -c 'a-z0-9\n' '_' | sed 's/^_*//').out"
  fi
  local total
  total="$(callgrind_annotate "$work/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
  echo $((total / REQUESTS))
}

printf '%-40s %14s %14s %14s %14s\n' "binary" "chat Ir/req" "/health Ir/req" "heartbeat Ir" "register Ir"
for binary in "$@"; do
  printf '%-40s %14s %14s %14s %14s\n' "$binary" "$(count "$binary" /v1/chat/completions)" \
    "$(count "$binary" /health)" "$(count "$binary" heartbeat)" "$(count "$binary" register)"
done
