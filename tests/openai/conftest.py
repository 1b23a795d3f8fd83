"""Starts one `switchyard serve` per test session on an ephemeral port with a tiny
synthetic model, and hands tests an official `openai` client pointed at it.

The binary comes from $SWITCHYARD_BIN, else the Cargo target directory
($CARGO_TARGET_DIR or ./target), debug build first.
"""

import os
import pathlib
import signal
import subprocess
import threading

import openai
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _binary() -> str:
    if os.environ.get("SWITCHYARD_BIN"):
        return os.environ["SWITCHYARD_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("debug", "release"):
        candidate = target / profile / "switchyard"
        if candidate.exists():
            return str(candidate)
    pytest.exit("no switchyard binary: run `cargo build -p switchyard` or set SWITCHYARD_BIN", 2)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    binary = _binary()
    model = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run(
        [binary, "model", "synth", "--size", "tiny", "--dtype", "f32", "--out", str(model)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    proc = subprocess.Popen(
        [binary, "serve", "--model", str(model), "--port", "0", "--kv-cache-mb", "16"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info"},
    )
    ready = threading.Event()
    state = {"url": None, "log": []}

    def read_stderr():
        # Keep draining after the ready line so the server never blocks on a full pipe.
        for line in proc.stderr:
            state["log"].append(line)
            if "switchyard ready" in line and state["url"] is None:
                url = next(w for w in line.split() if w.startswith("http://"))
                state["url"] = url.rstrip("/,)")
                ready.set()
        ready.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        if not ready.wait(60) or state["url"] is None:
            pytest.fail("server did not become ready:\n" + "".join(state["log"]))
        yield state["url"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    assert code == 0, "server exit code %r after SIGTERM:\n%s" % (code, "".join(state["log"]))


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id
