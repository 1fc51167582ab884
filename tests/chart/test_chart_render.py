"""The chart renders valid manifests that say what the broker needs, for several value sets."""

from __future__ import annotations

import base64
import pathlib
from collections.abc import Callable
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

# A values file written the way the original Argo-based chart wanted it: its
# obsolete keys (serviceAccountName, kubectl, jq, EventBus, tunnel.image/tag),
# empty keys that YAML reads as null, and S3 keys from an existing Secret.
ORIGINAL_STYLE: dict[str, Any] = yaml.safe_load(
    """
serviceAccountName: argo-workflow
kubectl: v1.28.2
jq: 1.7.1
EventBus:
  enabled: false
domain: db.example.test
tunnel:
  image: registry.example.test/aldaas-client
  tag: main
  port: 8080
  token: original-style-instance-token
  ingress:
    tlsSecretName: db-example-tls
    annotations:
rook:
  storageClassName: rbd-fast
  volumeSnapshotClassName: rbd-fast-snap
s3:
  existingSecret: backups-s3
  accesskey: ""
  secretkey: ""
  host: minio.backups.svc
  port: 9000
  bucket: nightly
  insecure: true
  prefix: logical/appdb
  suffix: .sql.gz
application:
  image: postgres
  tag: 16
  port: 5432
  storage: 20Gi
  mount: /var/lib/postgresql/data
  args:
  command:
  env:
    - name: POSTGRES_PASSWORD
      value: s3cr3t
    - name: POSTGRES_USER
      value: app
    - name: POSTGRES_DB
      value: appdb
  resources:
    requests: {cpu: 250m, memory: 2Gi}
    limits: {cpu: 2, memory: 2Gi}
restore:
  args:
   - gunzip -c /backup.sql.gz | psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER -d $POSTGRES_DB
  command: [sh, -c]
  env:
    - name: PGPASSWORD
      value: s3cr3t
    - name: POSTGRES_USER
      value: app
    - name: POSTGRES_DB
      value: appdb
  resources:
    requests: {cpu: 100m, memory: 512Mi}
check:
  args:
   - psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER -d $POSTGRES_DB -c 'select 1'
  command: [sh, -c]
"""
)

MONITORING: dict[str, Any] = {
    "domain": "aldaas.example.test",
    "tunnel": {"ingress": {"className": "nginx", "tlsSecretName": "aldaas-tls"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Databases"}},
    },
}

REPLICAS_2: dict[str, Any] = {"replicas": 2, "pool": {"size": 5, "maxProvisioning": 3}}

VALUE_SETS: dict[str, dict[str, Any] | None] = {
    "defaults": None,
    "original-style": ORIGINAL_STYLE,
    "monitoring": MONITORING,
    "replicas-2": REPLICAS_2,
}

Render = Callable[[dict[str, Any] | None], Any]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_if_rendered_with_any_value_set_then_every_manifest_validates_strictly(
    render: Render, validate_manifest: Callable[[dict[str, Any]], None], values: Any
) -> None:
    """If the chart renders with a value set, then every manifest passes strict validation."""
    rendered = render(values)
    assert rendered.manifests
    for manifest in rendered.manifests:
        validate_manifest(manifest)


def test_if_defaults_are_rendered_then_exactly_the_base_objects_exist(render: Render) -> None:
    """If nothing is set, then the broker's base objects render and the optional ones do not
    (no step Secret either: per-clone credentials need no password in values)."""
    assert render(None).kinds() == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    ]


def test_if_monitoring_is_enabled_then_ingress_servicemonitor_and_dashboard_render(
    render: Render,
) -> None:
    """If domain, ServiceMonitor and dashboard are on, then their objects join the base ones."""
    rendered = render(MONITORING)
    assert rendered.kinds() == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Ingress",
        "NetworkPolicy",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


