"""The S3 source as operators run it: settings checked at start, private CAs over real HTTPS
(moto's S3 behind werkzeug with a throwaway trustme CA), temporary credentials, errors that name
the host actually tried, and "newest" by the key's own timestamp.
"""

from __future__ import annotations

import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import structlog
import trustme
from moto.server import ThreadedMotoServer

from aldaas.broker._config import ConfigError, load_settings
from aldaas.broker._settings import Settings
from aldaas.pool import ProviderError, S3Settings, S3Source, TemporaryProviderError

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-shown"
TOKEN = "t0ken-never-shown"


@pytest.fixture(scope="module")
def http_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )


def _settings(endpoint: str, **overrides: Any) -> S3Settings:
    values: dict[str, Any] = {
        "bucket": "tls",
        "prefix": "nightly/",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": "test",
        "secret_access_key": SECRET,
        "addressing_style": "path",
        "max_attempts": 1,
    }
    values.update(overrides)
    return S3Settings(**values)


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_if_s3_ca_bundle_names_the_private_ca_then_https_listing_works(
    https_endpoint: str, ca_file: pathlib.Path
) -> None:
    """If s3.ca_bundle holds the CA that signed the server's certificate, then listing works."""
    source = S3Source(_settings(https_endpoint, ca_bundle=ca_file))
    assert [b.key for b in await source.list_backups()] == ["nightly/1717200000.sql.gz"]


async def test_if_aws_ca_bundle_names_the_private_ca_then_https_listing_works(
    https_endpoint: str, ca_file: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If only AWS_CA_BUNDLE names the CA (verify_tls left on), then botocore honours it."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_file))
    source = S3Source(_settings(https_endpoint))
    assert len(await source.list_backups()) == 1


async def test_if_the_ca_is_wrong_then_the_error_is_a_certificate_error_naming_the_host(
    https_endpoint: str, tmp_path: pathlib.Path
) -> None:
    """If the bundle holds another CA, then the error says the certificate of the host was not
    accepted and points at s3.ca_bundle, not at "the network".
    """
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    source = S3Source(_settings(https_endpoint, ca_bundle=other))
    with pytest.raises(TemporaryProviderError) as caught:
        await source.list_backups()
    message = str(caught.value)
    assert message.startswith(f"the TLS certificate of {https_endpoint} (path addressing of ")
    assert "certificate verify failed" in message
    assert "set s3.ca_bundle (or AWS_CA_BUNDLE)" in message
    assert "network" not in message


async def test_if_tls_verification_is_off_then_one_structured_event_and_no_urllib3_warning(
    https_endpoint: str,
) -> None:
    """If verify_tls is false, then the source logs source.tls_unverified once and requests
    raise no InsecureRequestWarning (which pytest turns into errors here).
    """
    with structlog.testing.capture_logs() as logs:
        source = S3Source(_settings(https_endpoint, verify_tls=False))
        for _ in range(3):
            assert len(await source.list_backups()) == 1
    assert [e["event"] for e in logs] == ["source.tls_unverified"]
    assert logs[0]["log_level"] == "warning"


def test_if_the_ca_bundle_is_missing_then_the_source_refuses_to_start(
    tmp_path: pathlib.Path,
) -> None:
    """If s3.ca_bundle names no file, then the source fails at start naming the path."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(ProviderError, match=r"s3.ca_bundle '.*nope.pem' is not a readable file"):
        S3Source(_settings("https://localhost:1", ca_bundle=missing))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("endpoint_url", "127.0.0.1:18333", "needs a scheme and a host (http:// or https://"),
        ("endpoint_url", "ftp://minio:21", "needs a scheme and a host"),
        ("endpoint_url", "http://:9000", "needs a scheme and a host"),
        ("endpoint_url", "http://minio:99999", "is not a URL; expected scheme://host[:port]"),
        ("endpoint_url", "http://minio:9000/?x=1", "has a query or fragment"),
        ("region", "US East 1", "is not a region name; expected lowercase letters"),
        ("addressing_style", "vhost", "must be one of 'auto', 'path', 'virtual', got 'vhost'"),
        ("prefix", "/backups/", "starts with '/', which S3 keys do not; write 'backups/'"),
        ("prefix", "s3://backup/x/", "is a URL; give the bucket in s3.bucket"),
        ("bucket", "s3://backup", "is not a bucket name"),
    ],
)
def test_if_an_s3_setting_is_malformed_then_loading_fails_naming_it(
    key: str, value: str, expected: str
) -> None:
    """If an S3 setting is malformed, then the settings do not load and the one sentence names
    the setting, the value seen and what is expected.
    """
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings, environ={f"ALDAAS_S3_{key.upper()}": value})
    message = str(caught.value)
    assert expected in message
    assert f"s3.{key}" in message
    assert "\n" not in message


def test_if_the_endpoint_url_has_a_password_then_the_error_hides_it() -> None:
    """If a malformed endpoint URL carries user:password@, then the error does not show it."""
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings, environ={"ALDAAS_S3_ENDPOINT_URL": f"ftp://u:{SECRET}@minio"})
    assert SECRET not in str(caught.value)


def test_if_virtual_addressing_meets_an_ip_endpoint_then_the_source_refuses_to_start() -> None:
    """If virtual-host addressing is asked of an IP endpoint, then the source says to use path."""
    with pytest.raises(ProviderError, match=r"is an IP address.*set s3\.addressing_style: path"):
        S3Source(_settings("http://127.0.0.1:9000", addressing_style="virtual"))


async def test_if_virtual_addressing_fails_then_the_error_names_the_host_tried() -> None:
    """If virtual-host addressing cannot reach ``bucket.host``, then the error names that host
    and the addressing style, not only the configured endpoint.
    """
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://localhost:{port}"
    source = S3Source(
        _settings(endpoint, bucket="backups", addressing_style="virtual", connect_timeout=2.0)
    )
    with pytest.raises(TemporaryProviderError) as caught:
        await source.list_backups()
    assert str(caught.value).startswith(
        f"cannot reach S3 at http://backups.localhost:{port} (virtual-host addressing "
        f"of s3.endpoint_url {endpoint}) while listing bucket 'backups'"
    )


async def test_if_a_session_token_is_set_then_it_is_sent_and_never_shown(
    http_endpoint: str,
) -> None:
    """If s3.session_token is set beside the keys, then requests carry it (moto's server echoes
    nothing, so the signed request is checked through botocore's own event hook) and no repr
    shows it.
    """
    client = _client(http_endpoint)
    client.create_bucket(Bucket="temp")
    settings = _settings(http_endpoint, bucket="temp", session_token=TOKEN)
    source = S3Source(settings)
    assert await source.list_backups() == []
    assert TOKEN not in repr(settings) + repr(source) + source.description
    sent: list[str] = []
    real = source._client  # the client the source built from its settings
    real.meta.events.register(
        "before-send.s3.*",
        lambda request, **_: sent.append(request.headers["X-Amz-Security-Token"]),
    )
    await source.list_backups()
    assert [t.decode() if isinstance(t, bytes) else t for t in sent] == [TOKEN]


def test_if_a_session_token_comes_without_keys_then_the_source_refuses_to_start() -> None:
    """If s3.session_token is set but the keys are not, then the source says to set all three."""
    with pytest.raises(ProviderError, match=r"s3\.session_token is set without s3\.access_key_id"):
        S3Source(
            _settings(
                "http://minio:9000", access_key_id=None, secret_access_key=None, session_token=TOKEN
            )
        )
