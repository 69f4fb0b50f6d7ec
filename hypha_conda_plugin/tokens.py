"""Who a Hypha token belongs to, as the worker's own Hypha server says.

Two kinds of call carry nothing but a token the worker can trust to name a caller's
workspace:

- The app controller's ``start``: Hypha builds the worker's config with
  ``{..., **additional_kwargs}``, so whoever starts an app can overwrite ``workspace``,
  ``id`` or ``app_files_base_url`` in it. The ``token`` the controller minted for the
  app is bound to the app's workspace, and a forged one does not pass the server's check.
- Calls through Hypha's MCP and HTTP adapters, which reach the worker with one identity
  shared by every caller of the endpoint (see ``shared_identity.py``).

The check is the server's own ``parse_token`` over HTTP (``POST {server}/public/services/
ws/parse_token`` with the token as Bearer): the server verifies the signature and the
expiry, and answers with the user and the token's current workspace. The request always
goes to the server this worker is registered with, never to a URL a caller supplies.
Answers are cached briefly (bounded), so a busy agent costs one check a minute.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import httpx

from hypha_conda_plugin.errors import InvalidTokenError

#: How long a verified token is trusted without asking the server again, in seconds.
CACHE_SECONDS = 60.0
#: Verified tokens remembered at most (least recently used go first).
CACHE_ENTRIES = 1024
TIMEOUT = httpx.Timeout(15.0, connect=5.0)


@dataclass(frozen=True)
class TokenUser:
    """The user a token belongs to and the workspace it was issued for."""

    id: str
    workspace: str
    user: dict[str, Any]
    expires_at: float | None = None

    def context(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """A Hypha call context for this user, keeping the routing fields of ``base``."""
        context = dict(base or {})
        context.update({"ws": self.workspace, "user": dict(self.user)})
        return context


class TokenVerifier:
    """Asks the worker's Hypha server whose token a caller presents."""

    def __init__(self, server_url: str | None, *, verify_ssl: bool = True) -> None:
        self.server_url = (server_url or "").rstrip("/")
        self.verify_ssl = verify_ssl
        self._cache: OrderedDict[str, tuple[float, TokenUser]] = OrderedDict()

    async def verify(self, token: object) -> TokenUser:
        """The token's user and workspace; ``InvalidTokenError`` if the server refuses it."""
        if not isinstance(token, str) or not token.strip() or len(token) > 16_384:
            raise InvalidTokenError("A Hypha token (a non-empty string) is required here.")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return cached[1]
        user = await self._ask_server(token)
        until = now + CACHE_SECONDS
        if user.expires_at:
            until = min(until, user.expires_at)
        self._cache[key] = (until, user)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return user

    async def _ask_server(self, token: str) -> TokenUser:
        if not self.server_url:
            raise InvalidTokenError(
                "This worker does not know its Hypha server's URL, so it cannot check tokens."
            )
        url = f"{self.server_url}/public/services/ws/parse_token"
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT, verify=self.verify_ssl) as client:
                response = await client.post(
                    url, json={"token": token}, headers={"Authorization": f"Bearer {token}"}
                )
        except httpx.HTTPError as error:
            raise InvalidTokenError(
                f"Could not check the token with the Hypha server at {self.server_url}: {error}"
            ) from error
        if response.status_code != 200:
            raise InvalidTokenError(
                f"The Hypha server refused the token (HTTP {response.status_code}): "
                f"{response.text[:200]}. Use a current token from the Hypha web UI or "
                "generate_token()."
            )
        info = response.json()
        if not isinstance(info, dict) or not info.get("id"):
            raise InvalidTokenError("The Hypha server's answer about the token names no user.")
        scope = info.get("scope") or {}
        workspace = info.get("current_workspace") or scope.get("current_workspace")
        if info.get("is_anonymous") or not workspace or workspace == "*":
            raise InvalidTokenError(
                "The token names no workspace of its own (anonymous or unscoped); use a "
                "token generated for your workspace."
            )
        return TokenUser(
            id=str(info["id"]),
            workspace=str(workspace),
            user=info,
            expires_at=info.get("expires_at"),
        )