def test_if_defaults_are_rendered_then_the_broker_runs_locked_down(render: Render) -> None:
    """If installed as is, then the broker runs non-root, read-only, without capabilities."""
    rendered = render(None)
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = rendered.container()
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["volumeMounts"] == [
        {"name": "config", "mountPath": "/etc/aldaas", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def test_if_defaults_are_rendered_then_the_broker_serves_its_config_and_probes(
    render: Render,
) -> None:
    """If installed, then the broker serves the rendered config with probes on the admin port."""
    container = render(None).container()
    assert container["command"] == ["aldaas", "serve", "--config", "/etc/aldaas/config.yaml"]
    assert container["image"] == "ghcr.io/negashev/aldaas:0.1.0"
    assert container["ports"] == [
        {"name": "gateway", "containerPort": 8080, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_if_defaults_are_rendered_then_the_config_carries_every_setting(render: Render) -> None:
    """If nothing is set, then config.yaml holds the kubernetes provider and documented defaults."""
    config = render(None).broker_config()
    resources = {
        "requests": {"cpu": "100m", "memory": "1Gi"},
        "limits": {"cpu": "1000m", "memory": "1Gi"},
    }
    restore_env: dict[str, str] = {}
    assert config == {
        "provider": "kubernetes",
        "kubernetes": {
            "namespace": "aldaas",
            "instance": "demo-aldaas",
            "storage_class": "ceph-block",
            "snapshot_class": "ceph-block",
            "storage_size": "10Gi",
            "helper_image": "ghcr.io/negashev/aldaas:0.1.0",
            "s3_credentials_secret": None,
            "s3_credentials_env": {
                "AWS_ACCESS_KEY_ID": "accesskey",
                "AWS_SECRET_ACCESS_KEY": "secretkey",
            },
            "pods": {
                "image_pull_secrets": [],
                "security_context": {
                    "runAsNonRoot": True,
                    "runAsUser": 999,
                    "runAsGroup": 999,
                    "fsGroup": 999,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "container_security_context": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "node_selector": {},
                "tolerations": [],
                "affinity": {},
                "priority_class_name": None,
            },
            "leader_election": {"lease_name": "demo-aldaas-leader"},
            "application": {
                "image": "postgres:latest",
                "pull_policy": "IfNotPresent",
                "port": 5432,
                "mount": "/var/lib/postgresql/data",
                "command": [],
                "args": [],
                "env": {"POSTGRES_USER": "aldaas", "POSTGRES_DB": "my_db_name"},
                "env_from_secret": None,
                "service_account": None,
                "resources": resources,
                "logins": "per-clone",
                "user": "aldaas",
                "database": "my_db_name",
            },
            "restore": {
                # The built-in restore, in the broker's image (helper_image).
                "image": None,
                "command": [],
                "args": [],
                "database": None,
                "env": restore_env,
                "env_from_secret": None,
                "service_account": None,
                "backup_size_limit": None,
                "resources": resources,
                "backup_path": "/backup.sql.gz",
                "fetch_env": {
                    "ALDAAS_S3_BUCKET": "backup",
                    "ALDAAS_S3_ENDPOINT_URL": "http://minio.server:80",
                    "ALDAAS_S3_ADDRESSING_STYLE": "auto",
                    "ALDAAS_S3_CONNECT_TIMEOUT": "10",
                    "ALDAAS_S3_READ_TIMEOUT": "30",
                    "ALDAAS_S3_MAX_ATTEMPTS": "3",
                },
            },
            "check": {
                "image": "postgres:latest",
                "command": ["sh", "-c"],
                "args": [
                    'psql -h $ALDAAS_HOST_DAEMON -p 5432 -U $POSTGRES_USER -d $POSTGRES_DB -c "\\l"'
                ],
                "env": restore_env,
                "env_from_secret": None,
                "resources": resources,
            },
        },
        "source": {"kind": "s3"},
        "s3": {
            "bucket": "backup",
            "prefix": "spilo/acid-database/shasum/logical_backups",
            "suffix": ".sql.gz",
            "endpoint_url": "http://minio.server:80",
            "region": None,
            "addressing_style": "auto",
            "order": "last_modified",
            "connect_timeout": 10,
            "read_timeout": 30,
            "max_attempts": 3,
        },
        "pool": {"size": 3, "max_provisioning": 2},
        "lease": {"ttl": 300, "max_ttl": 86400, "max_lifetime": 604800},
        "snapshots": {"keep": 1},
        "gateway": {"host": "0.0.0.0", "port": 8080, "legacy_endpoint": False},
        "admin": {"listen": "0.0.0.0", "port": 9090},
        "log": {"format": "json"},
    }


def test_if_original_style_values_are_given_then_they_reach_the_config(render: Render) -> None:
    """If an original values file is installed, then its keys land in the matching settings."""
    config = render(ORIGINAL_STYLE).broker_config()
    provider = config["kubernetes"]
    assert config["provider"] == "kubernetes"
    assert provider["storage_class"] == "rbd-fast"
    assert provider["snapshot_class"] == "rbd-fast-snap"
    assert provider["storage_size"] == "20Gi"
    assert provider["s3_credentials_secret"] == "backups-s3"
    assert provider["application"]["image"] == "postgres:16"
    assert provider["application"]["command"] == []
    assert provider["application"]["resources"] == {
        "requests": {"cpu": "250m", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    # The original ran the check with the restore's environment and resources.
    assert provider["check"]["env"] == {"POSTGRES_USER": "app", "POSTGRES_DB": "appdb"}
    assert provider["check"]["env_from_secret"] == provider["restore"]["env_from_secret"]
    # Helm merges maps, so the chart's default limits stay under the given requests.
    assert provider["check"]["resources"] == {
        "requests": {"cpu": "100m", "memory": "512Mi"},
        "limits": {"cpu": "1000m", "memory": "1Gi"},
    }
    assert provider["check"]["args"] == [
        "psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER -d $POSTGRES_DB -c 'select 1'"
    ]
    assert provider["application"]["user"] == "app"
    assert provider["application"]["database"] == "appdb"
    assert provider["restore"]["fetch_env"] == {
        "ALDAAS_S3_BUCKET": "nightly",
        "ALDAAS_S3_ENDPOINT_URL": "http://minio.backups.svc:9000",
        "ALDAAS_S3_ADDRESSING_STYLE": "auto",
        "ALDAAS_S3_CONNECT_TIMEOUT": "10",
        "ALDAAS_S3_READ_TIMEOUT": "30",
        "ALDAAS_S3_MAX_ATTEMPTS": "3",
    }
    assert config["source"] == {"kind": "s3"}
    assert config["s3"] == {
        "endpoint_url": "http://minio.backups.svc:9000",
        "region": None,
        "bucket": "nightly",
        "prefix": "logical/appdb",
        "suffix": ".sql.gz",
        "addressing_style": "auto",
        "order": "last_modified",
        "connect_timeout": 10,
        "read_timeout": 30,
        "max_attempts": 3,
    }


def test_if_s3_keys_are_given_then_they_are_in_the_secret_and_not_the_configmap(
    render: Render,
) -> None:
    """If S3 keys and a token are set, then only the Secret holds them and the broker reads it."""
    rendered = render(
        {"tunnel": {"token": "tok-123"}, "s3": {"accesskey": "AKIAEXAMPLE", "secretkey": "sk-456"}}
    )
    secret = rendered.get("Secret", "demo-aldaas")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "token": "tok-123",
        "admin-token": secret_value(secret, "admin-token"),
        "accesskey": "AKIAEXAMPLE",
        "secretkey": "sk-456",
    }
    configmap_text = yaml.safe_dump(rendered.get("ConfigMap"))
    for secret_text in ("tok-123", "AKIAEXAMPLE", "sk-456"):
        assert secret_text not in configmap_text
    env = rendered.container()["env"]
    assert [e["name"] for e in env] == [
        "ALDAAS_KUBERNETES_IDENTITY",
        "ALDAAS_GATEWAY_INSTANCE_TOKEN",
        "ALDAAS_ADMIN_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    assert env[3]["valueFrom"] == {"secretKeyRef": {"name": "demo-aldaas", "key": "accesskey"}}
    assert rendered.broker_config()["kubernetes"]["s3_credentials_secret"] == "demo-aldaas"


def secret_value(secret: dict[str, Any], key: str) -> str:
    """The decoded value of one key of a rendered Secret."""
    return base64.b64decode(secret["data"][key]).decode()


def test_if_no_token_is_given_then_random_ones_are_generated(render: Render) -> None:
    """If tunnel.token and admin.token are empty, then each is a 48-character random string."""
    secret = render(None).get("Secret", "demo-aldaas")
    token, admin_token = secret_value(secret, "token"), secret_value(secret, "admin-token")
    assert len(token) == 48
    assert token.isalnum()
    assert len(admin_token) == 48
    assert token != admin_token


def test_if_both_existing_secrets_are_named_then_no_secret_is_rendered(render: Render) -> None:
    """If tokens and S3 keys come from existing Secrets, then the chart renders no Secret."""
    rendered = render({"existingSecret": "aldaas-tokens", "s3": {"existingSecret": "backups-s3"}})
    secrets = {m["metadata"]["name"] for m in rendered.manifests if m["kind"] == "Secret"}
    assert "demo-aldaas" not in secrets
    env = {e["name"]: e["valueFrom"] for e in rendered.container()["env"]}
    assert env["ALDAAS_GATEWAY_INSTANCE_TOKEN"] == {
        "secretKeyRef": {"name": "aldaas-tokens", "key": "token"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "backups-s3", "key": "secretkey"}
    }


def test_if_only_s3_existing_secret_is_named_then_the_secret_holds_only_tokens(
    render: Render,
) -> None:
    """If s3.existingSecret is set (the original's way), then the chart's Secret has no S3 keys."""
    rendered = render(ORIGINAL_STYLE)
    secret = rendered.get("Secret", "demo-aldaas")
    assert sorted(secret["data"]) == ["admin-token", "token"]
    assert secret_value(secret, "token") == "original-style-instance-token"


def test_if_no_s3_credentials_are_given_then_the_broker_gets_no_aws_keys(render: Render) -> None:
    """If neither S3 keys nor s3.existingSecret are set, then the pod's cloud identity is used."""
    names = [e["name"] for e in render(None).container()["env"]]
    assert names == [
        "ALDAAS_KUBERNETES_IDENTITY",
        "ALDAAS_GATEWAY_INSTANCE_TOKEN",
        "ALDAAS_ADMIN_TOKEN",
    ]


def test_if_domain_and_tls_are_set_then_the_ingress_is_websocket_ready(render: Render) -> None:
    """If domain and tlsSecretName are set, then the Ingress terminates TLS and keeps websockets."""
    ingress = render(MONITORING).get("Ingress")
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
        "nginx.ingress.kubernetes.io/proxy-body-size": "0",
    }
    assert ingress["spec"] == {
        "ingressClassName": "nginx",
        "tls": [{"hosts": ["aldaas.example.test"], "secretName": "aldaas-tls"}],
        "rules": [
            {
                "host": "aldaas.example.test",
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {
                                "service": {"name": "demo-aldaas", "port": {"name": "gateway"}}
                            },
                        }
                    ]
                },
            }
        ],
    }


def test_if_original_annotations_are_null_then_the_ingress_has_none(render: Render) -> None:
    """If tunnel.ingress.annotations is left empty as in the original, then none are rendered."""
    ingress = render(ORIGINAL_STYLE).get("Ingress")
    assert "annotations" not in ingress["metadata"]
    assert ingress["spec"]["tls"] == [
        {"hosts": ["db.example.test"], "secretName": "db-example-tls"}
    ]


def test_if_the_service_is_rendered_then_it_exposes_gateway_and_metrics(render: Render) -> None:
    """If the chart renders, then the Service maps gateway and metrics to the container's ports."""
    assert render(None).get("Service")["spec"]["ports"] == [
        {"name": "gateway", "port": 8080, "targetPort": "gateway", "protocol": "TCP"},
        {"name": "metrics", "port": 9090, "targetPort": "admin", "protocol": "TCP"},
    ]


def test_if_servicemonitor_is_enabled_then_it_scrapes_the_metrics_port(render: Render) -> None:
    """If metrics.serviceMonitor.enabled, then it selects the broker Service's metrics port."""
    monitor = render(MONITORING).get("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"] == {
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "aldaas",
                "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "broker",
            }
        },
        "namespaceSelector": {"matchNames": ["aldaas"]},
        "endpoints": [
            {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
        ],
    }


def test_if_dashboard_is_enabled_then_grafana_sidecar_finds_it(render: Render) -> None:
    """If metrics.dashboard.enabled, then a ConfigMap labelled grafana_dashboard=1 has the JSON."""
    dashboard = render(MONITORING).get("ConfigMap", "demo-aldaas-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Databases"}
    assert yaml.safe_load(dashboard["data"]["aldaas.json"])["uid"] == "aldaas-broker"


def test_if_replicas_is_2_then_two_brokers_share_one_leader_lease(render: Render) -> None:
    """If replicas is 2, then the Deployment runs two and the config names one election Lease."""
    rendered = render(REPLICAS_2)
    assert rendered.get("Deployment")["spec"]["replicas"] == 2
    assert rendered.get("PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "aldaas",
                "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "broker",
            }
        },
    }
    config = rendered.broker_config()
    assert config["kubernetes"]["leader_election"] == {"lease_name": "demo-aldaas-leader"}
    assert config["pool"] == {"size": 5, "max_provisioning": 3}
    env = rendered.container()["env"][0]
    assert env == {
        "name": "ALDAAS_KUBERNETES_IDENTITY",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }


