#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need, builds,
# runs the Rust suites, then the Python compatibility suite (official
# `ollama` and `openai` clients) in a virtualenv under .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Python with venv and pip: the machine's python3 usually has both; if not,
# Debian's packages do.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  log "Installing python3-venv from Debian's packages"
  apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
fi

# Debian packages the tests use: libfaketime (the clock-jump test moves the
# router's wall clock with it), Chromium and its WebDriver (the dashboard's
# end-to-end test), prlimit (the full-disk test), PostgreSQL's server (the
# shared-registry tests start throwaway clusters of it, as the `postgres`
# user when run as root).
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "$(id -u)" = 0 ]; then command -v runuser >/dev/null 2>&1 || missing+=(util-linux); fi
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(faketime)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  log "Installing from Debian's packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

log "Building (release binaries too: the Python suite runs them)"
cargo build --workspace --all-targets --locked
cargo build --workspace --release --bins --locked

log "Rust tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

log "Packaging: cargo install --path coordinator and --path agent"
install_root=$(mktemp -d)
cargo install --locked --quiet --path coordinator --root "$install_root" --target-dir target
cargo install --locked --quiet --path agent --root "$install_root" --target-dir target
"$install_root/bin/llm-router" --version
"$install_root/bin/llm-router-agent" --version
# What ships carries no debug info or symbols.
python3 scripts/lib/check-stripped.py "$install_root/bin/llm-router" "$install_root/bin/llm-router-agent"
rm -rf "$install_root"

if [ -d tests/python ] && ls tests/python/test_*.py >/dev/null 2>&1; then
  log "Python compatibility tests"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q -r tests/python/requirements.txt
  LLM_ROUTER_BIN_DIR="$PWD/target/release" .venv/bin/python -m pytest -q tests/python
fi
log "All tests passed."
