"""The S3 origin against moto's S3 server: errors, credentials, misbehaving endpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lazyfs.config import OriginConfig
from lazyfs.errors import AccessDeniedError, NotFoundError, OriginError, UnavailableError
from lazyfs.origin import S3Credentials, S3Origin, open_origin
from tests.integration.conftest import AuthMotoServer, RawHTTPFactory, http_response
from tests.integration.servers import MotoServer, free_port

pytestmark = pytest.mark.integration


async def test_prefix_maps_keys_into_the_bucket(moto_s3: MotoServer, s3_bucket: str) -> None:
    whole = moto_s3.origin(s3_bucket)
    # open_origin has no credentials argument (botocore's chain supplies them): only check
    # what it builds here; a chain lookup could reach out to instance metadata.
    opened = open_origin(f"s3://{s3_bucket}/models/", moto_s3.config())
    assert isinstance(opened, S3Origin) and opened.url == f"s3://{s3_bucket}/models"
    prefixed = moto_s3.origin(s3_bucket, "/models/")
    try:
        await whole.write("models/refs/a/b", b"digest")
        await whole.write("modelsX/other", b"not below the prefix")
        assert await prefixed.read("refs/a/b") == b"digest"
        assert await prefixed.list("") == ["refs/a/b"]
        await prefixed.write("packs/p", b"pack")
        assert await whole.list("") == ["models/packs/p", "models/refs/a/b", "modelsX/other"]
    finally:
        await opened.aclose()
        await prefixed.aclose()
        await whole.aclose()


async def test_unsigned_requests_to_a_private_bucket_are_access_denied(moto_s3: MotoServer, s3_bucket: str) -> None:
    writer = moto_s3.origin(s3_bucket)
    anonymous = S3Origin(s3_bucket, "", moto_s3.config(), anonymous=True)
    try:
        await writer.write("obj", b"private")
        with pytest.raises(AccessDeniedError, match=r"unsigned \(anonymous access\)"):
            await anonymous.read("obj")
    finally:
        await anonymous.aclose()
        await writer.aclose()


async def test_missing_key_is_not_found(moto_s3: MotoServer, s3_bucket: str) -> None:
    origin = moto_s3.origin(s3_bucket)
    try:
        with pytest.raises(NotFoundError, match=f"s3://{s3_bucket}/nope: no such object"):
            await origin.read("nope", 0, 10)
        assert await origin.exists("nope") is False
        assert await origin.list("nope/") == []
    finally:
        await origin.aclose()


@pytest.mark.parametrize("operation", ["read", "exists", "write", "list"])
async def test_missing_bucket_is_a_clear_error(moto_s3: MotoServer, operation: str) -> None:
    origin = moto_s3.origin("no-such-bucket-here")
    try:
        with pytest.raises(OriginError, match=r"s3://no-such-bucket-here: the bucket does not exist") as info:
            if operation == "read":
                await origin.read("refs/a/b")
            elif operation == "exists":
                await origin.exists("refs/a/b")
            elif operation == "write":
                await origin.write("refs/a/b", b"x")
            else:
                await origin.list("refs/")
        # Not a NotFoundError: callers would report a missing object (or ref) instead.
        assert not isinstance(info.value, NotFoundError)
    finally:
        await origin.aclose()


async def test_connection_refused_is_unavailable_quickly() -> None:
    config = OriginConfig(s3_endpoint=f"http://127.0.0.1:{free_port()}", s3_region="us-east-1")
    origin = S3Origin("bucket", "", config, credentials=S3Credentials("k", "s"))
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="cannot read s3://bucket/obj"):
            await origin.read("obj", 0, 10)
        with pytest.raises(UnavailableError):
            await origin.exists("obj")
        assert time.monotonic() - t0 < 5.0
    finally:
        await origin.aclose()


async def test_server_that_never_answers_times_out(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: None)
    config = OriginConfig(s3_endpoint=server.url, s3_region="us-east-1", request_timeout=0.5)
    origin = S3Origin("bucket", "", config, credentials=S3Credentials("k", "s"))
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await origin.read("obj", 0, 10)
        elapsed = time.monotonic() - t0
        assert 0.4 < elapsed < 4.0, elapsed
    finally:
        await origin.aclose()


async def test_server_errors_are_unavailable_after_retries(raw_http: RawHTTPFactory) -> None:
    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    server = await raw_http(lambda req: http_response(503, body))
    config = OriginConfig(s3_endpoint=server.url, s3_region="us-east-1")
    origin = S3Origin("bucket", "", config, credentials=S3Credentials("k", "s"))
    try:
        with pytest.raises(UnavailableError, match="HTTP 503 SlowDown: Please reduce your request rate"):
            await origin.read("obj", 0, 10)
    finally:
        await origin.aclose()
    assert 2 <= len(server.requests) <= 3  # obstore retried, but briefly


# --- credentials, with a server that checks them ----------------------------------------------------


async def test_valid_credentials_work(moto_s3_auth: AuthMotoServer) -> None:
    origin = moto_s3_auth.server.origin(moto_s3_auth.bucket, "valid", credentials=moto_s3_auth.credentials)
    try:
        await origin.write("obj", b"data")
        assert await origin.read("obj", 1, 2) == b"at"
        assert await origin.list("") == ["obj"]
    finally:
        await origin.aclose()


@pytest.mark.parametrize("which", ["wrong secret", "unknown key", "no permission"])
async def test_refused_credentials_are_access_denied(moto_s3_auth: AuthMotoServer, which: str) -> None:
    good = moto_s3_auth.credentials
    creds = {
        "wrong secret": S3Credentials(good.access_key_id, "not-the-secret"),
        "unknown key": S3Credentials("AKIAUNKNOWNKEY000000", "whatever"),
        "no permission": moto_s3_auth.denied_credentials,
        "anonymous": None,
    }[which]
    server = moto_s3_auth.server
    origin = S3Origin(moto_s3_auth.bucket, "denied", server.config(), credentials=creds, anonymous=creds is None)
    try:
        with pytest.raises(AccessDeniedError, match="access denied") as info:
            await origin.read("obj")
        assert "not-the-secret" not in str(info.value)
        with pytest.raises(AccessDeniedError):
            await origin.write("obj", b"x")
        with pytest.raises(AccessDeniedError):
            await origin.exists("obj")
        with pytest.raises(AccessDeniedError):
            await origin.list("")
    finally:
        await origin.aclose()


async def test_credentials_from_the_shared_credentials_file(
    moto_s3_auth: AuthMotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's chain reads ~/.aws/credentials profiles (obstore alone would not)."""
    import botocore.session

    creds = moto_s3_auth.credentials
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(
        f"[lazyfs-test]\naws_access_key_id = {creds.access_key_id}\naws_secret_access_key = {creds.secret_access_key}\n"
    )
    # Environment credentials would win over the file: make sure there are none.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    core = botocore.session.Session(profile="lazyfs-test")
    core.set_config_variable("credentials_file", str(credentials_file))
    core.set_config_variable("config_file", str(tmp_path / "no-config"))
    import boto3

    session = boto3.Session(botocore_session=core)
    origin = S3Origin(moto_s3_auth.bucket, "from-file", moto_s3_auth.server.config(), session=session)
    try:
        await origin.write("obj", b"signed with the file's key")
        assert await origin.read("obj") == b"signed with the file's key"
    finally:
        await origin.aclose()


async def test_range_past_end_answered_with_200_is_empty(raw_http: RawHTTPFactory) -> None:
    """Some S3-compatible servers answer 200 + empty body instead of 416; obstore refuses that."""
    headers = {"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT", "ETag": '"e"'}
    server = await raw_http(lambda req: http_response(200, b"", headers))
    config = OriginConfig(s3_endpoint=server.url, s3_region="us-east-1")
    origin = S3Origin("bucket", "", config, credentials=S3Credentials("k", "s"))
    try:
        assert await origin.read("empty", 0, 10) == b""
        assert await origin.read("empty", 5, 10) == b""
    finally:
        await origin.aclose()
    assert [r.method for r in server.requests] == ["GET", "HEAD", "GET", "HEAD"]
