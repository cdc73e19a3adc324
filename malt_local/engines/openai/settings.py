"""What a user chooses for `--engine openai`: endpoints, served model names, limits."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field

from malt_local.errors import MaltError, split_url_credentials
from malt_local.hashing import is_sha256
from malt_local.roles import ROLES

ROLE_NAMES = (*ROLES, "judge")  # the judge can have its own served model
# Upper bounds that keep a typo from meaning "forever" or "unbounded memory": a week for one
# answer, and more sequences in flight per endpoint than any server has slots; under a second
# no server answers (5e-324 would fail every request as "no response within 0 s").
MIN_TIMEOUT = 1.0
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_IN_FLIGHT = 4096


@dataclass(frozen=True)
class OpenAISettings:
    """The client side of `--engine openai`; every value the server is not asked for.

    `max_in_flight` and `server_n` left as None are read from the server where it says
    (llama-server's `/props`: its slot count, and `n` with seed + i per child), else a request
    at a time per key and 8 in flight.
    """

    endpoints: tuple[str, ...]
    model: str | None = None  # the served model name; None: the one model the servers list
    api_key: str | None = field(default=None, repr=False)
    role_models: dict[str, str] = field(default_factory=dict)
    max_in_flight: int | None = None
    server_n: bool | None = None
    model_revision: str | None = None
    model_sha256: str | None = None
    timeout: float | None = None  # seconds for one response; None: sized from max_tokens
    connect_timeout: float = 10.0
    retries: int = 6  # tries of one request before it counts its endpoint as failing for good
    fail_limit: int = 3  # failures in a row that take an endpoint out of the run
    backoff: float = 0.5  # first retry delay in seconds, doubled each time, with jitter
    backoff_max: float = 8.0
    # `Authorization` per endpoint from a URL's ``user:password@`` (HTTP Basic), which takes
    # the place of the API key for that endpoint; the URLs in `endpoints` no longer hold them.
    endpoint_auth: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        clean: list[str] = []
        auth = dict(self.endpoint_auth)
        for url in self.endpoints:
            bare, basic = split_url_credentials(url)
            if basic is not None:
                auth[bare] = basic
            if bare not in clean:
                clean.append(bare)
        object.__setattr__(self, "endpoints", tuple(clean))
        object.__setattr__(self, "endpoint_auth", auth)
        if self.max_in_flight is not None and not 1 <= self.max_in_flight <= MAX_IN_FLIGHT:
            raise MaltError(
                f"--max-in-flight must be in [1, {MAX_IN_FLIGHT}] (got {self.max_in_flight!r})"
            )
        if self.model_sha256 is not None and not is_sha256(self.model_sha256):
            raise MaltError("--model-sha256 must be 64 lower-case hex digits")
        if self.timeout is not None and not MIN_TIMEOUT <= self.timeout <= MAX_TIMEOUT:  # NaN
            raise MaltError(
                f"--request-timeout must be in [{MIN_TIMEOUT:.0f}, {MAX_TIMEOUT:.0f}] seconds "
                f"(got {self.timeout!r})"
            )

    def with_model(self, name: str) -> OpenAISettings:
        return dataclasses.replace(self, model=name)

    def model_for(self, role: str | None) -> str:
        """The served name for a role's requests (`--role-model`), else `--model`."""
        assert self.model is not None, "the model is identified before the engine is made"
        return self.role_models.get(role or "", self.model)

    def read_timeout(self, max_tokens: int, sequences: int = 1) -> float:
        """Long enough for the slowest honest answer: a prompt and max_tokens at 4 tokens/s
        per sequence on a busy CPU server, plus a minute of queueing."""
        if self.timeout is not None:
            return self.timeout
        return 60.0 + max_tokens * sequences / 4.0


def _parses(url: str) -> bool:
    """Whether the URL's host and port can be read: `http://[::1` or `http://h:x` pass
    `split_endpoints`' pattern, then fail with a ValueError deep in the first request."""
    try:
        u = urllib.parse.urlsplit(url)
        return bool(u.hostname) and (u.port is None or u.port > 0)
    except ValueError:
        return False


def split_endpoints(values: tuple[str, ...] | list[str], env: str | None) -> tuple[str, ...]:
    """`--endpoint` values, else `$MALT_ENDPOINTS` split on commas and spaces; each checked."""
    raw = list(values) or [v for v in re.split(r"[,\s]+", env or "") if v]
    out: list[str] = []
    for url in raw:
        base = url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        if not re.match(r"^https?://[^/\s]+", base) or not _parses(base):
            raise MaltError(f"--endpoint {url!r} is not an http:// or https:// URL")
        if base not in out:
            out.append(base)
    if not out:
        raise MaltError("--engine openai needs --endpoint URL (or $MALT_ENDPOINTS)")
    return tuple(out)


def parse_role_models(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`--role-model ROLE=NAME` values as a dict."""
    out: dict[str, str] = {}
    for value in values:
        role, sep, name = value.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or role not in ROLE_NAMES or not name:
            raise MaltError(
                f"--role-model {value!r}: expected ROLE=NAME with ROLE one of "
                f"{', '.join(ROLE_NAMES)}"
            )
        out[role] = name
    return out
