"""Who `skinlesion serve` answers: the token, the Host check without one (DNS rebinding; exact --allow-host
names), the public routes, and the start-up errors for settings a browser or a socket cannot use.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from helpers import plain_jpeg, post_files, serve_client

from skinlesion.cli import main
from skinlesion.serve import Settings, create_app


def test_token_is_required_on_every_api_call(calibrated: Path) -> None:
    with serve_client(calibrated, token="s3cret") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert c.get("/api/model", headers=headers).status_code == 401
            response = post_files(c, [("a.jpg", plain_jpeg())], headers=headers)
            assert response.status_code == 401 and response.json() == {"detail": "unauthorised"}
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/api/model", headers=ok).status_code == 200
        assert post_files(c, [("a.jpg", plain_jpeg())], headers=ok).status_code == 200
        assert c.get("/").status_code == 200 and "Decision support, not a diagnosis" in c.get("/").text


def test_a_public_host_without_a_token_is_warned_about(calibrated: Path, monkeypatch, capsys) -> None:
    from skinlesion import serve
    from skinlesion.serve import serve_command

    served = []
    monkeypatch.setattr(serve, "listen", lambda host, port: served.append({"host": host}) or _FakeSocket())
    monkeypatch.setattr(serve, "run_server", lambda app, sock: None)
    monkeypatch.delenv("SKINLESION_TOKEN", raising=False)
    assert serve_command(calibrated, "0.0.0.0", 8000, None, "cpu", 20, 20) == 0
    assert "warning: serving on 0.0.0.0 without --token: anyone" in capsys.readouterr().out
    monkeypatch.setenv("SKINLESION_TOKEN", "t")
    assert serve_command(calibrated, "0.0.0.0", 8000, None, "cpu", 20, 20) == 0
    assert "warning" not in capsys.readouterr().out
    assert serve_command(calibrated, "127.0.0.1", 8000, None, "cpu", 20, 20) == 0
    assert "warning" not in capsys.readouterr().out and served[-1]["host"] == "127.0.0.1"


def test_only_the_page_and_a_bare_health_check_are_public_and_nothing_loads_from_a_cdn(calibrated: Path) -> None:
    """Issue 16, point 9: /healthz named the checkpoint to anyone, and /docs loaded Swagger from a CDN."""
    with serve_client(calibrated, token="s3cret") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert c.get(path).status_code == 404
        assert c.get("/api/openapi.json").status_code == 401
        schema = c.get("/api/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert "/api/predict" in schema["paths"]
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", c.get("/").text)  # nothing from elsewhere
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 200  # the token guards the API


HOST_CASES = [
    ({}, ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"], ["evil.example", "127.0.0.1.nip.io"]),
    ({"host": "10.1.2.3"}, ["10.1.2.3:8000", "127.0.0.1"], ["10.1.2.4:8000", "attacker.example:8000"]),
    ({"host": "::1"}, ["[::1]:8000"], ["[::2]:8000"]),
    ({"host": "0.0.0.0", "allow_hosts": ("ws-3.clinic.local",)}, ["ws-3.clinic.local:8000"], ["0.0.0.0", "x.example"]),
    # Exact names, compared as the same name however written (case, IPv6 spelling, port); a Host that cannot be
    # read is refused like a foreign one.
    (
        {"host": "::1", "allow_hosts": ("WS-3.Clinic.Local", "fe80::1", "10.1.2.3")},
        ["[0:0:0:0:0:0:0:1]:8000", "ws-3.clinic.local", "[FE80::1]:8000", "10.1.2.3:8000"],
        [
            "ws-3.clinic.local.evil.example",
            "clinic.local",
            "10.1.2.3.nip.io",
            "[::1",
            "[::1]x",
            "a:b:c",
            "ws-3:port",
            "",
        ],
    ),
]


@pytest.mark.parametrize(("settings", "allowed", "refused"), HOST_CASES)
def test_without_a_token_only_this_servers_own_names_are_answered(calibrated: Path, settings, allowed, refused):
    """DNS rebinding: a page on another site, its name pointed at 127.0.0.1, must not reach the API."""
    with serve_client(calibrated, **settings) as c:
        for host in allowed:
            assert c.get("/api/model", headers={"Host": host}).status_code == 200, host
        for host in refused:
            assert c.get("/api/model", headers={"Host": host}).status_code == 400, host
            assert c.get("/", headers={"Host": host}).status_code == 400, host


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*", "patterns are not accepted"),
        ("clinic*", "patterns are not accepted"),
        ("*.clinic.local", "patterns are not accepted"),
        ("ws-3.clinic.local:8000", "without the port"),
        ("[::1]:8000", "without the port"),
        ("http://ws-3.clinic.local", "is not an exact host name"),
        ("", "is not an exact host name"),
        ("two words", "is not an exact host name"),
        ("10.1.2", "is not an exact host name"),
        ("ws-3-.clinic", "is not an exact host name"),
    ],
)
def test_allow_host_takes_exact_names_only(calibrated: Path, value: str, says: str, monkeypatch, capsys) -> None:
    """Issue 21, point 14: `--allow-host '*'` switched the Host check off (and the note said only `*` was
    answered); `clinic*` started, then answered every request 500. Now each value is checked at start."""
    from skinlesion import serve

    monkeypatch.setattr(serve, "listen", lambda host, port: _FakeSocket())
    monkeypatch.setattr(serve, "run_server", lambda app, sock: pytest.fail(f"served with --allow-host {value!r}"))
    assert main(["serve", "--checkpoint", str(calibrated), "--host", "0.0.0.0", "--allow-host", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --allow-host {value!r}") and says in err and err.count("\n") == 1
    if "*" in value:  # and it says how to serve any name instead
        assert "set --token" in err


def test_start_up_names_exactly_the_hosts_answered(calibrated: Path, monkeypatch, capsys) -> None:
    """The start-up note lists the names answered without a token (once `*`, which meant every name); with a
    token, --allow-host is said to have no effect."""
    from skinlesion import serve

    monkeypatch.setattr(serve, "listen", lambda host, port: _FakeSocket())
    monkeypatch.setattr(serve, "run_server", lambda app, sock: None)
    args = ["serve", "--checkpoint", str(calibrated), "--host", "10.1.2.3"]
    assert main([*args, "--allow-host", "WS-3.clinic.local", "--allow-host", "fe80::1"]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: without --token"))
    assert note.startswith("note: without --token, only requests to 10.1.2.3, 127.0.0.1, [::1], [fe80::1], ")
    assert "localhost, ws-3.clinic.local are answered" in note
    assert main([*args, "--token", "s3cret", "--allow-host", "ws-3.clinic.local"]) == 0
    assert "note: --allow-host has no effect with --token" in capsys.readouterr().out


def test_a_wildcard_never_reaches_the_app_and_a_failing_host_check_answers_400(calibrated: Path, monkeypatch):
    """Issue 21, point 14: with `clinic*` every request, /healthz included, answered 500 (the old middleware's
    assertion); with `*` any Host was answered. Neither can be configured now, and whatever fails inside the
    check itself, the answer is 400 with a plain message."""
    from skinlesion import hosts
    from skinlesion.errors import UserError

    for value in ("*", "clinic*"):
        with pytest.raises(UserError, match="patterns are not accepted"):
            create_app(Settings(calibrated, allow_hosts=(value,)))

    def broken(header: str) -> str:
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(hosts, "request_host", broken)
    with serve_client(calibrated) as c:
        for path in ("/healthz", "/api/model", "/"):
            response = c.get(path)
            assert response.status_code == 400, path
            assert response.headers["content-type"].startswith("text/plain")
            assert response.text.startswith("Invalid host header")


def test_a_request_with_two_host_headers_or_none_is_refused(calibrated: Path) -> None:
    """The check reads the one Host header a request must have (RFC 9112); two, or none, get 400."""
    from skinlesion.hosts import HostCheck

    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])

    async def request(headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": headers, "query_string": b""}
        await HostCheck(app, ["127.0.0.1"])(scope, receive, send)
        return sent[0]["status"] if sent else 200

    assert asyncio.run(request([(b"host", b"127.0.0.1:8000")])) == 200 and reached == ["/healthz"]
    assert asyncio.run(request([(b"host", b"127.0.0.1"), (b"host", b"evil.example")])) == 400
    assert asyncio.run(request([])) == 400
    assert reached == ["/healthz"]


@pytest.mark.parametrize("token", ["pässwort", "two words", "tab\tbed", "naïve-☃"])
def test_a_token_a_browser_cannot_send_is_refused_at_start(calibrated: Path, token: str, monkeypatch, capsys) -> None:
    """Issue 16, point 14: a --token outside Latin-1 broke the page (fetch cannot put it in a header)."""
    from skinlesion import serve

    monkeypatch.setattr(serve, "listen", lambda host, port: _FakeSocket())
    monkeypatch.setattr(serve, "run_server", lambda app, sock: pytest.fail("served with an unusable token"))
    assert main(["serve", "--checkpoint", str(calibrated), "--token", token]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --token (or SKINLESION_TOKEN) must be printable ASCII") and err.count("\n") == 1


@pytest.mark.parametrize("args", [["--max-mb", "nan"], ["--max-mb", "inf"], ["--max-files", "0"], ["--batch", "0"]])
def test_unusable_limits_are_one_line_errors(calibrated: Path, args: list[str], monkeypatch, capsys) -> None:
    """A NaN --max-mb passed the old `<= 0` check and ended in a traceback."""
    from skinlesion import serve

    monkeypatch.setattr(serve, "listen", lambda host, port: _FakeSocket())
    monkeypatch.setattr(serve, "run_server", lambda app, sock: pytest.fail("served with unusable limits"))
    assert main(["serve", "--checkpoint", str(calibrated), *args]) == 2
    assert capsys.readouterr().err.startswith("error: --max-mb must be a number > 0")


class _FakeSocket:
    """What `serve.listen` returns, for tests that stop before serving (or bind to a name this machine lacks)."""

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8000)


def test_a_port_in_use_is_one_line_before_the_model_loads(calibrated: Path, capsys) -> None:
    """A second `serve` on a busy port printed "serving ... on http://..." and then died in uvicorn's log."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        assert main(["serve", "--checkpoint", str(calibrated), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out and err.count("\n") == 1
    assert err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there") and "another --port" in err
