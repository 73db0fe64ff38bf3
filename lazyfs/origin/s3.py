"""``s3://bucket/prefix``: an origin in Amazon S3 or any S3-compatible store (MinIO, R2, moto).

Mechanism: requests go through obstore
(Rust ``object_store`` bindings: SigV4 signing, connection pooling, retries
with backoff, native async range reads).  We add the contract's edge cases,
one error tree, a concurrency limit and credential resolution.

Credentials, first match wins:

1. ``credentials=S3Credentials(...)`` given to :class:`S3Origin` (tests, embedding);
2. ``anonymous=True``: unsigned requests (public buckets);
3. botocore's standard chain, through a :class:`boto3.session.Session`
   (the one passed as ``session=``, or a default one): the ``AWS_*``
   environment variables, ``AWS_PROFILE`` and the shared
   ``~/.aws/credentials`` / ``~/.aws/config`` files (static keys, SSO,
   ``credential_process``, assume-role profiles), web identity, ECS/EKS
   container credentials and finally EC2 instance metadata.  obstore alone
   does not read the shared files, hence boto3 (through
   :class:`obstore.auth.boto3.Boto3CredentialProvider`, which refreshes
   expiring credentials).  The chain is consulted once, lazily, in a worker
   thread (it may read files and probe instance metadata).  If it finds
   nothing, requests go unsigned and an access-denied error says so.

The region comes from :attr:`OriginConfig.s3_region`, else the boto3 profile,
else obstore's default (``AWS_REGION`` / ``us-east-1``); the endpoint from
:attr:`OriginConfig.s3_endpoint` (S3-compatible stores).  lazyfs reads the
environment only in :func:`s3_config_from_env` (called by the CLI); botocore and
obstore read the standard ``AWS_*`` variables themselves, as every AWS tool does.

Guarantees: reads past the end return ``b""`` (S3 answers 416); ``write`` is
atomic (a PUT, or a multipart upload that appears only once completed);
``list`` matches its prefix as a string, like S3; a bucket that does not
exist is reported as such, not as a missing object.  Errors map to
:class:`~lazyfs.errors.NotFoundError` (no such key),
:class:`~lazyfs.errors.AccessDeniedError` (401/403, bad or missing
credentials) and :class:`~lazyfs.errors.UnavailableError` (everything else:
connection failures, timeouts, 5xx after obstore's retries).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from lazyfs import __version__
from lazyfs.config import OriginConfig, s3_config_from_env
from lazyfs.errors import (
    AccessDeniedError,
    BadURLError,
    NotFoundError,
    OriginError,
    UnavailableError,
    UsageError,
)
from lazyfs.origin._common import check_prefix, check_range
from lazyfs.origin.base import check_key

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config, S3Credential

__all__ = ["S3Credentials", "S3Origin", "check_bucket_name", "s3_config_from_env"]

# obstore retries idempotent requests itself (5xx, 429, resets) with exponential backoff. Keep
# that short: the fetcher above retries too, against a read deadline, and may switch to a peer.
# Two retries ride out a throttling blip; more would only delay the fetcher's own decision.
_MAX_RETRIES = 2
_BACKOFF_INITIAL = timedelta(milliseconds=100)
_BACKOFF_MAX = timedelta(seconds=2)
# ... and never keep retrying for longer than this, even with a generous request timeout.
_RETRY_TIMEOUT_CAP = 30.0
# Multipart uploads (objects over obstore's 5 MiB part size) send this many parts at once.
# Seeding already uploads several packs in parallel; 4 parts each keeps the total number of
# connections near OriginConfig.max_connections instead of 12x it (obstore's default).
_UPLOAD_PART_CONCURRENCY = 4
# Keys per LIST page (S3 returns at most 1000).
_LIST_PAGE = 1000

# S3 bucket naming rules (3-63 chars; lowercase letters, digits, dots and hyphens;
# alphanumeric at both ends). Older buckets may have been laxer; S3-compatible stores too.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([^<]{1,100})</Code>")
_MESSAGE_RE = re.compile(r"<Message>([^<]{1,300})</Message>")


@dataclass(frozen=True, slots=True)
class S3Credentials:
    """Static credentials (an access key, and a session token for temporary ones)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def check_bucket_name(bucket: str) -> str:
    """Reject names S3 would refuse (so a typo fails at once, with a clear message)."""
    if not bucket:
        raise BadURLError("an s3 origin URL needs a bucket: s3://bucket/prefix")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise BadURLError(
            f"{bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, dots and hyphens)"
        )
    return bucket


class _StaticProvider:
    """An obstore credential provider that hands out fixed credentials."""

    def __init__(self, creds: S3Credentials) -> None:
        self._creds = creds

    def __call__(self) -> S3Credential:
        return {
            "access_key_id": self._creds.access_key_id,
            "secret_access_key": self._creds.secret_access_key,
            "token": self._creds.session_token,
            "expires_at": None,
        }


