"""Bearer tokens: who may call, which models they may use, and how often.

Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with every known
digest in constant time (``hmac.compare_digest``, no early exit), so neither the comparison nor the
lookup reveals how much of a guess was right. No token, plain or hashed, is ever logged: logs name
a token by its entry's ``name``.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlipserve.config import TokenEntry
from mlipserve.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError

TOKENS_ENV = "MLIPSERVE_TOKENS"
_BEARER = "bearer "
_HEX = frozenset("0123456789abcdef")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _entry(value: str, name: str, **extra) -> TokenEntry:
    """A token given as ``sha256:<hex digest>`` or in plain text."""
    value = value.strip()
    if value.startswith("sha256:"):
        digest = value[len("sha256:"):].lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"{name}: a sha256: token must be 64 hex digits")
        return TokenEntry(name=name, sha256=digest, **extra)
    if not value:
        raise ValueError(f"{name}: empty token")
    return TokenEntry(name=name, sha256=hash_token(value), **extra)


def load_token_file(path: str | Path) -> tuple[TokenEntry, ...]:
    """Tokens from ``path``: a YAML mapping ``tokens: [{name, token | sha256, models, requests_per_second,
    burst}]``, or plain text with one token (or ``sha256:<hex>``) per line, ``#`` starting a comment."""
    import yaml

    path = Path(path)
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None  # plain tokens may hold characters YAML does not accept
    if not (isinstance(data, dict) and "tokens" in data):
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        entries = tuple(_entry(line, f"{path.name}:{k + 1}") for k, line in enumerate(lines) if line)
    else:
        entries = tuple(_structured_entry(item, f"{path.name}: tokens[{k}]") for k, item in enumerate(data["tokens"] or []))
    if not entries:
        raise ValueError(f"{path}: no tokens in the file")
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: token names must be unique; repeated: {', '.join(repeated)}")
    return entries


def _structured_entry(item: dict, where: str) -> TokenEntry:
    known = {"name", "token", "sha256", "models", "requests_per_second", "burst"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if ("token" in item) == ("sha256" in item):
        raise ValueError(f"{where}: give exactly one of token or sha256")
    value = f"sha256:{item['sha256']}" if "sha256" in item else str(item["token"])
    models = tuple(item["models"]) if item.get("models") is not None else None
    return _entry(value, str(item.get("name") or where), models=models,
                  requests_per_second=item.get("requests_per_second"), burst=item.get("burst"))


def tokens_from_env(environ: dict[str, str] | None = None) -> tuple[TokenEntry, ...]:
    """Comma-separated tokens (plain or ``sha256:<hex>``) from $MLIPSERVE_TOKENS, for every model."""
    value = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
    parts = [p for p in value.split(",") if p.strip()]
    return tuple(_entry(p, f"{TOKENS_ENV}[{k}]") for k, p in enumerate(parts))


@dataclass(frozen=True)
class Principal:
    """The caller a token identifies."""

    name: str
    models: frozenset[str] | None  # None: every model

    def require_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise PermissionDeniedError(self.name, model)


# The caller of the RPC being handled; set by the interceptor in the RPC's own task.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


class TokenBucket:
    """``rate`` requests per second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


class Authenticator:
    """Checks the ``authorization: Bearer <token>`` metadata of a call against the known tokens."""

    def __init__(self, entries: Sequence[TokenEntry], default_rate: float | None = None) -> None:
        if not entries:
            raise ValueError("an Authenticator needs at least one token")
        self._entries = tuple(entries)
        self._digests = tuple(bytes.fromhex(e.sha256) for e in self._entries)
        self._principals = tuple(Principal(e.name, frozenset(e.models) if e.models is not None else None)
                                 for e in self._entries)
        self._buckets: list[TokenBucket | None] = []
        for entry in self._entries:
            rate = entry.requests_per_second if entry.requests_per_second is not None else default_rate
            burst = entry.burst if entry.burst is not None else max(1.0, 2.0 * rate) if rate else 0.0
            self._buckets.append(TokenBucket(rate, burst) if rate else None)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        token = _bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("this server needs a token: send 'authorization: Bearer <token>' "
                                       "(mlipserve_client: token= or $MLIPSERVE_TOKEN)", reason="missing_token")
        digest = hashlib.sha256(token.encode()).digest()
        match = -1
        for k, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                match = k
        if match < 0:
            raise UnauthenticatedError("the token is not valid for this server")
        bucket = self._buckets[match]
        if bucket is not None:
            wait = bucket.take()
            if wait:
                raise RateLimitedError(self._entries[match].name, bucket.rate, wait)
        return self._principals[match]


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text[:len(_BEARER)].lower() == _BEARER:
                return text[len(_BEARER):].strip() or None
            return None
    return None
