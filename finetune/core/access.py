"""Who may do what on a shared app: visitors, owners, operators and the per-visitor limits.

A local ``python app.py`` has no sign-in: its one user owns everything, as before. On a shared deployment the
operator turns sign-in on and every run, comparison and feedback item records the Hugging Face username of the
visitor who made it (its *owner*). The rules, all spelled here:

- the owner (or an operator) may stop, resume, cancel, delete, merge, export and push a run;
- another visitor sees a run (read-only) only when the operator makes runs public, else only their own;
- a visitor's feedback (prompts, answers, comments) and its exports are theirs; an operator sees everyone's;
- a visitor who has not signed in may look at public runs but not start, vote or export anything.

Operator settings (environment variables):

    LORA_LAB_SIGN_IN        off | huggingface | dev    (default: huggingface on a Space with hf_oauth, else off)
    LORA_LAB_OPERATORS      comma-separated Hugging Face usernames with every right
    LORA_LAB_PUBLIC_RUNS    1 = every visitor sees every run read-only (default 0: only their own)
    LORA_LAB_MAX_JOBS       queued + training jobs one visitor may have at once (default 2 with sign-in)
    LORA_LAB_MAX_STEPS      training steps one job may ask for (default: no limit)
    LORA_LAB_MAX_JOB_MINUTES  estimated minutes one job may take (default 60 with sign-in)

``dev`` is a stand-in for Hugging Face's sign-in on a machine that cannot reach it (tests, a demo on a laptop):
``/dev-sign-in?user=NAME`` puts the same session entry there that the real sign-in puts. It is refused on a
Space, where anyone could then claim any name.

Basic module: it imports nothing of the project.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

SIGN_IN_ENV = "LORA_LAB_SIGN_IN"
OPERATORS_ENV = "LORA_LAB_OPERATORS"
PUBLIC_RUNS_ENV = "LORA_LAB_PUBLIC_RUNS"
MAX_JOBS_ENV = "LORA_LAB_MAX_JOBS"
MAX_STEPS_ENV = "LORA_LAB_MAX_STEPS"
MAX_MINUTES_ENV = "LORA_LAB_MAX_JOB_MINUTES"
SIGN_IN_MODES = ("off", "huggingface", "dev")
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class AccessDenied(PermissionError):
    """A visitor asked for something that is not theirs to do; the message says why, for the UI."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sign_in_mode() -> str:
    """off, huggingface or dev. A Space with ``hf_oauth: true`` gets OAUTH_CLIENT_ID from Hugging Face, and
    sign-in is then on unless the operator says off."""
    setting = os.environ.get(SIGN_IN_ENV, "").strip().lower()
    if not setting:
        return "huggingface" if os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID") else "off"
    if setting not in SIGN_IN_MODES:
        raise ValueError(f"{SIGN_IN_ENV} must be one of {', '.join(SIGN_IN_MODES)}, got {setting!r}")
    if setting == "dev" and os.environ.get("SPACE_ID"):
        raise ValueError(f"{SIGN_IN_ENV}=dev lets anyone claim any name; it is refused on a Space. Use "
                         "'huggingface' (hf_oauth: true in spaces_config.yaml).")
    return setting


def operators() -> frozenset[str]:
    return frozenset(name.strip().lower() for name in os.environ.get(OPERATORS_ENV, "").split(",") if name.strip())


def public_runs() -> bool:
    return _flag(PUBLIC_RUNS_ENV)


@dataclass(frozen=True)
class Visitor:
    """The person behind a request. ``name`` is their Hugging Face username (None: not signed in, or sign-in is
    off); ``operator`` has every right (the local user of an app without sign-in is one)."""

    name: str | None
    operator: bool
    sign_in: bool = False  # sign-in is on for this app: owners are recorded and checked
    token: str | None = field(default=None, repr=False)  # their Hub token from sign-in, for their own pushes

    @property
    def label(self) -> str:
        if not self.sign_in:
            return "local user"
        return self.name or "a visitor who has not signed in"

    @property
    def owner(self) -> str | None:
        """What a run or feedback item records as its owner: the username where sign-in is on."""
        return self.name if self.sign_in else None


LOCAL = Visitor(name=None, operator=True)


def owned_by(owner: str | None) -> Visitor:
    """The visitor a queued job acts for once its request was accepted (a comparison's later runs)."""
    return LOCAL if owner is None else Visitor(name=owner, operator=owner.lower() in operators(), sign_in=True)


def visitor_from_session(oauth_info: dict[str, Any] | None) -> Visitor:
    """The visitor of a request, from the session entry Hugging Face's sign-in (or the dev stand-in) left."""
    if sign_in_mode() == "off":
        return LOCAL
    info = oauth_info or {}
    expires = info.get("expires_at")
    if not info or (isinstance(expires, (int, float)) and expires < time.time()):
        return Visitor(name=None, operator=False, sign_in=True)
    name = str((info.get("userinfo") or {}).get("preferred_username") or "").strip()
    if not USERNAME.match(name):
        return Visitor(name=None, operator=False, sign_in=True)
    return Visitor(name=name, operator=name.lower() in operators(), sign_in=True, token=info.get("access_token"))


