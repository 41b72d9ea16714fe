"""The served model through a client nobody here wrote: the `openai` Python package.

`pylmserv serve` runs the real llama-server (the session's CPU build of the real
llama.cpp source, tests/support/llama_source.py) on the tiny random-weight model on
127.0.0.1; the official OpenAI client asks for a chat completion, non-streaming and
streaming. Slow (needs the real build); CI runs it.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.pins.config import load_lock
from pylmserv.store.trees import store_path
from tests.support import llama_source
from tests.support.tinymodel import tiny_model
from tests.test_serve import free_port, read_ready
from tests.support.tools import require_module

openai = require_module("openai")
pytestmark = pytest.mark.slow


def test_openai_client_chat_completion_streaming_and_not(tmp_path):
    built = llama_source.built_llama_cpp()
    entry = load_lock(Path(built["lock"])).entry("sources", "llama-cpp")
    model = tiny_model(tmp_path, store_path(entry, llama_source.PERSISTENT_HOME))
    port = free_port()
    argv = [sys.executable, "-m", "pylmserv", "--config", built["config"], "--lock", built["lock"], "serve", str(model),
            "--backend", "cpu", "--port", str(port), "--json", "--timeout", "120", "--",
            "--ctx-size", "256", "--threads", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=llama_source.build_env())
    try:
        ready = read_ready(proc, timeout=300)
        client = openai.OpenAI(base_url=ready["api"], api_key="sk-not-checked", timeout=120, max_retries=0)
        model_id = client.models.list().data[0].id
        assert model_id

        reply = client.chat.completions.create(model=model_id, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("length", "stop")
        assert reply.usage is not None and reply.usage.completion_tokens >= 1

        stream = client.chat.completions.create(model=model_id, max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Say hello."}])
        chunks = list(stream)
        assert len(chunks) >= 2  # a real stream: several server-sent events, then the end
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish and finish[-1] in ("length", "stop")
        # greedy decoding: streaming yields the same text as the non-streaming answer
        assert text == choice.message.content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
