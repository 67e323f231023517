#!/usr/bin/env bash
# The long crash-safety loop: kill -9 the real router at random moments
# during a storm of registrations, updates and deletes, ROUNDS times
# (default 100), checking after each restart that every acknowledged change
# is there. The default test suite runs the same test with 5 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-100}"
cargo build -p coordinator --bins --tests --locked
LLM_ROUTER_CRASH_ROUNDS="$ROUNDS" cargo test -p coordinator --locked --test crash -- --nocapture
echo "crash loop: $ROUNDS rounds, every acknowledged change survived"
