"""URLs tried as an attacker and as an unlucky user would (issue 18): credentials in every
spelling (upper-case scheme, empty user, percent-encoded userinfo, IPv6 hosts) and URLs
urllib refuses (a port that is no number or out of range, a broken IPv6 host), from every
place a URL comes from (command line, config, lock, HF_ENDPOINT). Each is one clean line,
and the secret is in no output and no file."""
from __future__ import annotations

import pytest

from pylmserv.transfer.http import origin_of, redact, refuse_credentials
from pylmserv.core.errors import ConfigError
from tests.conftest import run_cli
from tests.test_clean_errors import one_clean_line

SECRET = "s3cr3tPW"

WITH_CREDENTIALS = [
    f"http://user:{SECRET}@127.0.0.1/m.gguf",
    f"HTTP://user:{SECRET}@127.0.0.1/m.gguf",
    f"Https://user:{SECRET}@127.0.0.1/m.gguf",
    f"http://:{SECRET}@127.0.0.1/m.gguf",
    f"http://{SECRET}@127.0.0.1/m.gguf",
    f"http://user%3A{SECRET}@127.0.0.1/m.gguf",
    f"http://user:{SECRET}@[::1]:8080/m.gguf",
    f"http://user:{SECRET}@127.0.0.1:notaport/m.gguf",
    f"http://user:{SECRET}@127.0.0.1:99999/m.gguf",
    f"http://user:{SECRET}@[zz]/m.gguf",
    f"http://user:{SECRET}@[::1/m.gguf",
    f"file://user:{SECRET}@localhost/tmp/m.gguf",
    f"hf://user:{SECRET}@org/repo/m.gguf",
]

# one of each kind, for the slower command-line matrix
SAMPLE = [f"HTTP://user:{SECRET}@127.0.0.1/m.gguf", f"http://user:{SECRET}@127.0.0.1:notaport/m.gguf",
          f"http://user:{SECRET}@[zz]/m.gguf", "http://127.0.0.1:99999/m.gguf", "http://[::1/m.gguf"]

BROKEN = [
    "http://127.0.0.1:notaport/m.gguf",
    "http://127.0.0.1:99999/m.gguf",
    "http://[::1/m.gguf",
    "http://[zz]/m.gguf",
]


def no_secret(proc, *files):
    assert SECRET not in proc.stdout + proc.stderr, proc.stderr
    for f in files:
        if f.exists():
            assert SECRET not in f.read_text(errors="replace")


@pytest.mark.parametrize("url", WITH_CREDENTIALS + BROKEN)
def test_redact_never_raises_and_never_shows_the_secret(url):
    out = redact(url)
    assert SECRET not in out
    assert "?" not in redact(url + "?sig=abc") and "abc" not in redact(url + "?sig=abc")


def test_redact_keeps_an_ipv6_host_in_brackets():
    assert redact(f"http://u:{SECRET}@[::1]:8080/a/m.gguf?x=1#f") == "http://[::1]:8080/a/m.gguf"
    assert redact("http://[::1]:8080/m.gguf") == "http://[::1]:8080/m.gguf"


@pytest.mark.parametrize("url", WITH_CREDENTIALS + BROKEN)
def test_refuse_credentials_raises_config_errors_only(url):
    if url.startswith("hf://user"):
        pytest.skip("hf:// is no URL with a host")
    with pytest.raises(ConfigError) as exc:
        refuse_credentials(url, "here")
    assert SECRET not in exc.value.message + (exc.value.hint or "")


def test_origin_of_a_broken_redirect_target_is_no_crash():
    assert origin_of("http://127.0.0.1:99999/x") != origin_of("http://127.0.0.1/x")
    assert origin_of("http://[zz]/x").startswith("invalid")


@pytest.mark.parametrize("url", WITH_CREDENTIALS + BROKEN)
def test_add_refuses_in_one_line(url, tmp_path, home):
    proc = run_cli("add", url, "--via", "python", cwd=tmp_path)
    one_clean_line(proc, 2)
    no_secret(proc)
    assert not (tmp_path / "pylmserv.toml").exists() and not (tmp_path / "pylmserv.lock").exists()


@pytest.mark.parametrize("url", SAMPLE + [f"fetch://user:{SECRET}@x/m.gguf"])
def test_fetch_refuses_in_one_line(url, tmp_path, home):
    proc = run_cli("fetch", url, "--trust-on-first-use", cwd=tmp_path)
    one_clean_line(proc, 2)
    no_secret(proc)
    assert not (tmp_path / "pylmserv.lock").exists()


@pytest.mark.parametrize("url", SAMPLE)
@pytest.mark.parametrize("command", [("list",), ("prefetch", "--via", "python"), ("fetch", "m"), ("doctor",)])
def test_a_config_url_is_refused_by_every_command(url, command, tmp_path, home):
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[models.m]\nurl = "{url}"\n')
    proc = run_cli(*command, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    no_secret(proc, tmp_path / "pylmserv.lock")
    if command[0] != "doctor":  # doctor reports a bad config among its checks
        one_clean_line(proc, 2)


@pytest.mark.parametrize("url", SAMPLE)
def test_a_lock_url_is_refused(url, tmp_path, home):
    (tmp_path / "pylmserv.toml").write_text('[models.m]\nurl = "http://127.0.0.1/m.gguf"\n')
    (tmp_path / "pylmserv.lock").write_text(
        'version = 2\n[models.m]\ntype = "file"\nurl = "%s"\nhash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="\n'
        'mode = "flat"\nsize = 0\n' % url)
    for command in (("fetch", "m"), ("list",), ("verify",)):
        proc = run_cli(*command, cwd=tmp_path)
        assert "Traceback" not in proc.stderr, (command, proc.stderr)
        no_secret(proc)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://[zz]", f"HTTP://u:{SECRET}@127.0.0.1"])
def test_a_broken_hf_endpoint_is_one_line(endpoint, tmp_path, home):
    proc = run_cli("fetch", "hf://org/repo/m.gguf", "--trust-on-first-use", cwd=tmp_path,
                   env={"HF_ENDPOINT": endpoint})
    one_clean_line(proc, 2)
    no_secret(proc)


@pytest.mark.parametrize("var", ["PYLMSERV_GITHUB_URL", "PYLMSERV_GITHUB_API"])
def test_github_mirror_variables_with_credentials_are_refused(var, monkeypatch):
    """The GitHub mirror and API variables are URLs like HF_ENDPOINT: no userinfo, no bad port."""
    from pylmserv.pins.upstream import api_base
    from pylmserv.store.trees import github_base

    read = github_base if var == "PYLMSERV_GITHUB_URL" else api_base
    for value in (f"http://u:{SECRET}@127.0.0.1:1", "http://127.0.0.1:99999"):
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError) as exc:
            read()
        assert SECRET not in exc.value.message and var in exc.value.message
    monkeypatch.setenv(var, "http://127.0.0.1:8080/")
    assert read() == "http://127.0.0.1:8080"


@pytest.mark.parametrize("url", SAMPLE[:3])
def test_verbose_tracebacks_and_json_never_show_the_secret(url, tmp_path, home):
    for args in (("-v", "add", url), ("-v", "fetch", url, "--trust-on-first-use"), ("add", url, "--json"),
                 ("fetch", url, "--json")):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        no_secret(proc)
