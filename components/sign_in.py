"""Sign-in for a shared app: gradio's "Sign in with Hugging Face" on a Space, or the dev stand-in locally.

With ``LORA_LAB_SIGN_IN=huggingface`` (the default on a Space with ``hf_oauth: true``) the page gets gradio's
LoginButton, and gradio adds the OAuth routes and the session cookie itself. With ``dev`` (tests, a laptop with no
Hugging Face login) the app gets the same session cookie and two routes that put or remove the session entry
that Hugging Face's sign-in would leave:

    /dev-sign-in?user=NAME      signed in as NAME (then back to the page)
    /dev-sign-out

Handlers then learn who asks through ``components.shared.visitor_of``. Not a tab: the app assembles it.
"""

from __future__ import annotations

import secrets
from typing import Any

import gradio as gr
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from finetune.core.access import dev_session, sign_in_mode

SESSION_COOKIE = "session"  # the cookie name gradio's own OAuth session uses too


async def _dev_sign_in(request: Request) -> Response:
    try:
        request.session["oauth_info"] = dev_session(request.query_params.get("user", ""))
    except ValueError as error:
        return PlainTextResponse(f"{error} Use /dev-sign-in?user=NAME.", status_code=400)
    return RedirectResponse("/", status_code=303)


async def _dev_sign_out(request: Request) -> Response:
    request.session.pop("oauth_info", None)
    return RedirectResponse("/", status_code=303)


def app_kwargs() -> dict[str, Any]:
    """Extra FastAPI settings for demo.launch(app_kwargs=...): the dev stand-in's routes and session cookie.
    Empty unless sign-in is 'dev' (gradio adds its own for 'huggingface')."""
    if sign_in_mode() != "dev":
        return {}
    # A new key per process: dev sessions end with the app, and nobody can forge one from a known key.
    session = Middleware(SessionMiddleware, secret_key=secrets.token_hex(32), session_cookie=SESSION_COOKIE,
                         same_site="lax", https_only=False)
    return {"middleware": [session], "routes": [Route("/dev-sign-in", _dev_sign_in),
                                                Route("/dev-sign-out", _dev_sign_out)]}


def build_sign_in_row() -> gr.Markdown:
    """The sign-in button (Hugging Face mode) and the line saying who is signed in; returns that line."""
    with gr.Row():
        who = gr.Markdown(elem_id="who")
        if sign_in_mode() == "huggingface":
            gr.LoginButton()
    return who
