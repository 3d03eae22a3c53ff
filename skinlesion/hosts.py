"""`skinlesion serve`'s Host check without --token (DNS rebinding), and what --allow-host accepts.

A web page on another site can point its own name at 127.0.0.1 and then call the API from the user's browser,
which sends that page's name as the Host header. Without a token, `serve` therefore answers only requests
addressed to a name it was started with: localhost, the --host it bound and each --allow-host.

Those names are exact: a host name or an IPv4/IPv6 address, compared without the port (the port is whichever
`serve` listens on, whatever the header says). There are no patterns. Starlette's TrustedHostMiddleware, used
before, read `--allow-host '*'` as "any host", which switched the check off while the start-up note said only
requests to `*` were answered, and `clinic*` as an assertion that failed at the first request, so every request
answered 500. Whoever wants any name answered sets --token instead: the token guards the API, and the check is
off. The check itself answers 400 whatever goes wrong in it, never 500.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from skinlesion.errors import UserError

log = logging.getLogger("skinlesion.serve")
# A DNS label (RFC 1123; `_` too, which some machines' names hold), and a Host header's optional port.
LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
PORT = re.compile(r"[0-9]{0,5}")
SYNTAX = "an exact host name or IP address, without port or wildcard, e.g. ws-3.clinic.local, 10.1.2.3 or [fe80::1]"
REFUSED = "Invalid host header: this server answers only requests addressed to the names it was started with\n"


def canonical(name: str) -> str | None:
    """`name` as the check compares it (lower case; an IPv6 address in brackets and compressed, so [::1] and
    [0:0:0:0:0:0:0:1] are one name), or None if it is neither a host name nor an IP address."""
    name = name.lower()
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" in bare:
        try:
            return f"[{ipaddress.IPv6Address(bare).compressed}]"
        except ValueError:
            return None
    if bare != name:  # brackets around anything but an IPv6 address
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # numbers only: an IPv4 address, or nothing (10.1.2, 300.1.1.1)
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            return None
    return name


def allowed_name(value: str) -> str:
    """An --allow-host value as the check compares it, or a one-line UserError naming it and the syntax."""
    name = canonical(value)
    if name is not None:
        return name
    if "*" in value:
        raise UserError(
            f"--allow-host {value!r}: patterns are not accepted, only {SYNTAX} (repeat --allow-host for each "
            "name); to answer requests addressed to any name, set --token: the token guards the API, and no "
            "name is checked then"
        )
    if canonical(value.rpartition(":")[0]) is not None and value.rpartition(":")[2].isdigit():
        raise UserError(f"--allow-host {value!r}: give the name without the port (the check compares names, not ports)")
    raise UserError(f"--allow-host {value!r} is not {SYNTAX}")


def request_host(header: str) -> str | None:
    """The name a Host header value addresses, as `canonical` gives it (port dropped); None if malformed."""
    if header.startswith("["):  # [IPv6]:port
        address, bracket, rest = header.partition("]")
        name, port = address + "]", rest.removeprefix(":")
        if not bracket or (rest and not rest.startswith(":")):
            return None
    else:
        name, _, port = header.partition(":")
    return canonical(name) if PORT.fullmatch(port) else None


class HostCheck:
    """ASGI middleware: a request whose Host is not one of `names` gets 400 with a plain message, and so
    does one whose check fails in any way (two Host headers, none, one that cannot be read)."""

    def __init__(self, app: ASGIApp, names: Iterable[str]) -> None:
        self.app = app
        self.names = frozenset(names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            given = Headers(scope=scope).getlist("host")
            answered = len(given) == 1 and request_host(given[0]) in self.names
        except Exception:  # whatever the header holds, the answer is 400, never a 500
            log.warning("host check failed on a request; answered 400", exc_info=True)
            answered = False
        if answered:
            await self.app(scope, receive, send)
        else:
            await PlainTextResponse(REFUSED, status_code=400)(scope, receive, send)
