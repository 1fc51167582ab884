"""The chart and the broker agree: what the chart renders is what `aldaas serve` loads.

For every value set the chart tests render, the ConfigMap's config.yaml and the
Deployment's environment are fed to the broker's own loader
(broker._config.load_settings), exactly as `aldaas serve --config` in the pod
would, and the settings it builds must carry what the chart was given.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import helm_python
import pytest
import yaml
from test_chart_render import VALUE_SETS

from aldaas import pool
from aldaas.broker._broker import make_pool
from aldaas.broker._config import describe_settings, load_settings
from aldaas.broker._settings import Settings

# As tests/chart/conftest.py renders: `helm install demo chart/ -n aldaas`.
CHART_DIR = pathlib.Path(__file__).resolve().parents[2] / "chart"
RELEASE = "demo"
NAMESPACE = "aldaas"

Render = Callable[[dict[str, Any] | None], Any]

POD_NAME = "demo-aldaas-5d8c7b9f4-x2k7q"

# Everything the chart can turn on at once: tokens and S3 keys from values
# (so from the chart's Secret), AWS S3 itself (no endpoint) in a region,
# other classes and sizes, several replicas and extra environment.
FULL_FEATURED: dict[str, Any] = {
    "replicas": 3,
    "domain": "db.example.test",
    "tunnel": {"port": 8443, "token": "instance-token-from-values"},
    "admin": {"port": 9191, "token": "admin-token-from-values"},
    "s3": {
        "accesskey": "AKIAFULLFEATURED",
        "secretkey": "full-featured-secret",
        "host": "",
        "bucket": "prod-backups",
        "prefix": "pg/appdb",
        "suffix": ".dump",
        "region": "eu-central-1",
        "connectTimeout": 2.5,
        "readTimeout": 12,
        "maxAttempts": 5,
    },
    "rook": {"storageClassName": "gp3-csi", "volumeSnapshotClassName": "ebs-snap"},
    "application": {"image": "postgres", "tag": "17", "storage": "50Gi"},
    "pool": {"size": 8, "maxProvisioning": 4},
    "lease": {"ttl": 900, "maxTtl": 7200, "maxLifetime": 172800, "maxActive": 12},
    "snapshots": {"keep": 3},
    "extraEnv": [{"name": "ALDAAS_LOG_LEVEL", "value": "debug"}],
    "metrics": {"serviceMonitor": {"enabled": True}, "dashboard": {"enabled": True}},
}

CONTRACT_SETS: dict[str, dict[str, Any] | None] = {**VALUE_SETS, "full-featured": FULL_FEATURED}

BROKER_ENV_NAMES = frozenset(info.env for info in describe_settings(Settings))


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Helm's merge of a values file over values.yaml (maps merge, null removes a key)."""
    out = copy.deepcopy(dict(base))
    for key, value in (extra or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _values(values: dict[str, Any] | None) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    return _merged(defaults, values)


def _placeholder(entry: Mapping[str, Any]) -> str:
    """What the kubelet would put in one env entry; Secret values become a readable placeholder."""
    if "value" in entry:
        return str(entry["value"])
    source = entry["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return f"secret:{ref['name']}/{ref['key']}"
    if source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
        return POD_NAME
    raise AssertionError(f"the broker's env entry {entry['name']} has an unexpected source")


def _pod_env(rendered: Any) -> dict[str, str]:
    return {e["name"]: _placeholder(e) for e in rendered.container()["env"]}


def load_broker_settings(rendered: Any, tmp_path: pathlib.Path) -> Settings:
    """The settings `aldaas serve` builds from the rendered ConfigMap and the pod's environment."""
    config = tmp_path / "config.yaml"
    (data,) = [
        m["data"]["config.yaml"]
        for m in rendered.manifests
        if m["kind"] == "ConfigMap" and "config.yaml" in m.get("data", {})
    ]
    config.write_text(data, encoding="utf-8")
    return load_settings(Settings, path=config, environ=_pod_env(rendered))


@pytest.mark.parametrize("values", CONTRACT_SETS.values(), ids=CONTRACT_SETS.keys())
def test_if_the_chart_renders_then_the_broker_loads_what_it_was_given(
    render: Render, tmp_path: pathlib.Path, values: dict[str, Any] | None
) -> None:
    """If a value set is installed, then the broker's loader accepts the config and keeps the values."""
    rendered = render(values)
    settings = load_broker_settings(rendered, tmp_path)
    given = _values(values)
    kube = settings.kubernetes
    assert settings.provider == "kubernetes"
    assert kube.namespace == NAMESPACE
    assert kube.instance == f"{RELEASE}-aldaas"
    assert kube.identity == POD_NAME
    assert kube.leader_election.lease_name == f"{RELEASE}-aldaas-leader"
    assert kube.storage_class == given["rook"]["storageClassName"]
    assert kube.snapshot_class == given["rook"]["volumeSnapshotClassName"]
    assert kube.storage_size == str(given["application"]["storage"])
    app = given["application"]
    assert kube.application.image == f"{app['image']}:{app['tag']}"
    assert settings.pool.size == given["pool"]["size"]
    assert settings.pool.max_provisioning == given["pool"]["maxProvisioning"]
    assert settings.lease.ttl == given["lease"]["ttl"]
    assert settings.lease.max_ttl == given["lease"]["maxTtl"]
    assert settings.lease.max_lifetime == given["lease"]["maxLifetime"]
    assert settings.lease.max_active == given["lease"]["maxActive"]
    assert settings.snapshots.keep == given["snapshots"]["keep"]
    assert settings.source.kind == "s3"
    assert settings.s3.bucket == given["s3"]["bucket"]
    assert settings.s3.prefix == given["s3"]["prefix"]
    assert settings.s3.suffix == given["s3"]["suffix"]
    assert settings.s3.region == (given["s3"]["region"] or None)
    assert settings.s3.connect_timeout == given["s3"]["connectTimeout"]
    assert settings.s3.read_timeout == given["s3"]["readTimeout"]
    assert settings.s3.max_attempts == given["s3"]["maxAttempts"]
    assert settings.gateway.host == "0.0.0.0"
    assert settings.gateway.port == given["tunnel"]["port"]
    assert settings.admin.port == given["admin"]["port"]
    # The pool's own tree assembles from the loaded sections.
    assert settings.pool_settings().s3 == settings.s3


@pytest.mark.parametrize("values", CONTRACT_SETS.values(), ids=CONTRACT_SETS.keys())
def test_if_the_broker_pod_starts_then_its_tokens_come_from_the_secret(
    render: Render, tmp_path: pathlib.Path, values: dict[str, Any] | None
) -> None:
    """If the pod's env is applied, then the instance and admin tokens are the Secret's keys."""
    rendered = render(values)
    settings = load_broker_settings(rendered, tmp_path)
    secret = (values or {}).get("existingSecret") or f"{RELEASE}-aldaas"
    assert settings.gateway.instance_token == f"secret:{secret}/token"
    assert settings.admin.token == f"secret:{secret}/admin-token"
    s3_secret = _values(values)["s3"]["existingSecret"] or (
        f"{RELEASE}-aldaas" if _values(values)["s3"]["accesskey"] else None
    )
    env = _pod_env(rendered)
    if s3_secret is None:
        assert "AWS_ACCESS_KEY_ID" not in env
    else:
        assert env["AWS_ACCESS_KEY_ID"] == f"secret:{s3_secret}/accesskey"
        assert env["AWS_SECRET_ACCESS_KEY"] == f"secret:{s3_secret}/secretkey"
    assert settings.kubernetes.s3_credentials_secret == s3_secret
    # The restore Job's download container gets the same keys under the names boto3 reads.
    assert settings.kubernetes.s3_credentials_env == {
        "AWS_ACCESS_KEY_ID": "accesskey",
        "AWS_SECRET_ACCESS_KEY": "secretkey",
    }


@pytest.mark.parametrize("values", CONTRACT_SETS.values(), ids=CONTRACT_SETS.keys())
def test_if_the_deployment_sets_an_aldaas_variable_then_the_broker_reads_it(
    render: Render, values: dict[str, Any] | None
) -> None:
    """If the Deployment sets an ALDAAS_* variable, then it is one of the broker's settings."""
    names = {name for name in _pod_env(render(values)) if name.startswith("ALDAAS_")}
    assert names
    assert names <= BROKER_ENV_NAMES, sorted(names - BROKER_ENV_NAMES)


@pytest.mark.parametrize("values", CONTRACT_SETS.values(), ids=CONTRACT_SETS.keys())
def test_if_the_restore_job_downloads_then_fetch_backup_sees_the_brokers_bucket(
    render: Render, tmp_path: pathlib.Path, values: dict[str, Any] | None
) -> None:
    """If `aldaas fetch-backup` runs with only kubernetes.restore.fetch_env, then it finds the bucket."""
    settings = load_broker_settings(render(values), tmp_path)
    fetch_env = settings.kubernetes.restore.fetch_env
    assert set(fetch_env) <= BROKER_ENV_NAMES, sorted(set(fetch_env) - BROKER_ENV_NAMES)
    fetched = load_settings(Settings, environ=fetch_env).s3
    assert (fetched.bucket, fetched.endpoint_url, fetched.region) == (
        settings.s3.bucket,
        settings.s3.endpoint_url,
        settings.s3.region,
    )
    # ... and gives up on a silent S3 as soon as the broker would.
    assert (fetched.connect_timeout, fetched.read_timeout, fetched.max_attempts) == (
        settings.s3.connect_timeout,
        settings.s3.read_timeout,
        settings.s3.max_attempts,
    )


@pytest.mark.slow
async def test_if_the_broker_starts_from_the_chart_then_it_builds_the_kubernetes_pool(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If `aldaas serve` wires up what the chart rendered, then it gets a pool on the provider."""
    # A kubeconfig for an address nothing listens on: building makes no API call.
    kubeconfig = tmp_path / "kubeconfig"
    cluster = {"server": "https://127.0.0.1:9"}
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": "test", "user": {"token": "placeholder"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        ),
        encoding="utf-8",
    )
    for name, values in CONTRACT_SETS.items():
        rendered = render(values)
        config = tmp_path / f"{name}.yaml"
        data = rendered.get("ConfigMap", f"{RELEASE}-aldaas")["data"]["config.yaml"]
        config.write_text(data, encoding="utf-8")
        environ = {**_pod_env(rendered), "ALDAAS_KUBERNETES_KUBECONFIG": str(kubeconfig)}
        settings = load_settings(Settings, path=config, environ=environ)
        the_pool, provider = make_pool(settings)
        try:
            assert isinstance(provider, pool.KubernetesProvider), name
            assert isinstance(the_pool, pool.Pool), name
        finally:
            await provider.aclose()


def test_if_extra_env_names_a_setting_then_it_overrides_the_config(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If extraEnv sets ALDAAS_LOG_LEVEL, then the broker logs at that level."""
    assert load_broker_settings(render(FULL_FEATURED), tmp_path).log.level == "debug"


def test_if_the_deployment_named_an_unknown_variable_then_the_contract_catches_it(
    render: Render,
) -> None:
    """If extraEnv carried a name the broker does not read, then the contract check fails."""
    rendered = render({"extraEnv": [{"name": "ALDAAS_POD_NAME", "value": "x"}]})
    names = {name for name in _pod_env(rendered) if name.startswith("ALDAAS_")}
    assert names - BROKER_ENV_NAMES == {"ALDAAS_POD_NAME"}


def test_if_image_pull_secrets_are_set_then_the_providers_pods_get_them(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If imagePullSecrets is set, then the broker's kubernetes.pods.image_pull_secrets names them."""
    values = {"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}]}
    rendered = render(values)
    assert (
        rendered.get("Deployment")["spec"]["template"]["spec"]["imagePullSecrets"]
        == (values["imagePullSecrets"])
    )
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.kubernetes.pods.image_pull_secrets == ("regcred", "mirror")
    assert load_broker_settings(render(None), tmp_path).kubernetes.pods.image_pull_secrets == ()


def test_if_defaults_are_installed_then_the_broker_loads_each_steps_env_secret(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If installed as is, then credentials are per-clone and no step reads a password from the
    chart; with static credentials, the pods read them from the chart's Secrets."""
    kube = load_broker_settings(render(None), tmp_path).kubernetes
    assert kube.application.logins == "per-clone"
    assert (kube.application.user, kube.application.database) == ("aldaas", "my_db_name")
    assert kube.application.password is None
    steps = (kube.application, kube.restore, kube.check)
    assert [step.env_from_secret for step in steps] == [None, None, None]
    static = {
        "application": {
            "logins": "static",
            "env": [{"name": "POSTGRES_PASSWORD", "value": "pw"}],
        },
        "restore": {"env": [{"name": "PGPASSWORD", "value": "pw"}]},
    }
    kube = load_broker_settings(render(static), tmp_path).kubernetes
    assert kube.application.env_from_secret == f"{RELEASE}-aldaas-application"
    assert kube.restore.env_from_secret == f"{RELEASE}-aldaas-restore"
    assert kube.check.env_from_secret == f"{RELEASE}-aldaas-restore"
    assert kube.application.password == f"secret:{RELEASE}-aldaas-application/POSTGRES_PASSWORD"
    assert "POSTGRES_PASSWORD" not in kube.application.env


@pytest.mark.parametrize(
    ("s3", "secret", "key"),
    [
        (
            {"accesskey": "ASIAEXAMPLE", "secretkey": "sk", "sessionToken": "st-789"},
            f"{RELEASE}-aldaas",
            "sessiontoken",
        ),
        ({"existingSecret": "sts-creds", "sessionTokenKey": "token"}, "sts-creds", "token"),
    ],
    ids=["values", "existing-secret"],
)
def test_if_a_session_token_is_given_then_broker_and_download_use_it_from_the_secret(
    render: Render,
    validate_manifest: Callable[[dict[str, Any]], None],
    tmp_path: pathlib.Path,
    s3: dict[str, str],
    secret: str,
    key: str,
) -> None:
    """If s3.sessionToken (or sessionTokenKey) is set, then s3.session_token reads the S3 Secret."""
    rendered = render({"s3": s3})
    for manifest in rendered.manifests:
        validate_manifest(manifest)
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.s3.session_token == f"secret:{secret}/{key}"
    assert settings.s3.access_key_id == f"secret:{secret}/accesskey"
    assert settings.s3.secret_access_key == f"secret:{secret}/secretkey"
    assert settings.kubernetes.s3_credentials_env["AWS_SESSION_TOKEN"] == key
    assert "st-789" not in yaml.safe_dump(rendered.get("ConfigMap", f"{RELEASE}-aldaas"))
    # The provider's download container gets it under the name boto3 reads.
    assert settings.kubernetes.s3_credentials_secret == secret


def test_if_no_session_token_is_given_then_the_broker_gets_none(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If only keys are set, then neither the broker nor the download expects a session token."""
    rendered = render({"s3": {"accesskey": "AKIAEXAMPLE", "secretkey": "sk"}})
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.s3.session_token is None
    assert "AWS_SESSION_TOKEN" not in settings.kubernetes.s3_credentials_env


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        ({"sessionToken": "st"}, "s3.sessionToken is set without s3.accesskey"),
        ({"sessionTokenKey": "token"}, r"s3.sessionTokenKey \(token\) is set without"),
    ],
)
def test_if_a_session_token_lacks_its_keys_then_install_fails(
    render: Render, s3: dict[str, str], message: str
) -> None:
    """If a session token comes without keys or Secret, then install names what is missing."""
    with pytest.raises(helm_python.HelmError, match=message):
        render({"s3": s3})
