"""Authentication through the official clients: the `openai` client sends its
api_key as a Bearer token, the `ollama` client sends one through its
`headers`; without a valid key both get a 401 in their own error shape.
Agents join with the join token and then use their own secrets."""

import time

import httpx
import ollama
import openai
import pytest

JOIN_TOKEN = "fleet-join-token-7c1d"
API_KEY = "client-key-3e9a-alpha"


@pytest.fixture
def secured(fleet):
    router = fleet.router("--agent-token", JOIN_TOKEN, "--api-keys", f"{API_KEY},client-key-second")
    standin = fleet.standin("node-s", ["smollm2:135m"])
    fleet.agent(router, standin, "node-s", "--token", JOIN_TOKEN)
    router.wait_routable(["node-s"])
    return router, fleet


def test_openai_client_with_its_key_gets_in_and_without_gets_401(secured):
    router, _ = secured
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content.startswith("Hello from node-s")
    chunks = list(
        client.chat.completions.create(
            model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Hello")
    assert [m.id for m in client.models.list()] == ["smollm2:135m"]

    wrong = openai.OpenAI(base_url=router.url + "/v1", api_key=API_KEY[:-1] + "X", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401
    assert refused.value.code == "unauthorized"


def test_ollama_client_with_the_header_gets_in_and_without_gets_401(secured):
    router, _ = secured
    client = ollama.Client(host=router.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    reply = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content.startswith("Hello from node-s")
    parts = list(client.generate(model="smollm2:135m", prompt="once", stream=True))
    assert parts[-1].done
    assert {m.model for m in client.list().models} == {"smollm2:135m"}

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        anonymous = ollama.Client(host=router.url, headers=headers, timeout=30)
        with pytest.raises(ollama.ResponseError) as refused:
            anonymous.chat(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 401
        assert "credential" in refused.value.error
    # Ollama's liveness probe stays open.
    assert httpx.get(router.url + "/").text == "Ollama is running"


def test_an_agent_without_the_join_token_never_gets_in(secured):
    router, fleet = secured
    standin = fleet.standin("node-outsider", ["smollm2:135m"])
    outsider = fleet.agent(router, standin, "node-outsider", "--token", "guessed-token")
    no_token = fleet.agent(router, standin, "node-no-token")
    time.sleep(1.0)  # Several of their 0.2 s attempts.
    names = {a["machine_name"] for a in router.agents()}
    assert names == {"node-s"}
    assert outsider.popen.poll() is None and no_token.popen.poll() is None, "they keep trying"
    assert any("401" in line for line in outsider.lines)
