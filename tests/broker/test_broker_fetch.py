"""``aldaas fetch-backup`` against moto's S3 server on loopback (real boto3 requests)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from aldaas.broker._cli import main

pytestmark = pytest.mark.slow

SECRET = "fetch-s3cr3t-never-shown"
BODY = os.urandom(700_000)
BUCKET = "broker-fetch-test"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )
    # moto keeps one in-memory S3 per process, shared by every server: a bucket of our own,
    # removed afterwards, keeps other tests' buckets as they expect them.
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="nightly/db.sql.gz", Body=BODY)
    client.put_object(Bucket=BUCKET, Key="nightly/db.sql.gz.old", Body=b"old")
    try:
        yield url
    finally:
        for key in ("nightly/db.sql.gz", "nightly/db.sql.gz.old"):
            client.delete_object(Bucket=BUCKET, Key=key)
        client.delete_bucket(Bucket=BUCKET)
        server.stop()


def _args(endpoint: str, key: str, to: pathlib.Path) -> list[str]:
    return [
        "fetch-backup", "--key", key, "--to", str(to),
        "--set", f"s3.bucket={BUCKET}", "--set", f"s3.endpoint_url={endpoint}",
        "--set", "s3.region=us-east-1", "--set", "s3.addressing_style=path",
        "--set", "s3.access_key_id=test", "--set", f"s3.secret_access_key={SECRET}",
    ]  # fmt: skip


def test_if_the_key_exists_then_the_file_arrives_whole_and_progress_ends_at_the_total(
    endpoint: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """If the object exists, then PATH holds its bytes, no .part is left, the last line is done."""
    to = tmp_path / "backup.sql.gz"
    assert main(_args(endpoint, "nightly/db.sql.gz", to)) == 0
    assert to.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sql.gz"]
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"progress {len(BODY)} {len(BODY)}"
    assert all(line.startswith("progress ") for line in out)


def test_if_the_key_is_missing_then_one_sentence_names_it_without_secrets(
    endpoint: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """If the key does not exist, then exit 1 with one sentence naming it, nothing on stdout."""
    to = tmp_path / "backup.sql.gz"
    assert main(_args(endpoint, "nightly/nope.sql.gz", to)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    # (moto's in-process server also logs its requests to stderr; only our line matters)
    errors = [line for line in captured.err.splitlines() if line.startswith("aldaas:")]
    assert errors == [
        f"aldaas: error: The backup 'nightly/nope.sql.gz' is not in bucket '{BUCKET}'; "
        "check the key and s3.bucket."
    ]
    assert SECRET not in captured.err
    assert list(tmp_path.iterdir()) == []
