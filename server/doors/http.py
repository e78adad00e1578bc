"""HTTP pieces every door shares: where the domain hangs on the app, and error rendering."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from common import wire
from server.fleet import Fleet, Refused
from server.store import StoreUnavailable

log = logging.getLogger(__name__)

# App keys (aiohttp 3.8, Debian 12's, has no web.AppKey): the parts each door's app holds.
FLEET = "virtfleet.fleet"
LINKS = "virtfleet.links"
GATEWAY = "virtfleet.gateway"
CHANGES = "virtfleet.changes"
SESSIONS = "virtfleet.web_sessions"
OWNERSHIP = "virtfleet.ownership"
ON_REFUSED = "virtfleet.on_refused"  # app key: called with the error code of each refusal
ERROR_CODE = "virtfleet.error"  # on a refusal's response: its code
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How a door renders a refusal: (status, code, message, extra headers) -> response.
Render = Callable[[int, str, str, dict[str, str] | None], web.StreamResponse]


def fleet_of(request: web.Request) -> Fleet:
    return request.app[FLEET]  # type: ignore[no-any-return]


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response({"error": code, "message": message}, status=status, headers=headers)
    response[ERROR_CODE] = code
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON refusal; never leak a stack trace to a client."""
    response = await answer(request, handler)
    if response.status >= 400:
        on_refused = request.app.get(ON_REFUSED)
        if on_refused is not None:
            on_refused(response.get(ERROR_CODE, str(response.status)))
        await _drain(request)
    return response


async def _drain(request: web.Request) -> None:
    """Read what the client still sends of a refused request's body (up to the size limit).
    Left unread, a body of 100+ KiB stalls the keep-alive connection for 10 s under aiohttp
    3.8 over TLS, so the client's next call gets no answer (found by tests/test_hostile.py)."""
    left = wire.MAX_BODY_BYTES
    while left > 0 and not request.content.at_eof():
        left -= len(await request.content.readany())


async def answer(request: web.Request, handler: Handler,
                 render: Render = error_response) -> web.StreamResponse:
    """The handler's response, or every failure as a refusal `render` makes, in words
    (never a stack trace)."""
    try:
        return await handler(request)
    except Refused as exc:
        return render(exc.status, exc.code, exc.message, exc.headers)
    except wire.WireError as exc:
        return render(400, "bad_request", str(exc), None)
    except web.HTTPRequestEntityTooLarge:
        return render(413, "too_large", f"request body is larger than {wire.MAX_BODY_BYTES} bytes",
                      None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A 405 must say which methods the path has (RFC 9110); keep aiohttp's Allow.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return render(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, allow)
    except StoreUnavailable as exc:
        log.error("state store failed on %s %s: %s", request.method, request.path, exc)
        return render(503, "store_unavailable",
                      f"the server cannot write its state ({exc}); try again later", None)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return render(500, "internal_error", "internal server error; see the server log", None)
