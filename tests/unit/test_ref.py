"""Reference parsing: ``name[:tag]`` and ``name@digest``, with OCI-style names and tags."""

from __future__ import annotations

import pytest

from lazyfs.errors import UsageError
from lazyfs.manifest import DEFAULT_TAG, Ref, parse_ref

HEX = "0123456789abcdef" * 4  # 64 lowercase hex digits


@pytest.mark.parametrize(
    ("text", "name", "tag"),
    [
        ("llama3", "llama3", "latest"),
        ("llama3:8b", "llama3", "8b"),
        ("org/model:v1.0", "org/model", "v1.0"),
        ("org/team/model:v1", "org/team/model", "v1"),
        ("a", "a", "latest"),
        ("a.b_c__d--e-f/g0:_x", "a.b_c__d--e-f/g0", "_x"),
        ("m:V1.0-rc_2", "m", "V1.0-rc_2"),  # tags may use uppercase, names may not
        ("m:" + "t" * 128, "m", "t" * 128),
        ("x" * 255, "x" * 255, "latest"),
        ("0:0", "0", "0"),
    ],
)
def test_tags(text: str, name: str, tag: str) -> None:
    ref = parse_ref(text)
    assert ref == Ref(name=name, tag=tag)
    assert ref.digest is None
    assert ref.key == f"refs/{name}/{tag}"
    assert str(ref) == f"{name}:{tag}"
    assert parse_ref(str(ref)) == ref
    assert parse_ref(text, allow_digest=False) == ref


def test_default_tag() -> None:
    assert DEFAULT_TAG == "latest"
    assert parse_ref("llama3").tag == DEFAULT_TAG
    assert parse_ref("org/model").tag == DEFAULT_TAG


@pytest.mark.parametrize("digest", [HEX, "blake3:" + HEX])
@pytest.mark.parametrize("name", ["llama3", "org/model"])
def test_digests(name: str, digest: str) -> None:
    ref = parse_ref(f"{name}@{digest}")
    assert ref == Ref(name=name, digest=HEX)  # the algorithm prefix is optional and dropped
    assert ref.tag is None
    assert str(ref) == f"{name}@{HEX}"
    assert parse_ref(str(ref)) == ref


def test_a_digest_ref_has_no_ref_key() -> None:
    with pytest.raises(AssertionError):
        _ = parse_ref(f"m@{HEX}").key


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        ":tag",
        "Llama3",
        "org/Model:v1",
        "LLAMA",
        "-llama",
        "llama-",
        ".llama",
        "llama.",
        "_llama",
        "a..b",
        "a___b",
        "a._b",
        "/llama",
        "llama/",
        "org//model",
        "llama 3",
        "lläma",
        "x" * 256,
        "llama3\n",
        "llama3\n:v1",
        " llama3",
    ],
)
def test_bad_names(text: str) -> None:
    with pytest.raises(UsageError, match=r"^bad reference .*: the name must be lowercase letters, digits and sep"):
        parse_ref(text)


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("llama3:", ""),
        ("llama3:.v1", ".v1"),
        ("llama3:-v1", "-v1"),
        ("llama3:v 1", "v 1"),
        ("llama3:v1+x", "v1+x"),
        ("llama3:" + "t" * 129, "t" * 129),
        ("llama3:v1\n", "v1\n"),
        ("llama3:v1:v2", None),  # the name then holds a ':'
    ],
)
def test_bad_tags(text: str, tag: str | None) -> None:
    if tag is None:
        with pytest.raises(UsageError, match="the name must be"):
            parse_ref(text)
        return
    with pytest.raises(UsageError, match=r"^bad reference .*: tag .* must match") as info:
        parse_ref(text)
    assert repr(tag) in str(info.value)


@pytest.mark.parametrize(
    "digest",
    [
        "",
        HEX[:63],
        HEX[:32],
        HEX + "0",
        HEX.upper(),
        HEX[:63] + "g",
        "sha256:" + HEX,
        "blake3:",
        "blake3:" + HEX[:63],
        "BLAKE3:" + HEX,
        HEX + "\n",
        "blake3:" + HEX + "\n",
        " " + HEX,
        HEX + "@" + HEX,
    ],
)
def test_bad_digests(digest: str) -> None:
    with pytest.raises(UsageError, match=r"^bad reference .*: the digest must be 64 lowercase hex digits$"):
        parse_ref(f"llama3@{digest}")


@pytest.mark.parametrize("text", [f"@{HEX}", f"Llama@{HEX}", f"llama3:v1@{HEX}", f"a//b@{HEX}"])
def test_bad_names_with_a_digest(text: str) -> None:
    with pytest.raises(UsageError, match="the name must be"):
        parse_ref(text)


@pytest.mark.parametrize("text", [f"llama3@{HEX}", f"llama3@blake3:{HEX}", "llama3@", "@"])
def test_digest_not_allowed(text: str) -> None:
    """Publishing (seed --name) targets a tag: a digest is not a place to write."""
    with pytest.raises(UsageError, match=r"^bad name .*: a digest cannot be published to; use NAME\[:TAG\]$"):
        parse_ref(text, allow_digest=False)


@pytest.mark.parametrize(
    "text",
    [
        "localhost:5000/llama3",
        "localhost:5000/llama3:v1",
        "registry.example.com:443/org/model:v1",
        "docker://registry/llama3:v1",
        "s3://bucket/llama3",
        "http://host:8080",
        "host:port:tag",
        "[::1]:5000/m",
    ],
)
def test_host_port_garbage(text: str) -> None:
    with pytest.raises(UsageError, match=r"^bad reference "):
        parse_ref(text)


def test_usage_error_is_einval() -> None:
    import errno

    with pytest.raises(UsageError) as info:
        parse_ref("BAD")
    assert info.value.errno == errno.EINVAL
