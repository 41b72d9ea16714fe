"""Several models on one endpoint through clients nobody here wrote: the `openai` package
against the real llama-server in router mode (the session's CPU build of the real llama.cpp
source, tests/support/llama_source.py), serving tiny random-weight models from a real lock
on 127.0.0.1. Slow (needs the real build); CI runs it.

- two models by name: /v1/models lists both, each chats (and streams) by its pylmserv name,
  the embedding-role one answers /v1/embeddings, an unknown name gets the router's error;
- 16 concurrent clients across two models with --max-loaded 1 (every switch evicts the
  other): each gets an answer or a clear error within its timeout;
- Ctrl-C leaves no process of the router or of its model instances.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pylmserv.core.hashing import file_hash
from pylmserv.pins.config import load_lock
from pylmserv.pins.lock import LockEntry
from pylmserv.store.trees import store_path
from tests.support import llama_source
from tests.support.httpserver import serve_directory
from tests.support.tinymodel import VOCAB_FILE, write_tiny_llama
from tests.test_serve import alive, free_port, read_ready, wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

# The openai client's own default: it retries a request whose connection the server closed
# (a pooled keep-alive connection that llama-server's HTTP library dropped after its 5 s idle
# timeout while a model swapped in - seen once in many runs as "Server disconnected without
# sending a response"). HTTP errors (400 unknown model, 401, 5xx answers) still reach the test.
RETRIES = 2

MODELS = {  # name -> (seed, extra lines of its [models.NAME] table)
    "tiny-chat": (0, ""),
    "tiny-chat-2": (2, ""),
    "tiny-embed": (1, 'role = "embedding"\n[models.tiny-embed.server]\npooling = "mean"\n'),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A pylmserv.toml/lock with the session build's locked llama.cpp and three tiny models
    served on loopback; yields (project dir, env). serve runs in the session's persistent
    home, so it finds the build (a cache hit) and reads router support from its source."""
    built = llama_source.built_llama_cpp()
    lock = load_lock(Path(built["lock"]))
    vocab = store_path(lock.entry("sources", "llama-cpp"), llama_source.PERSISTENT_HOME) / VOCAB_FILE
    root = tmp_path_factory.mktemp("router")
    www, proj = root / "www", root / "proj"
    www.mkdir()
    proj.mkdir()
    with serve_directory(www) as base:
        toml = Path(built["config"]).read_text()
        for name, (seed, extra) in MODELS.items():
            model = write_tiny_llama(www / f"{name}.gguf", vocab, seed=seed)
            toml += f'\n[models.{name}]\nurl = "{base}/{name}.gguf"\n{extra}'
            lock = lock.with_entry(LockEntry("models", name, f"{base}/{name}.gguf", file_hash(model), "flat",
                                             size=model.stat().st_size))
        (proj / "pylmserv.toml").write_text(toml)
        lock.replace(path=proj / "pylmserv.lock").write()
        yield proj, llama_source.build_env()