def test_if_the_config_changes_then_the_pod_template_changes(render: Render) -> None:
    """If a setting changes, then the config checksum annotation changes, rolling the brokers."""

    def checksum(values: dict[str, Any] | None) -> str:
        template = render(values).get("Deployment")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/config"])

    assert checksum(None) == checksum(None)
    assert checksum(None) != checksum({"lease": {"ttl": 600}})


def test_if_a_domain_is_set_then_notes_print_the_client_command(render: Render) -> None:
    """If domain and TLS are set, then NOTES.txt prints docker and `aldaas connect` for it."""
    notes = render(MONITORING).notes
    assert (
        "  docker run --rm -it -p 5432:5432 \\\n"
        "    -e ALDAAS_SERVER=aldaas.example.test \\\n"
        "    -e ALDAAS_PROTOCOL=wss \\\n"
        '    -e ALDAAS_TOKEN="$ALDAAS_TOKEN" \\\n'
        "    -e ALDAAS_NAME=demo-aldaas \\\n"
        "    -e ALDAAS_PORT=5432 \\\n"
        "    ghcr.io/negashev/aldaas:0.1.0 aldaas connect\n"
    ) in notes
    assert (
        "ALDAAS_SERVER=aldaas.example.test ALDAAS_PROTOCOL=wss ALDAAS_NAME=demo-aldaas"
        " aldaas connect" in notes
    )
    assert (
        "kubectl -n aldaas get secret demo-aldaas -o jsonpath='{.data.token}' | base64 -d" in notes
    )


