#!/usr/bin/env bash
# A full disk (ENOSPC), for real: the router's data dir is a small tmpfs
# that fills up and then grows again, while the router keeps running; then a
# read-only data dir at start-up. Needs root (mount). The default tests show
# the running case with the kernel's file-size limit instead (EFBIG), which
# needs no privilege: coordinator/tests/faults.rs.
#
# Linux refuses to remount a file system read-only while a file on it is open
# for writing (the router's journal), so a running router meets a read-only
# data dir only when the kernel forces the remount after disk errors; its
# writes then fail like these, through the same path.
#
#   bash scripts/disk-faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p coordinator --bins

work=$(mktemp -d)
data="$work/data"
mkdir -p "$data"
mount -t tmpfs -o size=64k tmpfs "$data"
router_pid=""
cleanup() {
  [ -n "$router_pid" ] && kill "$router_pid" 2>/dev/null || true
  sleep 0.3
  umount "$data" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

./target/release/llm-router --host 127.0.0.1 --port 0 --data-dir "$data" \
  --flush-interval 3600 --snapshot-interval 3600 2>"$work/router.log" &
router_pid=$!
for _ in $(seq 100); do
  grep -q "listening on http://" "$work/router.log" 2>/dev/null && break
  sleep 0.1
done
url=$(grep -o "listening on http://[0-9.:]*" "$work/router.log" | head -1 | sed 's/listening on //')

python3 - "$url" "$data" <<'PY'
import json, subprocess, sys, urllib.request, urllib.error

url, data = sys.argv[1], sys.argv[2]

def call(method, path, body=None):
    request = urllib.request.Request(url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")

def registration(name):
    return {"machine_name": name, "ip_address": "127.0.0.2", "runtime_version": "0.5.7",
            "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 8, "total_memory": 1 << 34}}

def journal_is_whole():
    text = open(f"{data}/agents.journal").read()
    assert text == "" or text.endswith("\n"), "a half-written journal record"
    for line in text.splitlines():
        json.loads(line)

def remount(options):
    subprocess.run(["mount", "-o", f"remount,{options}", data], check=True)

acknowledged = []
while True:
    status, body = call("POST", "/api/agents/register", registration(f"gpu-{len(acknowledged)}"))
    if status == 503:
        break
    assert status == 201, (status, body)
    acknowledged.append(body["id"])
assert body["error"]["code"] == "store_unavailable", body
journal_is_whole()
status, agents = call("GET", "/api/agents")
assert len(agents) == len(acknowledged), "the refused registration was rolled back"
status, _ = call("POST", f"/api/agents/{acknowledged[0]}/heartbeat")
assert status == 200, "heartbeats go on while the disk is full"
print(f"full disk (ENOSPC): {len(acknowledged)} registrations acknowledged, then 503 store_unavailable; journal whole")

remount("size=4m")
status, body = call("POST", "/api/agents/register", registration("after-space-returned"))
assert status == 201, (status, body)
acknowledged.append(body["id"])
print("space returned: the same router registers again (201), no restart")

journal_is_whole()
PY

# Read-only at start-up: the router refuses to run on a data dir it cannot
# write, and says which.
kill "$router_pid"; wait "$router_pid" 2>/dev/null || true; router_pid=""
mount -o remount,ro "$data"
if ./target/release/llm-router --host 127.0.0.1 --port 0 --data-dir "$data" 2>"$work/ro.log"; then
  echo "the router started on a read-only data dir" >&2; exit 1
fi
grep -q "$data" "$work/ro.log" || { echo "the error does not name the data dir" >&2; cat "$work/ro.log" >&2; exit 1; }
echo "read-only data dir at start: refused, naming it: $(grep -m1 -o 'Error.*' "$work/ro.log" | cut -c1-160)"
echo "disk faults: all passed"
