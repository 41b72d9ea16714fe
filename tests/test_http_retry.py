"""Connection retries of the HTTP transport (transfer/http.py): a refused connection to
this machine is retried once, at once; every other connection failure keeps urllib3's
CONNECT_RETRIES retries with backoff. Real urllib3 objects and real refused connections
on 127.0.0.1 (port 9, discard: nothing listens on it here)."""
from __future__ import annotations

import socket

import pytest
import urllib3
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from pylmserv.core.errors import NetworkError
from pylmserv.transfer import http
from pylmserv.transfer.download import download


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_refusal(pool) -> NewConnectionError:
    """The error urllib3 itself raises for a refused connect (no retries)."""
    with pytest.raises(NewConnectionError) as exc:
        pool.urlopen("GET", "/", retries=False)
    return exc.value


def retry() -> Retry:
    return http.connect_retry(Retry)(total=None, connect=http.CONNECT_RETRIES, read=0, status=0, other=0,
                                     redirect=10, backoff_factor=0.2)


def attempts_until_exhausted(r: Retry, error, pool) -> int:
    """How many failed attempts the policy takes before it gives up."""
    n = 0
    while True:
        n += 1
        try:
            r = r.increment("GET", "/", error=error, _pool=pool)
        except MaxRetryError:
            return n
        assert n < 50


def test_refused_on_loopback_is_retried_once():
    pool = urllib3.HTTPConnectionPool("127.0.0.1", free_port())
    error = real_refusal(pool)
    assert http.is_refused(error)
    assert attempts_until_exhausted(retry(), error, pool) == 1 + http.LOOPBACK_REFUSED_RETRIES


@pytest.mark.parametrize("host", ["localhost", "::1", "[::1]", "127.0.0.2"])
def test_every_loopback_spelling_counts(host):
    assert http.is_loopback(host)


@pytest.mark.parametrize("host", ["mirror.example", "10.0.0.1", "", "127.0.0.1.example"])
def test_other_hosts_are_not_loopback(host):
    assert not http.is_loopback(host)


def test_refused_elsewhere_keeps_all_retries():
    """The same refusal from a remote host (a mirror being restarted, a flaky proxy) keeps
    the backoff: only the host differs (nothing connects to it here)."""
    error = real_refusal(urllib3.HTTPConnectionPool("127.0.0.1", free_port()))
    remote = urllib3.HTTPConnectionPool("mirror.example", 80)
    assert attempts_until_exhausted(retry(), error, remote) == 1 + http.CONNECT_RETRIES


def test_other_loopback_failures_keep_all_retries():
    """A connect timeout on loopback is not a refusal: a busy local server gets its retries."""
    pool = urllib3.HTTPConnectionPool("127.0.0.1", free_port())
    error = ConnectTimeoutError(pool, "timed out")
    assert not http.is_refused(error)
    assert attempts_until_exhausted(retry(), error, pool) == 1 + http.CONNECT_RETRIES


def test_transport_uses_the_fast_path():
    t = http.Transport("http://127.0.0.1:9/x", {}, pool_size=2, read_timeout=5, retry_base=0.2)
    policy = t.retry  # what every request of the transport is sent with
    assert isinstance(policy, http.connect_retry(Retry))
    assert policy.connect == http.CONNECT_RETRIES


def test_download_from_a_refused_port_is_one_network_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/m.gguf"
    with pytest.raises(NetworkError, match="cannot reach") as exc:
        download(url, tmp_path / "out", tmp_dir=tmp_path / "tmp")
    assert "Connection refused" in exc.value.message
    assert not (tmp_path / "out").exists()
