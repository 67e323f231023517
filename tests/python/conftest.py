"""Fixtures that start the real binaries on 127.0.0.1 with free ports.

`llm-router` and `llm-router-agent` are ours, unmodified; `llm-standin` is the
stand-in for an Ollama or OpenAI-compatible server (what we do not ship),
speaking the real protocols. Every process is killed at teardown.
"""

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

BIN_DIR = Path(os.environ.get("LLM_ROUTER_BIN_DIR", Path(__file__).resolve().parents[2] / "target" / "release"))


def wait_for(predicate, timeout=15.0, what="condition"):
    """Polls `predicate` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Process:
    """A child process whose output is read by a thread, so it never blocks;
    `address` is parsed from its 'listening on' line."""

    def __init__(self, args, env=None):
        self.args = [str(a) for a in args]
        self.lines = []
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._listening = threading.Event()
        self.address = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append(line)
            if "listening on" in line and self.address is None:
                rest = line.split("listening on", 1)[1].strip()
                self.address = rest.split()[0].removeprefix("http://")
                self._listening.set()

    def wait_listening(self, timeout=20.0):
        if not self._listening.wait(timeout):
            raise AssertionError(f"{self.args[0]} did not start: {''.join(self.lines)[-2000:]}")
        return self.address

    def signal(self, sig):
        self.popen.send_signal(sig)

    def wait(self, timeout=20.0):
        return self.popen.wait(timeout)

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


class StandIn:
    def __init__(self, process, name):
        self.process = process
        self.name = name
        self.url = "http://" + process.wait_listening()
        self.port = int(self.url.rsplit(":", 1)[1])

    def stats(self):
        return httpx.get(self.url + "/standin/stats", timeout=5).json()

    def release(self):
        httpx.post(self.url + "/standin/release", timeout=5)

    def kill(self):
        self.process.kill()


class Router:
    def __init__(self, process, data_dir):
        self.process = process
        self.data_dir = data_dir
        self.url = "http://" + process.wait_listening()

    def agents(self):
        return httpx.get(self.url + "/api/agents", timeout=5).json()

    def agent(self, name):
        return next((a for a in self.agents() if a["machine_name"] == name), None)

    def wait_routable(self, names, timeout=15.0):
        def ready():
            agents = {a["machine_name"]: a for a in self.agents()}
            return all(n in agents and agents[n]["routable"] for n in names)

        wait_for(ready, timeout, f"agents {names} routable")

    def total_in_flight(self):
        return sum(a["in_flight"] for a in self.agents())


class Fleet:
    """Starts routers, stand-ins and agents, and stops them all at the end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.processes = []

    def _spawn(self, args, env=None):
        process = Process(args, env=env)
        self.processes.append(process)
        return process

    def router(self, *args):
        data_dir = tempfile.mkdtemp(dir=self.tmp_path)
        process = self._spawn(
            [BIN_DIR / "llm-router", "--host", "127.0.0.1", "--port", "0", "--data-dir", data_dir, *args],
            env={"RUST_LOG": "info"},
        )
        return Router(process, data_dir)

    def standin(self, name, models, kind="ollama", chunk_delay_ms=0, chunks=4, loaded=(), gated=False):
        args = [
            BIN_DIR / "llm-standin",
            "--kind", kind,
            "--name", name,
            "--models", ",".join(models),
            "--loaded", ",".join(loaded),
            "--chunks", chunks,
            "--chunk-delay-ms", chunk_delay_ms,
        ]
        if gated:
            args.append("--gated")
        return StandIn(self._spawn(args), name)

    def agent(self, router, standin, name=None, *args):
        return self._spawn(
            [
                BIN_DIR / "llm-router-agent",
                "--router-url", router.url,
                "--backend-url", standin.url,
                "--machine-name", name or standin.name,
                "--heartbeat-interval", "0.2",
                "--state-dir", self.tmp_path / "agent-state",
                *args,
            ],
            env={"RUST_LOG": "info"},
        )

    def node(self, router, name, models, **standin_options):
        """A stand-in LLM server with its agent beside it."""
        standin = self.standin(name, models, **standin_options)
        agent = self.agent(router, standin, name)
        return standin, agent

    def stop(self):
        for process in reversed(self.processes):
            process.kill()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()