def start(project, *args):
    proj, env = project
    port = free_port()
    return subprocess.Popen([sys.executable, "-m", "pylmserv", "serve", *args, "--backend", "cpu", "--port",
                             str(port), "--json", "--timeout", "120", "--", "--ctx-size", "256", "--threads", "2"],
                            cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def descendants(pid: int) -> set:
    """Every process below `pid` (the router, the model instances it spawns)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = {int(x) for x in f.read().split()}
                todo += list(kids - found)
                found |= kids
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def stop_and_check(proc, seen: set):
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("serve did not stop on SIGINT:\n" + err[-3000:])
    assert proc.returncode == 130, err[-3000:]
    assert wait_for(lambda: not any(alive(p) for p in seen), timeout=30), \
        f"left running: {[p for p in seen if alive(p)]}"
    return out, err


def test_two_models_one_endpoint_openai_client(project):
    proc = start(project, "tiny-chat", "tiny-embed")
    seen = set()
    try:
        ready = read_ready(proc, timeout=300)
        assert ready["models"] == ["tiny-chat", "tiny-embed"]
        client = openai.OpenAI(base_url=ready["api"], api_key="sk-not-checked", timeout=120, max_retries=RETRIES)
        ids = sorted(m.id for m in client.models.list().data)
        assert ids == ["tiny-chat", "tiny-embed"]  # the lock's names, and nothing of any model cache

        reply = client.chat.completions.create(model="tiny-chat", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        seen |= descendants(proc.pid)
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        stream = client.chat.completions.create(model="tiny-chat", max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Say hello."}])
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 2 and text == reply.choices[0].message.content

        emb = client.embeddings.create(model="tiny-embed", input=["hello there", "general kenobi"])
        seen |= descendants(proc.pid)
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64  # N_EMBD of the tiny llama
        assert emb.data[0].embedding != emb.data[1].embedding

        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="no-such-model", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 400 and "model 'no-such-model' not found" in str(info.value)
        seen |= descendants(proc.pid)
        assert len(seen) >= 3  # the router and one instance per model used
    finally:
        stop_and_check(proc, seen)


def test_sixteen_clients_two_models_max_loaded_one(project):
    proc = start(project, "tiny-chat", "tiny-chat-2", "--max-loaded", "1")
    seen = set()
    try:
        ready = read_ready(proc, timeout=300)
        client = openai.OpenAI(base_url=ready["api"], api_key="sk-not-checked", timeout=180, max_retries=RETRIES)

        def ask(i):
            model = ("tiny-chat", "tiny-chat-2")[i % 2]
            try:
                r = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": f"Count to {i}."}])
                return ("answer", model, r.model, r.choices[0].message.content)
            except openai.APIStatusError as exc:  # a clear refusal is fine: it names why
                return ("error", model, exc.status_code, str(exc))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(ask, i) for i in range(16)]
            while not all(f.done() for f in futures):
                seen |= descendants(proc.pid)
                time.sleep(0.2)
            results = [f.result(timeout=0) for f in futures]  # a timeout/connection error would raise here
        answers = [r for r in results if r[0] == "answer"]
        errors = [r for r in results if r[0] == "error"]
        assert answers, results
        for _, asked, status, message in errors:
            assert status in (429, 500, 503) and message.strip(), errors
        assert {r[1] for r in answers} == {"tiny-chat", "tiny-chat-2"}, results
        assert all(asked == answered for _, asked, answered, _ in answers), results  # each by its own model
    finally:
        stop_and_check(proc, seen)


def test_key_file_and_preload_on_the_real_router(project, tmp_path):
    """--api-key-file: the router and the model instances it starts (they inherit
    LLAMA_API_KEY) answer only with the key; --preload: ready means that model is loaded."""
    key_file = tmp_path / "key"
    key_file.write_text("e2e-router-key\n")
    proc = start(project, "tiny-chat", "tiny-embed", "--api-key-file", str(key_file), "--preload", "tiny-chat")
    seen = set()
    try:
        ready = read_ready(proc, timeout=300)
        seen |= descendants(proc.pid)
        assert len(seen) >= 2  # the router and the preloaded instance, before any request
        keyed = openai.OpenAI(base_url=ready["api"], api_key="e2e-router-key", timeout=120, max_retries=RETRIES)
        listed = {m.id: m for m in keyed.models.list().data}
        assert set(listed) == {"tiny-chat", "tiny-embed"}
        reply = keyed.chat.completions.create(model="tiny-chat", max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.role == "assistant"
        wrong = openai.OpenAI(base_url=ready["api"], api_key="not-the-key", timeout=60, max_retries=RETRIES)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        for pid in seen:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"e2e-router-key" not in f.read()
    finally:
        stop_and_check(proc, seen)


def test_generated_unit_runs_the_real_router_with_the_store_read_only(project, tmp_path):
    """`serve ... --generate systemd` against the real build; its ExecStart run as the unit's
    sandbox would (store read-only, only logs writable, the key from %d): both models answer."""
    from tests.test_serve_unit import need_root, sandboxed_exec_start

    need_root()
    proj, env = project
    key_file = tmp_path / "key"
    key_file.write_text("unit-e2e-key\n")
    port = free_port()
    gen = subprocess.run([sys.executable, "-m", "pylmserv", "serve", "tiny-chat", "tiny-embed", "--backend", "cpu",
                          "--port", str(port), "--api-key-file", str(key_file), "--max-loaded", "1",
                          "--generate", "systemd", "--", "--ctx-size", "256", "--threads", "2"],
                         cwd=proj, capture_output=True, text=True, env=env, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert "unit-e2e-key" not in gen.stdout and "PrivateDevices=yes" in gen.stdout
    home = Path(env["PYLMSERV_HOME"])
    proc = sandboxed_exec_start(gen.stdout, home, tmp_path, key_file, env=env)
    seen = set()
    try:
        ready = read_ready(proc, timeout=300)
        client = openai.OpenAI(base_url=ready["api"], api_key="unit-e2e-key", timeout=120, max_retries=RETRIES)
        assert sorted(m.id for m in client.models.list().data) == ["tiny-chat", "tiny-embed"]
        reply = client.chat.completions.create(model="tiny-chat", max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "tiny-chat"
        seen |= descendants(proc.pid)
        emb = client.embeddings.create(model="tiny-embed", input="hello")  # evicts tiny-chat (--max-loaded 1)
        assert len(emb.data[0].embedding) == 64
        seen |= descendants(proc.pid)
    finally:
        out, err = stop_and_check(proc, seen)
    assert "STORE-WRITABLE" not in err
