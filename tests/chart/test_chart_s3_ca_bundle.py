"""s3.caBundle: one ConfigMap or Secret key with a private CA's PEM bundle reaches the broker
(s3.ca_bundle, mounted) and the restore Job's download container the provider builds."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import helm_python
import pytest
from k8s_built import built_objects, pod_specs
from k8s_schemas import restricted_violations
from test_chart_broker_contract import load_broker_settings

from aldaas.pool import CaBundleSettings

Render = Callable[[dict[str, Any] | None], Any]

HTTPS = {"host": "minio.backups.svc", "port": 9000, "insecure": False}
CA_FILE = "/etc/aldaas-s3-ca/ca-bundle.pem"


@pytest.mark.parametrize(
    ("ca_bundle", "source"),
    [
        (
            {"configMap": "company-ca", "key": "ca-bundle.crt"},
            {
                "configMap": {
                    "name": "company-ca",
                    "items": [{"key": "ca-bundle.crt", "path": "ca-bundle.pem"}],
                }
            },
        ),
        (
            {"secret": "minio-tls"},
            {
                "secret": {
                    "secretName": "minio-tls",
                    "items": [{"key": "ca.crt", "path": "ca-bundle.pem"}],
                }
            },
        ),
    ],
    ids=["config-map", "secret"],
)
def test_if_a_ca_bundle_is_named_then_broker_and_download_mount_it_and_trust_it(
    render: Render,
    validate_manifest: Callable[[dict[str, Any]], None],
    tmp_path: pathlib.Path,
    ca_bundle: dict[str, str],
    source: dict[str, Any],
) -> None:
    """If s3.caBundle names a ConfigMap or Secret key, then the broker's pod mounts it and loads
    it as s3.ca_bundle, and the restore Job built from the broker's settings mounts the same key
    at the same path for its download container."""
    rendered = render({"s3": {**HTTPS, "caBundle": ca_bundle}})
    for manifest in rendered.manifests:
        validate_manifest(manifest)
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert {"name": "s3-ca", **source} in pod["volumes"]
    mount = {"name": "s3-ca", "mountPath": "/etc/aldaas-s3-ca", "readOnly": True}
    assert mount in rendered.container()["volumeMounts"]
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.s3.ca_bundle == pathlib.Path(CA_FILE)
    assert settings.s3.endpoint_url == "https://minio.backups.svc:9000"
    assert settings.kubernetes.s3_ca_bundle == CaBundleSettings(
        config_map=ca_bundle.get("configMap"),
        secret=ca_bundle.get("secret"),
        key=ca_bundle.get("key", "ca.crt"),
    )
    specs = pod_specs(built_objects(settings.kubernetes))
    restores = [spec for name, spec in specs.items() if name.endswith("-restore")]
    assert len(restores) == 2  # a configured command's and the built-in restore's
    for restore in restores:
        assert {"name": "s3-ca", **source} in restore["volumes"]
        (fetch,) = restore["initContainers"]
        assert mount in fetch["volumeMounts"]
        env = {e["name"]: e.get("value") for e in fetch["env"]}
        assert (env["ALDAAS_S3_CA_BUNDLE"], env["AWS_CA_BUNDLE"]) == (CA_FILE, CA_FILE)
        (container,) = restore["containers"]
        assert mount not in container["volumeMounts"]  # the bundle is the download's alone
    for name, spec in [*specs.items(), ("broker", pod)]:
        assert restricted_violations(spec) == [], name


def test_if_no_ca_bundle_is_named_then_nothing_is_mounted_and_the_public_cas_apply(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If s3.caBundle is left empty, then neither the broker nor the download mounts a bundle."""
    rendered = render(None)
    assert [
        v["name"] for v in rendered.get("Deployment")["spec"]["template"]["spec"]["volumes"]
    ] == [
        "config",
        "tmp",
    ]
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.s3.ca_bundle is None
    assert settings.kubernetes.s3_ca_bundle == CaBundleSettings()
    specs = pod_specs(built_objects(settings.kubernetes))
    for restore in [s for n, s in specs.items() if n.endswith("-restore")]:
        (fetch,) = restore["initContainers"]
        assert not {"ALDAAS_S3_CA_BUNDLE", "AWS_CA_BUNDLE"} & {e["name"] for e in fetch["env"]}


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        (
            {**HTTPS, "caBundle": {"configMap": "company-ca", "secret": "minio-tls"}},
            "s3.caBundle.configMap (company-ca) and s3.caBundle.secret (minio-tls) are both set: "
            "name the CA bundle's ConfigMap or its Secret, not both.",
        ),
        (
            {"host": "minio.server", "insecure": True, "caBundle": {"secret": "minio-tls"}},
            "s3.caBundle is set but s3.insecure is true, so the broker speaks plain HTTP to "
            "minio.server and never uses the CA: set s3.insecure to false for HTTPS, or unset "
            "s3.caBundle.",
        ),
        ({"caBundle": {"secret": "minio-tls", "key": "ca/crt"}}, "at '/s3/caBundle/key'"),
        ({"caBundle": {"configMap": "Company CA"}}, "at '/s3/caBundle/configMap'"),
    ],
    ids=["both", "plain-http", "bad-key", "bad-name"],
)
def test_if_the_ca_bundle_values_are_wrong_then_install_fails_naming_them(
    render: Render, s3: dict[str, Any], message: str
) -> None:
    """If s3.caBundle names two sources, is useless over plain HTTP, or has a bad name or key,
    then the install fails saying which value and what to do."""
    with pytest.raises(helm_python.HelmError) as caught:
        render({"s3": s3})
    assert message in str(caught.value)
