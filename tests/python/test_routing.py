"""The router through the official `ollama` and `openai` clients, unmodified,
against stand-in LLM servers and real agents: every endpoint streamed and
not, model-aware routing, spread, errors, failover, drain, cancellation, and
the in-flight counters back at zero after all of it."""

import base64
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from conftest import wait_for


def ollama_client(router):
    return ollama.Client(host=router.url, timeout=30)


def openai_client(router):
    # No retries: a retry would hide an error the router must not make.
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def who_answered(text):
    """The stand-in's answers read 'Hello from <name> ...'."""
    return text.split(" from ", 1)[1].split()[0]


@pytest.fixture
def two_nodes(fleet):
    router = fleet.router()
    a, _ = fleet.node(router, "node-a", ["smollm2:135m", "only-a"])
    b, _ = fleet.node(router, "node-b", ["smollm2:135m", "only-b"])
    router.wait_routable(["node-a", "node-b"])
    return router, a, b


def test_ollama_chat_generate_embed_streamed_and_not(two_nodes):
    router, _, _ = two_nodes
    client = ollama_client(router)
    messages = [{"role": "user", "content": "hi"}]

    reply = client.chat(model="smollm2:135m", messages=messages)
    assert reply.message.role == "assistant"
    assert reply.message.content.startswith("Hello from node-")
    assert reply.done

    parts = list(client.chat(model="smollm2:135m", messages=messages, stream=True))
    assert len(parts) == 5, "four content chunks and the closing one, each passed on"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content for p in parts).startswith("Hello from node-")

    generated = client.generate(model="smollm2:135m", prompt="once upon")
    assert generated.response.startswith("Hello from node-") and generated.done
    streamed = list(client.generate(model="smollm2:135m", prompt="once upon", stream=True))
    assert streamed[-1].done
    assert "".join(p.response for p in streamed).startswith("Hello from node-")

    embedded = client.embed(model="smollm2:135m", input=["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    legacy = client.embeddings(model="smollm2:135m", prompt="one")
    assert list(legacy.embedding) == pytest.approx(embedded.embeddings[0])

    shown = client.show("smollm2:135m")
    assert shown.details.family == "standin"

    listed = {m.model for m in client.list().models}
    assert listed == {"smollm2:135m", "only-a", "only-b"}, "the union, each model once"
    assert client.ps().models == []
    assert httpx.get(router.url + "/api/version").json()["version"] == "0.5.7"


def test_openai_chat_completions_embeddings_streamed_and_not(two_nodes):
    router, _, _ = two_nodes
    client = openai_client(router)
    messages = [{"role": "user", "content": "hi"}]

    completion = client.chat.completions.create(model="smollm2:135m", messages=messages)
    assert completion.choices[0].message.content.startswith("Hello from node-")
    assert completion.usage.total_tokens > 0

    chunks = list(client.chat.completions.create(model="smollm2:135m", messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from node-")
    assert chunks[-1].choices[0].finish_reason == "stop"

    legacy = client.completions.create(model="smollm2:135m", prompt="once upon")
    assert legacy.choices[0].text.startswith("Hello from node-")
    legacy_stream = list(client.completions.create(model="smollm2:135m", prompt="once upon", stream=True))
    assert "".join(c.choices[0].text for c in legacy_stream).startswith("Hello from node-")

    embedding = client.embeddings.create(model="smollm2:135m", input=["one", "two"])
    assert [d.index for d in embedding.data] == [0, 1]

    ids = sorted(m.id for m in client.models.list())
    assert ids == ["only-a", "only-b", "smollm2:135m"]


def test_openai_compatible_nodes_serve_v1_but_not_the_ollama_api(fleet):
    router = fleet.router()
    fleet.node(router, "vllm-node", ["SmolLM2-135M"], kind="openai")
    router.wait_routable(["vllm-node"])
    completion = openai_client(router).chat.completions.create(
        model="SmolLM2-135M", messages=[{"role": "user", "content": "hi"}]
    )
    assert who_answered(completion.choices[0].message.content) == "vllm-node"
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client(router).chat(model="SmolLM2-135M", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 503, "no Ollama node is online"


def test_requests_go_only_to_nodes_with_the_model(two_nodes):
    router, a, b = two_nodes
    client = ollama_client(router)
    for _ in range(6):
        assert who_answered(client.generate(model="only-a", prompt="x").response) == "node-a"
        assert who_answered(client.generate(model="only-b", prompt="x").response) == "node-b"


def test_requests_spread_over_nodes(two_nodes):
    router, _, _ = two_nodes
    client = openai_client(router)
    answered = Counter(
        who_answered(
            client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "x"}])
            .choices[0]
            .message.content
        )
        for _ in range(20)
    )
    assert answered == Counter({"node-a": 10, "node-b": 10}), "round-robin alternates"


def test_nodes_holding_the_model_in_memory_are_preferred(fleet):
    router = fleet.router()
    fleet.node(router, "cold", ["m"])
    fleet.node(router, "warm", ["m"], loaded=["m"])
    router.wait_routable(["cold", "warm"])
    wait_for(lambda: router.agent("warm")["report"].get("loaded_models") == ["m"], what="warm's report")
    client = ollama_client(router)
    answered = {who_answered(client.generate(model="m", prompt="x").response) for _ in range(8)}
    assert answered == {"warm"}, "no request makes the cold node load the model"
    assert [m.model for m in client.ps().models] == ["m"]


def test_unknown_model_is_404_in_each_clients_shape(two_nodes):
    router, _, _ = two_nodes
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client(router).chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 404
    assert "no-such-model" in error.value.error

    with pytest.raises(openai.NotFoundError) as error:
        openai_client(router).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert error.value.status_code == 404
    assert "no-such-model" in error.value.message


def test_no_online_node_is_503_in_each_clients_shape(fleet):
    router = fleet.router()
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client(router).generate(model="m", prompt="x")
    assert error.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as error:
        openai_client(router).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 503
    assert httpx.get(router.url + "/api/tags").json() == {"models": []}


def test_bad_client_requests_get_a_4xx_in_the_routes_shape(two_nodes):
    router, _, _ = two_nodes
    for path in ["/api/chat", "/v1/chat/completions"]:
        for body in [b"", b"{not json", b'{"messages": []}', b'{"model": ""}']:
            response = httpx.post(router.url + path, content=body)
            assert response.status_code == 400, (path, body)
            assert "error" in response.json()


def test_first_chunk_reaches_the_client_before_the_node_sends_the_rest(fleet):
    """The stand-in holds every stream after its first chunk until released:
    seeing that chunk before the release proves nothing buffers the stream."""
    router = fleet.router()
    gated, _ = fleet.node(router, "gated", ["m"], gated=True)
    router.wait_routable(["gated"])
    stream = ollama_client(router).chat(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    first = next(stream)
    assert first.message.content == "Hello"
    assert gated.stats()["generations_in_flight"] == 1, "the node is still holding the rest"
    gated.release()
    rest = list(stream)
    assert rest[-1].done

    sse = openai_client(router).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    first = next(iter(sse))
    assert first.choices[0].delta.content == "Hello"
    gated.release()
    assert list(sse)[-1].choices[0].finish_reason == "stop"


def test_large_request_bodies_pass_intact(two_nodes):
    router, _, _ = two_nodes
    image = base64.b64encode(os.urandom(6 * 1024 * 1024)).decode()
    body = {"model": "only-a", "messages": [{"role": "user", "content": "what is this?", "images": [image]}], "stream": False}
    raw = httpx.Request("POST", router.url + "/api/chat", json=body).read()
    response = httpx.post(router.url + "/api/chat", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200
    length, digest = response.headers["x-standin-body"].split()
    assert int(length) == len(raw)
    assert int(digest, 16) == fnv1a(raw)
    assert who_answered(response.json()["message"]["content"]) == "node-a"


def fnv1a(data):
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def test_failover_when_a_nodes_server_is_killed_mid_run(fleet):
    router = fleet.router()
    nodes = [fleet.node(router, f"node-{n}", ["m"]) for n in range(3)]
    router.wait_routable([f"node-{n}" for n in range(3)])
    victim = nodes[0][0]
    errors = []
    answered = Counter()
    stop = threading.Event()

    def client_loop():
        client = openai_client(router)
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                answered[who_answered(reply.choices[0].message.content)] += 1
            except Exception as error:  # every kind counts as a client error
                errors.append(repr(error))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: answered["node-0"] >= 5, what="the victim to serve some requests")
    victim.kill()
    served_before = sum(answered.values())
    wait_for(lambda: sum(answered.values()) >= served_before + 200, timeout=60, what="200 more requests")
    stop.set()
    for thread in threads:
        thread.join(30)

    assert errors == [], errors[:5]
    agent = router.agent("node-0")
    assert agent["routable"] is False, "the dead node is out of rotation"
    wait_for(lambda: router.total_in_flight() == 0, what="in-flight back to zero")


def test_drain_finishes_in_flight_work_then_the_agent_exits_zero(fleet):
    router = fleet.router()
    slow, slow_agent = fleet.node(router, "leaving", ["m"], gated=True)
    fleet.node(router, "staying", ["m"])
    router.wait_routable(["leaving", "staying"])
    client = ollama_client(router)

    # Open streams until one lands on the node that will leave.
    held = []
    while True:
        stream = client.chat(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        first = next(stream)
        held.append(stream)
        if slow.stats()["generations_in_flight"] == 1:
            break
    leaving_stream = held[-1]
    for other in held[:-1]:
        list(other)

    slow_agent.signal(signal.SIGTERM)
    wait_for(lambda: router.agent("leaving")["draining"], what="the router to learn of the drain")
    requests_before = slow.stats()["requests"]
    for _ in range(6):
        reply = client.generate(model="m", prompt="x")
        assert who_answered(reply.response) == "staying", "no new request goes to a draining node"
    assert slow.stats()["requests"] == requests_before
    time.sleep(0.5)
    assert slow_agent.popen.poll() is None, "the agent waits for its in-flight request"

    slow.release()
    rest = list(leaving_stream)
    assert rest[-1].done, "the in-flight stream finished whole"
    assert "".join([first.message.content] + [p.message.content for p in rest]).startswith("Hello from leaving")
    assert slow_agent.wait(15) == 0
    assert router.agent("leaving")["in_flight"] == 0


def test_client_disconnect_cancels_the_upstream_generation(fleet):
    router = fleet.router()
    node, _ = fleet.node(router, "long", ["m"], chunks=200, chunk_delay_ms=50)
    router.wait_routable(["long"])
    client = openai_client(router)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "Hello"
    assert router.agent("long")["in_flight"] == 1
    stream.close()
    wait_for(lambda: node.stats()["generations_cancelled"] == 1, what="the node to see the cancel")
    assert node.stats()["generations_in_flight"] == 0, "the node stopped generating"
    wait_for(lambda: router.agent("long")["in_flight"] == 0, what="the router's count to drop")


def test_least_busy_counters_never_drift_under_load(fleet):
    router = fleet.router("--balancer", "least-busy")
    fleet.node(router, "lb-a", ["m"], chunks=6, chunk_delay_ms=5)
    fleet.node(router, "lb-b", ["m"], chunks=6, chunk_delay_ms=5)
    router.wait_routable(["lb-a", "lb-b"])
    errors = []

    def one(n):
        try:
            client = openai_client(router)
            kind = n % 4
            if kind == 0:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            elif kind == 1:
                list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
            elif kind == 2:
                stream = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], stream=True
                )
                next(iter(stream))
                stream.close()  # abandoned mid-stream
            else:
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model="absent", messages=[{"role": "user", "content": "x"}])
        except Exception as error:
            errors.append(repr(error))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(400)))
    assert errors == [], errors[:5]
    wait_for(lambda: router.total_in_flight() == 0, what="every counter back to zero")
    served = {a["machine_name"]: a for a in router.agents()}
    assert all(a["in_flight"] == 0 for a in served.values())
