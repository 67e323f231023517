// Refreshes the tables and the rates every two seconds from the router's own
// API (/api/agents a page at a time, /api/routers) and metrics (/metrics,
// which also gives the fleet's counts), without reloading the page.
// Every value is set as text, never as HTML: agents choose their own names.
"use strict";

const REFRESH_MS = 2000;
// Agents per page of the table: the router serves the fleet a page at a
// time (?limit= and a cursor), so a fleet of any size costs one page here.
const PAGE_SIZE = 100;
const COLUMNS = ["Name", "Address", "Status", "State", "Last seen", "Models", "Loaded", "In flight", "CPU", "Memory"];
const IN_FLIGHT_COLUMN = COLUMNS.indexOf("In flight");
let previous = null; // {at, requests, heartbeats}
// Where the shown page starts: the cursors of the pages before it (the
// first page has none) and the one the next page starts from.
const pages = { before: [], next: null };

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${seconds.toFixed(0)} s ago`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(0)} min ago`;
  return new Date(iso).toLocaleString();
}

function cells(agent) {
  const report = agent.report || {};
  const memory = report.memory_used == null ? "–"
    : `${bytes(report.memory_used)} / ${bytes(agent.system_info.total_memory)}`;
  return [
    agent.machine_name,
    `${agent.ip_address}:${agent.port}`,
    agent.status,
    // The router's one word for where the node stands (see the README's
    // "Node states"): the same word the API, the CLI and /metrics use.
    agent.state,
    ago(agent.last_seen),
    (report.models || agent.models || []).join(", ") || "–",
    (report.loaded_models || []).join(", ") || "–",
    String(agent.in_flight),
    report.cpu_usage_percent == null ? "–" : `${report.cpu_usage_percent.toFixed(0)} %`,
    memory,
  ];
}

function renderAgents(agents) {
  const body = document.querySelector("#agents tbody");
  const rows = new Map([...body.rows].map((row) => [row.dataset.agentId, row]));
  agents.forEach((agent, index) => {
    let row = rows.get(agent.id);
    rows.delete(agent.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.agentId = agent.id;
      COLUMNS.forEach((label) => {
        const cell = row.insertCell();
        cell.dataset.label = label;
        cell.appendChild(document.createElement("span"));
      });
    }
    cells(agent).forEach((text, i) => { row.cells[i].firstChild.textContent = text; });
    row.cells[2].className = `status-${agent.status}`;
    row.cells[3].className = `state-${agent.state}`;
    row.dataset.status = agent.status;
    row.dataset.state = agent.state;
    row.cells[IN_FLIGHT_COLUMN].classList.add("num");
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
  });
  rows.forEach((row) => row.remove()); // agents removed since the last refresh
  document.getElementById("empty").hidden = agents.length > 0 || pages.before.length > 0;
  const first = pages.before.length * PAGE_SIZE;
  document.getElementById("page").textContent = agents.length
    ? `agents ${first + 1}–${first + agents.length}` : "";
  document.getElementById("previous-page").hidden = pages.before.length === 0;
  document.getElementById("next-page").hidden = pages.next === null;
}

// The shown page: from the cursor of its start (none for the first page).
async function fetchPage() {
  const start = pages.before.length ? pages.before[pages.before.length - 1] : null;
  const response = await get(`/api/agents?limit=${PAGE_SIZE}` + (start ? `&after=${encodeURIComponent(start)}` : ""));
  pages.next = response.headers.get("X-Next-Cursor");
  return response.json();
}

function turnPage(forward) {
  if (forward && pages.next) pages.before.push(pages.next);
  if (!forward) pages.before.pop();
  clearTimeout(timer);
  refresh();
}

// Sums every sample of a metric in Prometheus' text format.
function total(text, name) {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + "{") || line.startsWith(name + " ")) {
      const value = Number(line.slice(line.lastIndexOf(" ") + 1));
      if (Number.isFinite(value)) sum += value;
    }
  }
  return sum;
}

function renderRates(text) {
  const now = { at: performance.now(), requests: total(text, "llm_router_requests_total"),
    heartbeats: total(text, "llm_router_heartbeats_total") };
  if (previous) {
    const seconds = (now.at - previous.at) / 1000;
    const rate = (a, b) => Math.max(0, (a - b) / seconds).toFixed(1);
    document.getElementById("request-rate").textContent = rate(now.requests, previous.requests);
    document.getElementById("heartbeat-rate").textContent = rate(now.heartbeats, previous.heartbeats);
  }
  previous = now;
  // The fleet's counts are the router's, not this page's.
  const online = text.match(/^llm_router_agents\{status="Online"\} (\d+)/m);
  const offline = text.match(/^llm_router_agents\{status="Offline"\} (\d+)/m);
  const serving = text.match(/^llm_router_agents_by_state\{state="serving"\} (\d+)/m);
  document.getElementById("online").textContent = online ? online[1] : "–";
  document.getElementById("offline").textContent = offline ? offline[1] : "–";
  document.getElementById("serving").textContent = serving ? serving[1] : "–";
  document.getElementById("in-flight").textContent = total(text, "llm_router_node_requests_in_flight");
  // Requests waiting at the router for a node at capacity to free a slot.
  document.getElementById("queued").textContent = total(text, "llm_router_queue_length");
  // The mean wait of the requests that have waited there.
  const waited = total(text, "llm_router_queue_wait_seconds_count");
  document.getElementById("queue-wait").textContent = waited
    ? `${(1000 * total(text, "llm_router_queue_wait_seconds_sum") / waited).toFixed(0)} ms`
    : "–";
}

// With --protect-listings the router wants a reader's credential (the admin
// token or an API key). It is asked for once and kept for this tab only.
const TOKEN_KEY = "llm-router-token";

class NeedsToken extends Error {}

async function get(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { cache: "no-store", headers });
  if (response.status === 401 || response.status === 403) throw new NeedsToken();
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response;
}

function askForToken() {
  const form = document.getElementById("login");
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    form.hidden = true;
    refresh();
  };
}

// The routers sharing this registry (this one alone with the data files).
function renderRouters(list) {
  const shared = list.store === "postgres";
  document.getElementById("store").textContent = shared
    ? `sharing a PostgreSQL registry${list.database_reachable ? "" : " (database unreachable: routing from memory)"}`
    : "data files: this router alone";
  const body = document.querySelector("#routers tbody");
  body.replaceChildren(...list.routers.map((router) => {
    const row = document.createElement("tr");
    row.dataset.routerId = router.id;
    const state = (router.alive ? "alive" : "gone") + (router.this_router ? " (this one)" : "");
    [router.address, router.version, new Date(router.started_at).toLocaleString(), ago(router.last_seen), state]
      .forEach((text) => { row.insertCell().textContent = text; });
    return row;
  }));
}

async function refresh() {
  try {
    const [agents, metrics, routers] = await Promise.all([
      fetchPage(),
      get("/metrics").then((r) => r.text()),
      get("/api/routers").then((r) => r.json()),
    ]);
    renderAgents(agents);
    renderRates(metrics);
    renderRouters(routers);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error instanceof NeedsToken) {
      document.getElementById("updated").textContent = "this router needs a token to show its fleet";
      return askForToken();
    }
    document.getElementById("updated").textContent = `cannot reach the router (${error.message})`;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

let timer = null;
document.getElementById("next-page").onclick = () => turnPage(true);
document.getElementById("previous-page").onclick = () => turnPage(false);
refresh();