class S3Origin:
    """An origin under ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        config: OriginConfig = OriginConfig(),
        *,
        credentials: S3Credentials | None = None,
        anonymous: bool = False,
        session: Any = None,
    ) -> None:
        """``session``: a ``boto3.session.Session`` to resolve credentials with (a profile)."""
        self._bucket = check_bucket_name(bucket)
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except UsageError as exc:
                raise BadURLError(f"s3://{bucket}/{prefix}: invalid prefix") from exc
        self._prefix = prefix
        endpoint = config.s3_endpoint
        if endpoint is not None:
            if not endpoint.startswith(("http://", "https://")):
                raise BadURLError(f"S3 endpoint {endpoint!r} must start with http:// or https://")
            if endpoint.startswith("http://") and not config.s3_allow_http:
                raise BadURLError(f"S3 endpoint {endpoint!r} is plain http, which this configuration forbids")
        self._config = config
        self._credentials = credentials
        self._anonymous = anonymous
        self._session = session
        self._store: S3Store | None = None
        self._store_lock = asyncio.Lock()
        self._unsigned_fallback = False
        self._bucket_confirmed = False
        self._limit = asyncio.Semaphore(config.max_connections)
        self._closed = False

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def writable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"S3Origin({self.url!r}, endpoint={self._config.s3_endpoint!r})"

    # --- the Origin protocol -------------------------------------------------------------------

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(key, start, length)
        store = await self._open_store()
        async with self._limit:
            try:
                if length == 0:
                    # obstore refuses empty ranges; still answer NotFoundError for a missing key.
                    await obstore.head_async(store, key)
                    data: Any = b""
                elif length is not None:
                    data = await obstore.get_range_async(store, key, start=start, length=length)
                elif start:
                    result = await obstore.get_async(store, key, options={"range": {"offset": start}})
                    data = await result.bytes_async()
                else:
                    result = await obstore.get_async(store, key)
                    data = await result.bytes_async()
            except (ObstoreError, OSError, ValueError) as exc:
                if _summary(exc)[0] == 416 or await self._starts_past_end(store, key, start, exc):
                    # The range starts at or past the end of the object (S3 answers 416).
                    self._bucket_confirmed = True
                    return b""
                raise await self._error(exc, "read", key) from exc
        self._bucket_confirmed = True
        return bytes(data)

    async def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        store = await self._open_store()
        async with self._limit:
            try:
                await obstore.put_async(store, key, bytes(data), max_concurrency=_UPLOAD_PART_CONCURRENCY)
            except (ObstoreError, OSError, ValueError) as exc:
                raise await self._error(exc, "write", key) from exc
        self._bucket_confirmed = True

    async def exists(self, key: str) -> bool:
        check_key(key)
        store = await self._open_store()
        async with self._limit:
            try:
                await obstore.head_async(store, key)
            except (ObstoreError, OSError, ValueError) as exc:
                err = await self._error(exc, "check", key)
                if isinstance(err, NotFoundError):
                    return False
                raise err from exc
        self._bucket_confirmed = True
        return True

    async def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        store = await self._open_store()
        # object_store matches list prefixes by whole path segments (`refs/ll` would not match
        # `refs/llama/8b`); S3 and our contract match strings. List the segment-aligned part,
        # then filter by the full prefix.
        head = prefix.rpartition("/")[0]
        keys: list[str] = []
        async with self._limit:
            try:
                async for page in obstore.list(store, head or None, chunk_size=_LIST_PAGE):
                    keys.extend(m["path"] for m in page if m["path"].startswith(prefix))
            except (ObstoreError, OSError, ValueError) as exc:
                raise await self._error(exc, "list", prefix) from exc
        self._bucket_confirmed = True
        keys.sort()
        return keys

    async def aclose(self) -> None:
        # obstore's client pool is dropped with the store; nothing to await.
        self._closed = True
        self._store = None

    async def _starts_past_end(self, store: S3Store, key: str, start: int, exc: BaseException) -> bool:
        """After a ranged GET that object_store refused as "non-partial": is ``start`` past the end?

        Some S3-compatible servers answer a range past the end with ``200`` and an empty
        body instead of ``416``; object_store rejects that answer. A HEAD settles it.
        """
        if "partial" not in str(exc).lower():
            return False
        try:
            meta = await obstore.head_async(store, key)
        except (ObstoreError, OSError, ValueError):
            return False
        return start >= meta["size"]

    # --- store construction ---------------------------------------------------------------------

    async def _open_store(self) -> S3Store:
        if self._closed:
            raise UnavailableError(f"{self.url}: the origin is closed")
        if self._store is not None:
            return self._store
        async with self._store_lock:
            if self._store is None:
                # Credential resolution may read files and probe instance metadata: not on the loop.
                self._store = await asyncio.to_thread(self._build_store)
            return self._store

    def _build_store(self) -> S3Store:
        cfg = self._config
        s3: S3Config = {}
        provider: Any = None
        if self._credentials is not None:
            provider = _StaticProvider(self._credentials)
        elif self._anonymous:
            s3["skip_signature"] = True
        else:
            provider = self._boto3_provider()
            if provider is None:
                self._unsigned_fallback = True
                s3["skip_signature"] = True
            elif "region" in provider.config:
                s3["region"] = provider.config["region"]
        if cfg.s3_region:
            s3["region"] = cfg.s3_region
        if cfg.s3_endpoint:
            s3["endpoint"] = cfg.s3_endpoint
        client: ClientConfig = {
            "allow_http": cfg.s3_allow_http,
            "connect_timeout": timedelta(seconds=cfg.connect_timeout),
            "timeout": timedelta(seconds=cfg.request_timeout),
            # Keep as many idle connections as we allow concurrent requests: no reconnect churn.
            "pool_max_idle_per_host": str(cfg.max_connections),
            "user_agent": f"lazyfs/{__version__}",
        }
        try:
            return S3Store(
                self._bucket,
                prefix=self._prefix or None,
                config=s3,
                client_options=client,
                retry_config={
                    "max_retries": _MAX_RETRIES,
                    "backoff": {"init_backoff": _BACKOFF_INITIAL, "max_backoff": _BACKOFF_MAX, "base": 2},
                    "retry_timeout": timedelta(seconds=min(cfg.request_timeout, _RETRY_TIMEOUT_CAP)),
                },
                credential_provider=provider,
            )
        except (ObstoreError, ValueError) as exc:
            raise BadURLError(f"{self.url}: cannot configure the S3 client: {_first_line(exc)}") from exc

    def _boto3_provider(self) -> Any:
        """obstore's boto3 provider over botocore's default chain; None if it finds no credentials."""
        import boto3  # imported lazily: it costs ~0.3 s
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = self._session if self._session is not None else boto3.Session()
        try:
            if session.get_credentials() is None:
                return None
            return Boto3CredentialProvider(session)
        except Exception as exc:
            # botocore raises many types (bad profile, broken config file, SSO token expired).
            raise AccessDeniedError(f"{self.url}: cannot load AWS credentials: {_first_line(exc)}") from exc

    # --- errors ---------------------------------------------------------------------------------

    async def _error(self, exc: BaseException, action: str, key: str) -> OriginError:
        """Map an obstore / OS exception to our tree, with a one-line reason."""
        status, code, reason = _summary(exc)
        where = f"{self.url}/{key}" if key else self.url
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code == "NoSuchKey":
            self._bucket_confirmed = True
        if isinstance(exc, FileNotFoundError) or status == 404 or code == "NoSuchKey":
            if not self._bucket_confirmed and await self._bucket_missing(key):
                return self._no_bucket()
            return NotFoundError(f"{where}: no such object")
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError | PermissionError) or status in (401, 403):
            if self._anonymous:
                hint = "the request was unsigned (anonymous access)"
            elif self._unsigned_fallback:
                hint = "no AWS credentials were found (environment, ~/.aws, instance role), so it was unsigned"
            else:
                hint = "check the AWS credentials and the bucket policy"
            return AccessDeniedError(f"cannot {action} {where}: access denied ({reason}); {hint}")
        return UnavailableError(f"cannot {action} {where}: {reason}")

    def _no_bucket(self) -> OriginError:
        endpoint = self._config.s3_endpoint or "AWS S3"
        return OriginError(f"s3://{self._bucket}: the bucket does not exist (at {endpoint})")

    async def _bucket_missing(self, key: str) -> bool:
        """After a 404 without a body (HEAD): is it the bucket that is missing, not the key?

        A GET of the same key answers with an error document naming ``NoSuchBucket`` or
        ``NoSuchKey``. Asked once per origin, until any request has shown the bucket exists.
        """
        store = self._store
        if store is None:
            return False
        try:
            await obstore.get_range_async(store, key, start=0, length=1)
        except (ObstoreError, OSError, ValueError) as exc:
            code = _summary(exc)[1]
            if code == "NoSuchBucket":
                return True
            if code == "NoSuchKey":
                self._bucket_confirmed = True
            return False
        self._bucket_confirmed = True
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).split("\n\nDebug source", 1)[0].strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _summary(exc: BaseException) -> tuple[int | None, str | None, str]:
    """(HTTP status, S3 error code, short reason) parsed from an obstore error.

    obstore exposes no structured status, but its messages carry the status line and the
    S3 error document (``<Code>``, ``<Message>``), which is what a user needs to see.
    """
    text = str(exc).split("\n\nDebug source", 1)[0]
    status_m = _STATUS_RE.search(text)
    status = int(status_m.group(1)) if status_m else None
    code_m = _CODE_RE.search(text)
    code = code_m.group(1) if code_m else None
    msg_m = _MESSAGE_RE.search(text)
    if status is not None:
        reason = f"HTTP {status}"
        if code:
            reason += f" {code}"
        if msg_m:
            reason += f": {msg_m.group(1)}"
    else:
        reason = _first_line(exc)
    return status, code, reason
