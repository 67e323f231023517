#!/usr/bin/env bash
# The benchmark suite, one command: installs nginx from Debian's packages if
# it is missing, builds the release binaries, runs the load generator (every
# figure as the median of several runs; see BENCHMARKS.md) and the criterion
# micro-benchmarks, and checks that it left no process behind.
#
#   bash scripts/bench.sh                  # 3 runs, 5 s per measurement
#   RUNS=5 bash scripts/bench.sh --only proxy
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "==> Installing nginx from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi

# nginx's stream module: the plain TCP relay of the side-by-side scenario,
# the ceiling no HTTP proxy can pass on this machine.
if [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  echo "==> Installing nginx's stream module from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "==> Installing PostgreSQL from Debian's packages (the shared-registry scenario)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The field's Rust LLM routers, from PyPI, for the side-by-side scenario
# (`peers`): in a virtualenv outside the repository, made once and reused.
PEERS_VENV="${PEERS_VENV:-$HOME/.cache/llm-router-bench/peers}"
if [ ! -x "$PEERS_VENV/bin/smg" ] || [ ! -x "$PEERS_VENV/bin/sglang-router" ] || [ ! -x "$PEERS_VENV/bin/vllm-router" ]; then
  echo "==> Installing smg, sglang-router and vllm-router from PyPI into $PEERS_VENV"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$PEERS_VENV"
  "$PEERS_VENV/bin/pip" install -q smg sglang-router vllm-router
fi
export PEERS_VENV

ours() { { pgrep -x nginx; pgrep -x llm-router; pgrep -x llm-standin; pgrep -f llm-router-agent; pgrep -f llm-router-pg-; pgrep -f "$PEERS_VENV/bin/"; true; } | wc -l; }
before=$(ours)

echo "==> Building release binaries"
cargo build --release --locked --bins -q

echo "==> Load generator ($(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB)"
./target/release/llm-router-bench --runs "${RUNS:-3}" --seconds "${MEASURE_SECONDS:-5}" "$@"

echo "==> Micro-benchmarks (criterion)"
cargo bench --locked -p bench --bench pick 2>&1 | grep -E '^(choose|plan|cache-aware)|time:'

after=$(ours)
if [ "$after" -gt "$before" ]; then
  echo "the benchmarks left $((after - before)) process(es) behind" >&2
  exit 1
fi
echo "==> No process left behind."
