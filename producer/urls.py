"""Pure helpers about ``REDIS_URL`` strings: which form a URL has, and how to show it without its password."""

from __future__ import annotations

from urllib.parse import urlsplit

SENTINEL_SCHEME = "sentinel"


def is_sentinel_url(url: str) -> bool:
    """True for ``sentinel://`` URLs (one or more, ``;``-separated)."""
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def redacted_url(url: str) -> str:
    """``url`` with every password replaced by ``**`` (for logs and error messages)."""
    out = []
    for chunk in url.split(";"):
        parts = urlsplit(chunk.strip())
        if parts.password:
            user = parts.username or ""
            host = parts.hostname or ""
            netloc = f"{user}:**@{host}" + (f":{parts.port}" if parts.port else "")
            chunk = parts._replace(netloc=netloc).geturl()
        out.append(chunk)
    return ";".join(out)
