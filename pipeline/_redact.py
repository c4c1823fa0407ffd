"""Remove credentials from URLs before they are logged, recorded or forwarded.

Two places in a URL carry secrets: the userinfo (``http://user:password@host``) and query
parameters of pre-signed or token URLs (``X-Amz-Signature``, ``X-Amz-Credential``,
``X-Amz-Security-Token``, ``Signature``, ``AWSAccessKeyId``, ``token``, ``password``, ``key``...).
:func:`redact_url` replaces them with ``***``; :func:`redact_urls_in` does it for every URL inside
free text (an error message, a log line, ``repr`` of a value). Anything that is not a URL is left
as it is, so redacting is safe to apply to any text, and applying it twice changes nothing.

The userinfo is found as RFC 3986 parses it: the authority runs from ``//`` to the first ``/``,
``?`` or ``#``, and the userinfo is everything before its last ``@`` (so a password holding a
raw ``@`` is removed whole, and an ``@`` in a path, ``s3://bucket/user@example.svs``, is kept).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["REDACTED", "redact_url", "redact_urls_in", "has_credentials", "is_secret_param"]

#: What a removed secret is replaced with.
REDACTED = "***"

# scheme "://" then everything up to whitespace, a quote or an angle bracket (what ends a URL
# embedded in a message, a repr or markup).
_URL = re.compile(r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*://)([^\s\"'<>`]*)")
# Query parameter names (lower case, letters and digits only) that hold secrets; a name matches
# when it contains one of these words, so ``X-Amz-Security-Token``, ``access_token``, ``api_key``,
# ``AWSAccessKeyId``, ``sig`` and ``Signature`` all do. A false positive only hides a value.
_SECRET_WORDS = (
    "sig",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "key",
    "credential",
    "auth",
    "session",
)
# ... except these, which pre-signed URLs carry in the clear and which help reading a log.
_NOT_SECRET = ("xamzsignedheaders", "signedheaders")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter called ``name`` (raw or percent-encoded) may hold a secret."""
    flat = re.sub(r"[^a-z0-9]", "", unquote(name).lower())
    return flat not in _NOT_SECRET and any(word in flat for word in _SECRET_WORDS)


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)  # keep the separators so the rest reads as before
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and is_secret_param(name):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def _redact_rest(rest: str) -> str:
    """``rest`` is what follows ``scheme://``."""
    end = len(rest)
    for ch in "/?#":
        k = rest.find(ch)
        if k != -1:
            end = min(end, k)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at and userinfo != REDACTED:
        authority = f"{REDACTED}@{host}"
    path, q, query = tail.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        tail = f"{path}?{_redact_query(query)}{h}{fragment}"
    return authority + tail


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret-looking query values replaced by ``***``.

    ``http://user:pw@host:9000/b?X-Amz-Signature=ab&x=1`` -> ``http://***@host:9000/b?X-Amz-Signature=***&x=1``.
    A string without ``scheme://`` is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return url
    return f"{scheme}://{_redact_rest(rest)}"


def redact_urls_in(text: str) -> str:
    """``text`` with :func:`redact_url` applied to every ``scheme://...`` URL inside it."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: m.group(1) + _redact_rest(m.group(2)), text)


def has_credentials(text: str) -> bool:
    """Whether any URL in ``text`` carries userinfo or a secret-looking query value."""
    return redact_urls_in(text) != text