def dev_session(name: str) -> dict[str, Any]:
    """The session entry of the dev stand-in: the shape Hugging Face's sign-in stores, for username ``name``."""
    if not USERNAME.match(name or ""):
        raise ValueError("A username is letters, digits, '.', '_' and '-'.")
    return {"access_token": f"dev-token-{name}", "token_type": "bearer", "scope": "openid profile",
            "expires_at": int(time.time()) + 8 * 3600,
            "userinfo": {"preferred_username": name, "name": name, "profile": f"https://huggingface.co/{name}"}}


# --- the rules -----------------------------------------------------------------------------------------------

def can_view(visitor: Visitor, owner: str | None) -> bool:
    """A run (or comparison) is visible to its owner, to operators, and to everyone when runs are public.
    A run with no owner (made before sign-in was turned on) belongs to the operators."""
    if visitor.operator or public_runs():
        return True
    return visitor.name is not None and owner is not None and owner.lower() == visitor.name.lower()


def can_act(visitor: Visitor, owner: str | None) -> bool:
    """Stop, resume, cancel, delete, merge, export or push: the owner's and the operators' alone."""
    if visitor.operator:
        return True
    return visitor.name is not None and owner is not None and owner.lower() == visitor.name.lower()


def sign_in_hint() -> str:
    """How to sign in on this app: the button on a Space, the dev stand-in's address elsewhere."""
    if sign_in_mode() == "dev":
        return "Sign in (dev sign-in: open /dev-sign-in?user=YOUR-NAME)"
    return "Sign in with Hugging Face (the button at the top of the page)"


def require_signed_in(visitor: Visitor, what: str) -> None:
    if not visitor.operator and visitor.name is None:
        raise AccessDenied(f"{sign_in_hint()} to {what}.")


def not_yours(what: str, thing: str) -> str:
    """The one refusal for a thing the visitor may not act on and for one that does not exist: both read the same
    and no owner is named, so a guessed id tells nothing about what exists or whose it is."""
    return f"You cannot {what}: {thing} is not one of yours. Only its owner or an operator can."


def require_owner(visitor: Visitor, owner: str | None, what: str, thing: str) -> None:
    """AccessDenied (``not_yours``) when ``visitor`` may not act on ``thing``; a thing that does not exist has no
    owner, so it is refused with the same words."""
    require_signed_in(visitor, what)
    if not can_act(visitor, owner):
        raise AccessDenied(not_yours(what, thing))


# --- per-visitor limits ----------------------------------------------------------------------------------------

def _limit(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("0", "none", "off", "unlimited"):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ValueError(f"{name} must be a positive whole number (or 0 for no limit), got {raw!r}")
    return value


@dataclass(frozen=True)
class JobLimits:
    """What one visitor may queue; None = no limit. Operators are never limited."""

    max_jobs: int | None = None
    max_steps: int | None = None
    max_minutes: int | None = None

    @classmethod
    def from_env(cls) -> JobLimits:
        shared = sign_in_mode() != "off"  # limits matter where strangers share one device
        return cls(max_jobs=_limit(MAX_JOBS_ENV, 2 if shared else None), max_steps=_limit(MAX_STEPS_ENV, None),
                   max_minutes=_limit(MAX_MINUTES_ENV, 60 if shared else None))

    def problems(self, visitor: Visitor, jobs_held: int, steps: int | None, minutes: float | None) -> list[str]:
        """Why this job may not be queued for ``visitor`` (empty: it may)."""
        if visitor.operator:
            return []
        found = []
        if self.max_jobs is not None and jobs_held >= self.max_jobs:
            found.append(f"You already have {jobs_held} job(s) queued or training; this server allows "
                         f"{self.max_jobs} per visitor ({MAX_JOBS_ENV}). Wait for one to finish, or cancel one.")
        if self.max_steps is not None:
            if steps is None:
                found.append(f"This server limits a job to {self.max_steps} training steps ({MAX_STEPS_ENV}): "
                             "set Max steps instead of training by epochs.")
            elif steps > self.max_steps:
                found.append(f"{steps} steps is more than the {self.max_steps} this server allows per job "
                             f"({MAX_STEPS_ENV}): lower Max steps.")
        if self.max_minutes is not None and minutes is not None and minutes > self.max_minutes:
            found.append(f"This job would take about {minutes:.0f} min; this server allows {self.max_minutes} min "
                         f"per job ({MAX_MINUTES_ENV}): lower Max steps or the number of samples.")
        return found
