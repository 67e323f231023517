"""`/metrics` scraped and parsed with the official Prometheus client's parser
after real traffic through the official clients: agents by status, requests
by route, model, node and status code, latency and time-to-first-byte
histograms, requests in flight per node, failovers, store writes."""

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for


def scrape(router):
    response = httpx.get(router.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def samples(families, name, suffix=""):
    """Every sample of a family: (labels, value)."""
    family = families[name]
    return [(s.labels, s.value) for s in family.samples if s.name == family.name + suffix or s.name == name + suffix]


def total(families, name, suffix="", **labels):
    return sum(
        value for sample_labels, value in samples(families, name, suffix)
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_describe_the_fleet_and_the_traffic(fleet):
    router = fleet.router()
    a, a_agent = fleet.node(router, "node-a", ["smollm2:135m"])
    b, _ = fleet.node(router, "node-b", ["smollm2:135m"])
    router.wait_routable(["node-a", "node-b"])

    chat = ollama.Client(host=router.url, timeout=30)
    for _ in range(4):
        chat.chat(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])
    list(chat.generate(model="smollm2:135m", prompt="once", stream=True))
    with pytest.raises(ollama.ResponseError):
        chat.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    for _ in range(2):
        client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])

    families = scrape(router)
    # Agents by status: the text format's parser drops the _total suffix
    # of counters from family names, so the names below are as it gives them.
    assert total(families, "llm_router_agents", status="Online") == 2
    assert total(families, "llm_router_agents", status="Offline") == 0
    assert total(families, "llm_router_agents_routable") == 2
    assert total(families, "llm_router_heartbeats", "_total") > 0
    assert total(families, "llm_router_registrations", "_total") >= 2

    requests = "llm_router_requests"
    assert total(families, requests, "_total", route="/api/chat", model="smollm2:135m", status="200") == 4
    nodes = {labels["node"] for labels, _ in samples(families, requests, "_total") if labels["route"] == "/api/chat" and labels["status"] == "200"}
    assert nodes == {"node-a", "node-b"}, "labelled by the node that answered"
    assert total(families, requests, "_total", route="/api/generate", status="200") == 1
    assert total(families, requests, "_total", route="/v1/chat/completions", status="200") == 2
    # A model no node serves is not a label (clients could grow the series
    # without end): it is counted as "(unknown)".
    assert total(families, requests, "_total", route="/api/chat", model="(unknown)", node="none", status="404") == 1
    assert 'model="no-such-model"' not in httpx.get(router.url + "/metrics").text

    # Histograms: a count per route, cumulative buckets ending in +Inf. A
    # request's duration is recorded when the router drops its answer's
    # body, a moment after the client has read the last byte.
    duration = "llm_router_request_duration_seconds"
    def chats_timed():
        scraped = scrape(router)
        return scraped if total(scraped, duration, "_count", route="/api/chat") == 4 else None

    families = wait_for(chats_timed, what="the durations of the four chats")
    assert total(families, duration, "_count", route="/api/generate") == 1
    buckets = [(labels["le"], value) for labels, value in samples(families, duration, "_bucket") if labels["route"] == "/api/chat"]
    assert buckets[-1] == ("+Inf", 4.0)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert total(families, "llm_router_time_to_first_byte_seconds", "_count") == 7

    in_flight = {labels["node"]: value for labels, value in samples(families, "llm_router_node_requests_in_flight")}
    assert in_flight == {"node-a": 0.0, "node-b": 0.0}

    # Two registrations are two changes, but group commit may write both in
    # one batch (the agents start together): at least one write, two upserts.
    assert total(families, "llm_router_store_writes", "_total", result="ok") >= 1
    assert total(families, "llm_router_store_write_duration_seconds", "_count") >= 1
    assert total(families, "llm_router_store_changes", "_total", kind="upsert") >= 2

    # A node's server dies: the next requests fail over, and the metric says so.
    # Its agent goes first: left running, it may report the server down (it
    # beats every 0.2 s) before the next chat, which then never tries the node
    # and has nothing to fail over from (CI saw this once).
    a_agent.kill()
    a.kill()
    for _ in range(4):
        chat.chat(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])
    families = scrape(router)
    assert total(families, "llm_router_failovers", "_total", node="node-a") >= 1
    assert total(families, requests, "_total", route="/api/chat", node="node-b", status="200") >= 4