def test_if_cert_manager_issues_the_certificate_then_notes_use_wss(render: Render) -> None:
    """If a cert-manager annotation replaces tlsSecretName, then NOTES.txt still says wss."""
    annotations = {"cert-manager.io/cluster-issuer": "letsencrypt"}
    notes = render(
        {"domain": "a.example.test", "tunnel": {"ingress": {"annotations": annotations}}}
    )
    assert "-e ALDAAS_PROTOCOL=wss \\\n" in notes.notes
    assert "plain ws://" not in notes.notes


def test_if_notes_are_printed_then_no_token_is_in_them(render: Render) -> None:
    """If a token is set in values, then NOTES.txt tells how to read it but never prints it."""
    notes = render({"domain": "a.example.test", "tunnel": {"token": "do-not-print-me"}}).notes
    assert "do-not-print-me" not in notes
    assert "ALDAAS_PROTOCOL=ws " in notes
    assert "Set\ntunnel.ingress.tlsSecretName" in notes


def test_if_no_domain_is_set_then_notes_explain_port_forward(render: Render) -> None:
    """If domain is empty, then NOTES.txt says why there is no Ingress and how to port-forward."""
    notes = render(None).notes
    assert "No Ingress was rendered (domain is empty)." in notes
    assert "kubectl -n aldaas port-forward svc/demo-aldaas 8080:8080 &" in notes


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_if_the_chart_is_linted_strictly_then_nothing_is_found(
    chart_dir: pathlib.Path, values: dict[str, Any] | None
) -> None:
    """If `helm lint --strict` runs with a value set, then it reports no warning and no error."""
    report = helm_python.lint(chart_dir, values, strict=True, namespace="aldaas")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "manifest",
    [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}},
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "x", "namespace": "aldaas"},
            "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "30s"}]},
        },
    ],
    ids=["core-kind", "servicemonitor"],
)
def test_if_a_manifest_has_an_unknown_field_then_validation_rejects_it(
    validate_manifest: Callable[[dict[str, Any]], None], manifest: dict[str, Any]
) -> None:
    """If a manifest carries a misspelled field, then the strict validation used above fails."""
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        validate_manifest(manifest)


def test_if_tunnel_legacy_endpoint_is_set_then_only_then_the_gateway_serves_it(
    render: Render,
) -> None:
    """If tunnel.legacyEndpoint is true, then the gateway serves the legacy path; by default not."""
    assert render(None).broker_config()["gateway"]["legacy_endpoint"] is False
    on = render({"tunnel": {"legacyEndpoint": True}}).broker_config()
    assert on["gateway"]["legacy_endpoint"] is True
