"""The one masker: every text that leaves a build goes through :class:`Masker` first.

A secret rarely leaks as itself. Tools print it base64-encoded (an HTTP Basic header, a
Docker ``auth`` field, a Kubernetes Secret), percent-encoded (a URL), or JSON-escaped (an
error body). Base64 is the tricky one: a secret inside a longer encoded blob, say
``base64(user + ":" + secret)``, is encoded at one of three byte alignments, and each gives
different characters. So for every secret the masker knows each *form*:

- the raw value;
- standard and URL-safe base64 at all three byte alignments: the characters fixed by the
  secret's bytes alone (what appears wherever it sits in a larger blob), and, where the secret
  ends the blob, those followed by the last character with and without ``=`` padding;
- percent-encoding (``quote`` with and without ``/`` kept, ``quote_plus``; upper- and
  lower-case hex);
- JSON string escaping (ASCII-only and not, with ``/`` escaped or not).

and replaces any of them with ``***``, longest first. Derived forms shorter than
:data:`MIN_DERIVED` characters are left out: for a secret of fewer than four bytes they would
match ordinary text, and such a secret has next to nothing to hide anyway.

Pure and cheap: one compiled regular expression, rebuilt only when a secret is added.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
#: Encoded forms shorter than this are not masked (they would match ordinary text).
MIN_DERIVED = 5
#: Base64 characters before the secret's own, at byte offsets 0, 1 and 2 of its 3-byte group:
#: they mix the bytes before it in.
_LEADING = (0, 2, 3)
#: Characters of a trailing partial group fixed by the secret alone (1 or 2 bytes of it).
_TRAILING = (0, 1, 2)


def _base64_forms(raw: bytes) -> set[str]:
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for shift in range(3):
            encoded = encode(b"\0" * shift + raw).decode()
            total = shift + len(raw)
            fixed = total // 3 * 4 + _TRAILING[total % 3]
            forms.add(encoded[_LEADING[shift]:fixed])  # anywhere in a blob
            ending = encoded[_LEADING[shift]:]  # the secret ends the blob
            forms |= {ending, ending.rstrip("=")}
    return forms


def _percent_forms(value: str) -> set[str]:
    forms = {quote(value, safe=""), quote(value), quote_plus(value)}
    return forms | {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), f) for f in forms}


def _json_forms(value: str) -> set[str]:
    forms = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return forms | {f.replace("/", "\\/") for f in forms}


def forms(value: str) -> set[str]:
    """Every form of ``value`` the masker looks for (pure; empty for an empty value)."""
    if not value:
        return set()
    derived = _base64_forms(value.encode()) | _percent_forms(value) | _json_forms(value)
    return {value} | {f for f in derived if len(f) >= MIN_DERIVED or f == value}


class Masker:
    """Secrets of one build (or one call), by name, and the masking of any text against them.

    Names are for messages ("the image carries the build secret TOKEN"); values never leave.
    """

    def __init__(self, secrets: Mapping[str, str] | Iterable[str] = ()) -> None:
        self._forms: dict[str, set[str]] = {}
        self._names: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        items = secrets.items() if isinstance(secrets, Mapping) else ((None, s) for s in secrets)
        for name, value in items:
            self.add(value, name)

    def __repr__(self) -> str:
        return f"Masker({len(self._forms)} secrets)"

    def add(self, value: str | None, name: str | None = None) -> None:
        """Mask ``value`` from now on (nothing for None or empty)."""
        if not value or value in self._forms:
            return
        self._forms[value] = forms(value)
        self._names[value] = name or "a credential"
        self._pattern = None

    def add_basic(self, username: str, password: str | None) -> None:
        """Mask a password and the ``username:password`` pair of HTTP Basic auth (whose
        encoding then is masked whole, the username's characters too)."""
        if password:
            self.add(password)
            self.add(f"{username}:{password}")

    def mask(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``***``."""
        if not self._forms or not text:
            return text
        if self._pattern is None:
            every = sorted(set().union(*self._forms.values()), key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, every)))
        return self._pattern.sub(MASK, text)

    def mask_data(self, value: Any) -> Any:
        """``value`` with every string in it masked (dicts, lists and tuples walked)."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: self.mask_data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mask_data(v) for v in value)
        return value

    def found(self, text: str) -> list[str]:
        """The names of the secrets any form of which appears in ``text`` (sorted, once each)."""
        return sorted({self._names[value] for value, fs in self._forms.items()
                       if any(f in text for f in fs)})


def of_settings(settings: Any) -> Masker:
    """A masker that knows the operator's own secrets (webhook secret and token, API tokens,
    admin and read tokens, the registry password with its Basic pair): what any text the bot
    writes of its own, a build's or a crash's, must never show. ``settings`` is a
    bot.settings.Settings (not imported: this module stays free of the bot's own)."""
    masker = Masker([value.get_secret_value() for value in (
        settings.github_webhook_secret, settings.gitlab_webhook_token, settings.github_token,
        settings.gitlab_api_token, settings.admin_token, settings.read_token) if value is not None])
    password = settings.registry_password
    masker.add_basic(settings.registry_username or "", password.get_secret_value() if password else None)
    return masker


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` masked against ``secrets`` (for one message; a build keeps its own Masker)."""
    return Masker(secrets).mask(text)


__all__ = ["MASK", "MIN_DERIVED", "Masker", "forms", "mask"]
