"""kubernetes.s3_ca_bundle: the restore Job's download container trusts a private CA for S3.

The Job is made on the fake API (which refuses, as strict field validation does, any
object the schemas refuse), then its download container is run
the way a kubelet would: its volumes become folders (the Secret's items written as files),
its mount paths are mapped onto them, its env is resolved from the Secrets, and its command
(the real ``aldaas fetch-backup``) runs against moto's S3 over HTTPS with a throwaway CA.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trustme
from k8s_fake_api import FakeKubernetes
from k8s_schemas import restricted_violations
from kubernetes import client
from s3_https import BODY, BUCKET, KEY

from aldaas.pool import (
    Backup,
    CaBundleSettings,
    Command,
    KubernetesProvider,
    ProviderError,
    RestoreSettings,
)
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

pytestmark = pytest.mark.slow

Obj = dict[str, Any]


def _secrets(ca: trustme.CA) -> dict[str, dict[str, str]]:
    """The namespace's Secrets: the S3 keys under the original chart's names, and the CA."""
    return {
        "backups-s3": {"accesskey": "test", "secretkey": "test-secret"},
        "minio-tls": {"ca.crt": ca.cert_pem.bytes().decode()},
    }


def _with_download(settings: KubernetesSettings, endpoint: str, ca: CaBundleSettings) -> Any:
    return attrs.evolve(
        settings,
        s3_credentials_secret="backups-s3",
        s3_credentials_env={"AWS_ACCESS_KEY_ID": "accesskey", "AWS_SECRET_ACCESS_KEY": "secretkey"},
        s3_ca_bundle=ca,
        restore=RestoreSettings(
            fetch_env={
                "ALDAAS_S3_BUCKET": BUCKET,
                "ALDAAS_S3_ENDPOINT_URL": endpoint,
                "ALDAAS_S3_REGION": "us-east-1",
                "ALDAAS_S3_ADDRESSING_STYLE": "path",
                "ALDAAS_S3_MAX_ATTEMPTS": "1",
            }
        ),
    )


async def _created_restore_job(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> Obj:
    provider = KubernetesProvider(settings, api_client)
    await provider.create_volume("v", {})
    backup = Backup(key=KEY, etag="e", size=len(BODY), modified=0.0)
    await provider.restore("v", backup, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    (job,) = [obj for plural, obj in fake.created if plural == "jobs"]
    return job


async def _run_download(
    job: Obj, secrets: dict[str, dict[str, str]], root: pathlib.Path
) -> tuple[int, str, pathlib.Path]:
    """Run the Job's download container as a kubelet would, with its volumes under ``root``;
    returns its exit code, its stderr and the local path of the file it was told to write."""
    spec = job["spec"]["template"]["spec"]
    folders: dict[str, pathlib.Path] = {}
    for volume in spec["volumes"]:
        folder = folders[volume["name"]] = root / volume["name"]
        folder.mkdir()
        projected = volume.get("secret") or volume.get("configMap")
        if projected is not None:
            data = secrets[projected.get("secretName") or projected["name"]]
            for item in projected["items"]:
                (folder / item["path"]).write_text(data[item["key"]])
    (fetch,) = spec["initContainers"]
    mounts = {m["mountPath"]: folders[m["name"]] for m in fetch["volumeMounts"]}

    def local(value: str) -> str:
        for path, folder in mounts.items():
            if value == path or value.startswith(path + "/"):
                return str(folder) + value[len(path) :]
        return value

    env = {"PATH": os.environ["PATH"]}
    for entry in fetch["env"]:
        if "value" in entry:
            env[entry["name"]] = local(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    argv = [local(arg) for arg in fetch["command"]]
    assert argv[:2] == ["aldaas", "fetch-backup"]
    done = await trio.run_process(
        [sys.executable, "-m", "aldaas.broker", *argv[1:]],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return done.returncode, done.stderr.decode(), pathlib.Path(argv[argv.index("--to") + 1])


Download = Callable[[CaBundleSettings], Awaitable[tuple[Obj, int, str, pathlib.Path]]]


@pytest.fixture
def download(
    settings: KubernetesSettings,
    fake: FakeKubernetes,
    api_client: client.ApiClient,
    source: object,
    ca: trustme.CA,
    https_endpoint: str,
    tmp_path: pathlib.Path,
) -> Download:
    """Make the restore Job with ``s3_ca_bundle`` on the fake API and run its download container:
    (the Job, the exit code, stderr, the local path of the file it was told to write)."""

    async def run(ca_bundle: CaBundleSettings) -> tuple[Obj, int, str, pathlib.Path]:
        with_download = _with_download(settings, https_endpoint, ca_bundle)
        job = await _created_restore_job(with_download, fake, api_client, source)
        return (job, *await _run_download(job, _secrets(ca), tmp_path))

    return run


@pytest.mark.parametrize(
    "ca_bundle",
    [CaBundleSettings(secret="minio-tls"), CaBundleSettings(config_map="minio-tls")],
    ids=["secret", "config-map"],
)
async def test_if_a_ca_bundle_is_set_then_the_download_container_fetches_over_https(
    download: Download, ca_bundle: CaBundleSettings
) -> None:
    """If s3_ca_bundle names the private CA's Secret or ConfigMap, then the restore Job the API
    accepts mounts it into the download container, which fetches the backup over HTTPS."""
    job, code, stderr, fetched = await download(ca_bundle)
    spec = job["spec"]["template"]["spec"]
    assert restricted_violations(spec) == []
    (fetch,) = spec["initContainers"]
    mount = {"name": "s3-ca", "mountPath": "/etc/aldaas-s3-ca", "readOnly": True}
    assert mount in fetch["volumeMounts"]
    (restore,) = spec["containers"]
    assert [m["name"] for m in restore["volumeMounts"]] == ["backup"]
    assert (code, stderr) == (0, "")
    assert fetched.read_bytes() == BODY


async def test_if_no_ca_bundle_is_set_then_the_download_reports_a_certificate_error(
    download: Download,
) -> None:
    """If the same download runs without s3_ca_bundle, then it fails with a certificate error
    naming the host: the test above passes because of the mounted bundle."""
    job, code, stderr, fetched = await download(CaBundleSettings())
    assert [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]] == ["backup"]
    assert code == 1
    assert "certificate" in stderr
    assert "localhost" in stderr
    assert not fetched.exists()


@pytest.mark.parametrize(
    ("ca_bundle", "message"),
    [
        (
            CaBundleSettings(config_map="company-ca", secret="minio-tls"),
            "kubernetes settings s3_ca_bundle.config_map ('company-ca') and s3_ca_bundle.secret "
            "('minio-tls') are both set; name the CA bundle's ConfigMap or its Secret, not both.",
        ),
        (
            CaBundleSettings(secret="minio-tls", key="ca/crt"),
            "kubernetes setting s3_ca_bundle.key is 'ca/crt' (6 characters), which is not valid",
        ),
        (
            CaBundleSettings(config_map="Company_CA"),
            "kubernetes setting s3_ca_bundle.config_map is 'Company_CA' (10 characters)",
        ),
    ],
    ids=["both", "bad-key", "bad-name"],
)
def test_if_the_ca_bundle_setting_is_wrong_then_the_provider_refuses_to_start(
    settings: KubernetesSettings, ca_bundle: CaBundleSettings, message: str
) -> None:
    """If s3_ca_bundle names two sources or an invalid name or key, then building the provider
    fails in one sentence naming the setting and its value."""
    with pytest.raises(ProviderError) as caught:
        KubernetesProvider(attrs.evolve(settings, s3_ca_bundle=ca_bundle), api_client=None)
    assert str(caught.value).startswith(message)
