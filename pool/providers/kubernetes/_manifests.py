"""Pure builders of every object the Kubernetes provider sends, from settings and names, with no I/O.

Object mapping (docs/kubernetes-provider.md has the full table):

- volume  = PVC ``<instance>-<name>`` + database pod of the same name;
- snapshot = VolumeSnapshot ``<instance>-<name>`` (snapshot.storage.k8s.io/v1);
- clone   = PVC with ``dataSource`` the snapshot + database pod;
- restore and check = batch/v1 Jobs ``<instance>-<name>-restore`` / ``-check``;
- a failed snapshot's record = ConfigMap ``<instance>-<name>`` holding only its meta;
- a volume's or clone's credentials = Secret ``<instance>-<name>``, owned by its PVC
  (:func:`credentials_secret`, ``application.logins: per-clone``);
- leader election = one coordination.k8s.io/v1 Lease.

A name longer than a DNS label (63 characters, e.g. under a long Helm release
name) is cut and ends in a hash of the whole name (:func:`object_name`), so any
instance name fits. A resource's ``meta`` lives in labels (short values of
``label_meta_keys``) and annotations (everything else), see :class:`MetaCodec`.
Tests validate every builder's output against the Kubernetes OpenAPI schemas
and the snapshot CRD.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs
from kubernetes.utils.quantity import parse_quantity

from ... import _roles as roles
from ..._provider import Backup, Command, Kind, ProviderError
from ._settings import KubernetesSettings, ResourceSettings

Obj = dict[str, Any]

SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
MAX_NAME = 63
"""Object names are DNS labels: a pod's name is its hostname, a Job's name a label value."""

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_META_KEY = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
_RESERVED_META = frozenset({"kind", "name", "instance", "created-by", "credentials", "database"})
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_HASH_LENGTH = 10
_RULE_LABEL = (
    "at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
)
_RULE_SUBDOMAIN = "at most 253 lower-case letters, digits, '-' and '.'"
CA_BUNDLE_DIR = "/etc/aldaas-s3-ca"
"""Where the download container finds the S3 CA bundle (the chart mounts the broker's there too)."""
CA_BUNDLE_FILE = "ca-bundle.pem"


# -- settings that become names, label keys and selectors -----------------------------------


def check_settings(settings: KubernetesSettings) -> None:
    """Refuse naming settings that cannot become Kubernetes names, in one sentence.

    They end up in URL paths, object names, label values, label keys and label
    selectors, where a ',' or '=' would change a query. The instance is a label
    value too, so it must be a DNS label itself; object names derived from it
    always fit (:func:`object_name`).
    """
    rules: list[tuple[str, str, bool, str]] = [
        ("namespace", settings.namespace, bool(_DNS_LABEL.match(settings.namespace)), _RULE_LABEL),
        ("instance", settings.instance, bool(_DNS_LABEL.match(settings.instance)), _RULE_LABEL),
        (
            "label_prefix",
            settings.label_prefix,
            settings.label_prefix == ""
            or (
                settings.label_prefix.endswith("/")
                and bool(_SUBDOMAIN.match(settings.label_prefix[:-1]))
            ),
            "'' or a DNS subdomain followed by '/', e.g. 'aldaas.io/'",
        ),
        (
            "leader_election.lease_name",
            settings.leader_election.lease_name,
            bool(_SUBDOMAIN.match(settings.leader_election.lease_name)),
            _RULE_SUBDOMAIN,
        ),
    ]
    rules += [
        (
            "label_meta_keys",
            key,
            bool(_META_KEY.match(key)),
            "1-63 letters, digits, '-', '_' or '.'",
        )
        for key in settings.label_meta_keys
    ]
    ca = settings.s3_ca_bundle
    if ca.config_map and ca.secret:
        raise ProviderError(
            f"kubernetes settings s3_ca_bundle.config_map ({ca.config_map!r}) and "
            f"s3_ca_bundle.secret ({ca.secret!r}) are both set; name the CA bundle's "
            "ConfigMap or its Secret, not both."
        )
    named = [("s3_ca_bundle.config_map", ca.config_map), ("s3_ca_bundle.secret", ca.secret)]
    rules += [(s, name, bool(_SUBDOMAIN.match(name)), _RULE_SUBDOMAIN) for s, name in named if name]
    if ca.config_map or ca.secret:
        rule = "1-253 letters, digits, '-', '_' or '.'"
        rules.append(("s3_ca_bundle.key", ca.key, bool(_DATA_KEY.match(ca.key)), rule))
    for setting, value, ok, rule in rules:
        if not ok:
            shown = value if len(value) <= 80 else value[:80] + "…"
            raise ProviderError(
                f"kubernetes setting {setting} is {shown!r} ({len(value)} characters), which is "
                f"not valid in Kubernetes names and labels; use {rule}."
            )
    if not settings.restore.engine_command:
        raise ProviderError(
            "kubernetes setting restore.engine_command is empty; leave it unset (aldaas "
            "restore-backup in the helper image) or name the program that runs aldaas's restore."
        )
    if settings.application.logins not in CREDENTIALS_MODES:
        raise ProviderError(
            "kubernetes setting application.logins is "
            f"{settings.application.logins!r}; use 'per-clone' (each clone its own "
            "passwords) or 'static' (application.user and application.password, shared)."
        )


def object_name(settings: KubernetesSettings, name: str, suffix: str = "") -> str:
    """``<instance>-<name><suffix>``, cut to 63 characters with a hash of the whole when longer.

    Short names are unchanged (objects made before the hash existed are found
    again). ``name`` is the pool's name of a resource and a label value, so it
    must be a DNS label itself.
    """
    if not _DNS_LABEL.match(name) or (suffix and not re.fullmatch(r"[-a-z0-9]+", suffix)):
        raise ProviderError(
            f"{name + suffix!r} cannot be part of a Kubernetes object name; use lower-case "
            "letters, digits and '-', at most 63 characters."
        )
    full = f"{settings.instance}-{name}{suffix}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_LENGTH]
    return f"{full[: MAX_NAME - _HASH_LENGTH - 1].rstrip('-')}-{digest}"


def system_labels(settings: KubernetesSettings, kind: str, name: str) -> dict[str, str]:
    """The labels that make an object aldaas's, of this instance, of ``kind``, named ``name``."""
    prefix = settings.label_prefix
    return {
        "app.kubernetes.io/managed-by": "aldaas",
        "aldaas": settings.instance,
        f"{prefix}instance": settings.instance,
        f"{prefix}kind": kind,
        f"{prefix}name": name,
    }


def selector(settings: KubernetesSettings, kind: str | None = None) -> str:
    """The label selector of this instance's objects (of one ``kind`` if given)."""
    prefix = settings.label_prefix
    parts = ["app.kubernetes.io/managed-by=aldaas", f"{prefix}instance={settings.instance}"]
    if kind is not None:
        parts.append(f"{prefix}kind={kind}")
    return ",".join(parts)


def is_ours(
    settings: KubernetesSettings, obj: Obj, kind: str | None = None, name: str | None = None
) -> bool:
    """Whether ``obj`` carries this instance's labels (and ``kind``'s and ``name``'s, if given).

    Only such objects are aldaas's: one of the same name without them (made by
    someone else) is never adopted, given a database or deleted.
    """
    labels = (obj.get("metadata") or {}).get("labels") or {}
    prefix = settings.label_prefix
    expected = {"app.kubernetes.io/managed-by": "aldaas", f"{prefix}instance": settings.instance}
    if kind is not None:
        expected[f"{prefix}kind"] = kind
    if name is not None:
        expected[f"{prefix}name"] = name
    return all(labels.get(key) == value for key, value in expected.items())


def label_value_ok(value: str) -> bool:
    """Whether ``value`` may be a label value (63 characters, alphanumeric at both ends)."""
    return len(value) <= 63 and _LABEL_VALUE.match(value) is not None


# -- meta <-> labels/annotations -------------------------------------------------------------


@attrs.frozen
class MetaCodec:
    """Where each meta key lives: a label (short, selectable) or an annotation (anything)."""

    prefix: str
    label_keys: frozenset[str]

    @classmethod
    def of(cls, settings: KubernetesSettings) -> MetaCodec:
        return cls(settings.label_prefix, frozenset(settings.label_meta_keys))

    def check(self, meta: Mapping[str, str]) -> None:
        for key in meta:
            if key in _RESERVED_META or not _META_KEY.match(key):
                raise ProviderError(
                    f"meta key {key!r} cannot be stored on Kubernetes objects; use 1-63 letters, digits, "
                    f"'-', '_' or '.', not one of {sorted(_RESERVED_META)}."
                )

    def encode(self, meta: Mapping[str, str], old: Obj | None = None) -> tuple[Obj, Obj]:
        """Labels and annotations for ``meta``; keys of ``old`` no longer present are set to None."""
        self.check(meta)
        labels: Obj = {}
        annotations: Obj = {}
        if old is not None:
            for key in self.decode(old):
                labels[self.prefix + key] = None
                annotations[self.prefix + key] = None
        for key, value in meta.items():
            if key in self.label_keys and label_value_ok(value):
                labels[self.prefix + key] = value
                annotations[self.prefix + key] = None
            else:
                annotations[self.prefix + key] = value
                labels[self.prefix + key] = None
        if old is None:
            labels = {k: v for k, v in labels.items() if v is not None}
            annotations = {k: v for k, v in annotations.items() if v is not None}
        return labels, annotations

    def decode(self, obj: Obj) -> dict[str, str]:
        metadata = obj.get("metadata") or {}
        meta: dict[str, str] = {}
        for source in (metadata.get("annotations") or {}, metadata.get("labels") or {}):
            for key, value in source.items():
                if key.startswith(self.prefix) and key[len(self.prefix) :] not in _RESERVED_META:
                    meta.setdefault(key[len(self.prefix) :], str(value))
        return meta


def metadata(
    settings: KubernetesSettings, kind: str, name: str, meta: Mapping[str, str], suffix: str = ""
) -> Obj:
    """Name, labels (system + selectable meta) and annotations (other meta, creator)."""
    labels, annotations = MetaCodec.of(settings).encode(meta)
    status = meta.get("status")
    if kind == Kind.SNAPSHOT.value and status is not None and label_value_ok(status):
        labels["status"] = status  # the original's `status=ready` label on snapshots
    annotations[f"{settings.label_prefix}created-by"] = settings.identity
    return {
        "name": object_name(settings, name, suffix),
        "labels": {**labels, **system_labels(settings, kind, name)},
        "annotations": annotations,
    }


# -- object bodies -----------------------------------------------------------------------------


def _resources(settings: ResourceSettings) -> Obj:
    return {"requests": dict(settings.requests), "limits": dict(settings.limits)}


def _env(values: Mapping[str, str]) -> list[Obj]:
    return [{"name": k, "value": v} for k, v in sorted(values.items())]


# -- credentials (application.logins: per-clone) -----------------------------------------

CREDENTIALS_MODES = ("per-clone", "static")
LOGIN_PASSWORD = "password"  # noqa: S105 - a key's name
"""Key of a clone's Secret: the lease login's password (what the DSN carries)."""
LOGIN_VERIFIER = "password-verifier"
"""Key of a clone's Secret: the SCRAM verifier of that password (what the database stores)."""
ADMIN_PASSWORD = "admin-password"  # noqa: S105 - a key's name
"""Key of a volume's or clone's Secret: the admin's password (restore, masking and check Jobs)."""
ADMIN_VERIFIER = "admin-password-verifier"
"""Key of a clone's Secret: the SCRAM verifier of the clone's admin password."""

_VERIFIER_PLACEHOLDERS = {
    LOGIN_VERIFIER: "@ALDAAS_LOGIN_VERIFIER@",
    ADMIN_VERIFIER: "@ALDAAS_ADMIN_VERIFIER@",
}
_VERIFIER_ENV = {LOGIN_VERIFIER: "ALDAAS_LOGIN_VERIFIER", ADMIN_VERIFIER: "ALDAAS_ADMIN_VERIFIER"}

CREDENTIALS_SCRIPT = """\
set -eu
: "${ALDAAS_LOGIN_VERIFIER:?is empty: the clone's Secret lacks password-verifier}"
: "${ALDAAS_ADMIN_VERIFIER:?is empty: the clone's Secret lacks admin-password-verifier}"
sql=$(printf '%s\\n' "$ALDAAS_CREDENTIALS_SQL" | awk '{
    gsub(/@ALDAAS_LOGIN_VERIFIER@/, ENVIRON["ALDAAS_LOGIN_VERIFIER"])
    gsub(/@ALDAAS_ADMIN_VERIFIER@/, ENVIRON["ALDAAS_ADMIN_VERIFIER"])
    print
}')
as=""
if [ "$(id -u)" = 0 ]; then as="gosu postgres"; fi
printf '%s\\n\\n' "$sql" | $as postgres --single -j -D "${PGDATA:-$ALDAAS_DATA}" \\
    -c exit_on_error=on -c log_min_error_statement=panic template1 >/dev/null
"""
"""The clone's init container: sets the login's and the admin's passwords from the clone's
Secret with the image's own ``postgres --single`` (no server runs yet, so no connection and
no password is needed). Only SCRAM verifiers reach the database and the container, never the
passwords, and no statement is echoed (``log_min_error_statement=panic``), so the pod log that
a failure quotes holds none of them. Running it again sets the same passwords (a recreated
pod reads the same Secret)."""


def credentials_annotation(settings: KubernetesSettings) -> str:
    """The annotation that marks a VolumeSnapshot made under per-clone credentials."""
    return f"{settings.label_prefix}credentials"


def per_clone(settings: KubernetesSettings) -> bool:
    """Whether lease holders get per-clone credentials (the role model) rather than static ones."""
    return settings.application.logins == "per-clone"


def credentials_secret(
    settings: KubernetesSettings, kind: Kind, name: str, owner: Obj, values: Mapping[str, str]
) -> Obj:
    """The Secret of volume or clone ``name``: its passwords, owned by (deleted with) its PVC."""
    meta = metadata(settings, kind.value, name, {})
    owner_meta = owner["metadata"]
    meta["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "name": owner_meta["name"],
            "uid": owner_meta["uid"],
        }
    ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {
            key: base64.b64encode(value.encode()).decode() for key, value in sorted(values.items())
        },
    }


def secret_values(secret: Obj) -> dict[str, str]:
    """A Secret's ``data`` decoded (what :func:`credentials_secret` put there)."""
    values: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            values[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except ValueError:
            continue  # not ours to read (binascii.Error and UnicodeDecodeError are ValueErrors)
    return values


def _secret_env(env_name: str, settings: KubernetesSettings, name: str, key: str) -> Obj:
    secret = object_name(settings, name)
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def credentials_sql(settings: KubernetesSettings, *, lease_superuser: bool) -> str:
    """What the clone's init container runs: one statement per paragraph (``postgres -j``),
    with the verifiers as placeholders it fills from the Secret."""
    statements = [
        *roles.login_statements(
            login=settings.application.user,
            verifier=_VERIFIER_PLACEHOLDERS[LOGIN_VERIFIER],
            superuser=lease_superuser,
        ),
        roles.admin_password_sql(verifier=_VERIFIER_PLACEHOLDERS[ADMIN_VERIFIER]),
    ]
    return "\n\n".join(statement.strip() for statement in statements)


SEAL_SCRIPT = """\
psql -X -q -v ON_ERROR_STOP=1 -c "$ALDAAS_SEAL_ROLES_SQL"
databases=$(psql -X -A -t -v ON_ERROR_STOP=1 -c "$ALDAAS_SEAL_DATABASES_SQL")
printf '%s\\n' "$databases" | while IFS= read -r database; do
    [ -n "$database" ] || continue
    case "$database" in
        postgres|template1) sql=$ALDAAS_SEAL_SYSTEM_DATABASE_SQL ;;
        *) sql=$ALDAAS_SEAL_DATABASE_SQL ;;
    esac
    PGDATABASE=$database psql -X -q -v ON_ERROR_STOP=1 -c "$sql"
done
"""
"""After the restore command, in the same container and as the admin: the role model's seal step (:mod:`pool._roles`) on the cluster's roles, then in every database."""


def _seal_env(settings: KubernetesSettings) -> dict[str, str]:
    login = settings.application.user
    return {
        "ALDAAS_SEAL_ROLES_SQL": roles.seal_roles_sql(login=login),
        "ALDAAS_SEAL_DATABASES_SQL": (
            "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn ORDER BY 1"
        ),
        "ALDAAS_SEAL_DATABASE_SQL": roles.seal_database_sql(login=login, own_database=True),
        "ALDAAS_SEAL_SYSTEM_DATABASE_SQL": roles.seal_database_sql(login=login, own_database=False),
    }


def _step_env(settings: KubernetesSettings, name: str, values: Mapping[str, str]) -> list[Obj]:
    """A Job's environment; with per-clone credentials it logs in as the admin, whose password
    the kubelet reads from volume or clone ``name``'s Secret (it is never in the Job's spec)."""
    if not per_clone(settings):
        return _env(values)
    admin = {"PGUSER": roles.ADMIN, "POSTGRES_USER": roles.ADMIN}
    plain = {k: v for k, v in {**values, **admin}.items() if k != "PGPASSWORD"}
    return [*_env(plain), _secret_env("PGPASSWORD", settings, name, ADMIN_PASSWORD)]


def _pod_spec(settings: KubernetesSettings, spec: Obj) -> Obj:
    """``spec`` with the security context and scheduling of :class:`PodSettings` added."""
    pods = settings.pods
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if pods.container_security_context:
            container["securityContext"] = dict(pods.container_security_context)
    extra: Obj = {
        "securityContext": dict(pods.security_context),
        "nodeSelector": dict(pods.node_selector),
        "tolerations": [dict(t) for t in pods.tolerations],
        "affinity": dict(pods.affinity),
        "priorityClassName": pods.priority_class_name,
        "imagePullSecrets": [{"name": name} for name in pods.image_pull_secrets],
    }
    return {**spec, **{key: value for key, value in extra.items() if value}}


def pvc(
    settings: KubernetesSettings,
    kind: Kind,
    name: str,
    meta: Mapping[str, str],
    snapshot: str | None = None,
    restore_size: str | None = None,
    database: str | None = None,
) -> Obj:
    """The PVC of a volume (empty) or of a clone (``dataSource`` the VolumeSnapshot ``snapshot``).

    ``restore_size`` is the snapshot's ``status.restoreSize``; the claim asks
    for it when it is larger than ``storage_size``. ``database`` is the one
    the restore chose for leases (:func:`database_annotation`), when it is not
    ``application.database``.
    """
    size = settings.storage_size
    if restore_size is not None and _quantity(restore_size) > _quantity(size):
        size = restore_size
    spec: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    if snapshot is not None:
        spec["dataSource"] = {
            "apiGroup": SNAPSHOT_GROUP,
            "kind": "VolumeSnapshot",
            "name": snapshot,
        }
    body_metadata = metadata(settings, kind.value, name, meta)
    if database is not None:
        body_metadata["annotations"][database_annotation(settings)] = database
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": body_metadata,
        "spec": spec,
    }


def database_annotation(settings: KubernetesSettings) -> str:
    """The annotation of a clone's PVC that names the database its leases get, when the restore
    chose one (a pg_dumpall backup's) other than ``application.database``."""
    return f"{settings.label_prefix}database"


def database_pod(
    settings: KubernetesSettings,
    kind: Kind,
    name: str,
    claim: Obj | None = None,
    *,
    lease_superuser: bool = False,
) -> Obj:
    """The pod running the database on PVC ``name`` (a volume being restored, or a clone).

    ``claim`` is that PVC as the API returned it: the pod names it its
    controller (``ownerReferences``), so ``kubectl drain`` evicts it without
    ``--force`` and the garbage collector deletes the pod with its PVC.

    With per-clone credentials a volume's image makes the admin its bootstrap
    superuser (POSTGRES_USER/POSTGRES_PASSWORD, the password from the volume's
    Secret), and a clone's init container gives the login and the admin the
    passwords of the clone's Secret (:data:`CREDENTIALS_SCRIPT`) before the
    database starts; ``lease_superuser`` makes the login a superuser.
    """
    app = settings.application
    if app.readiness_command:
        probe: Obj = {"exec": {"command": list(app.readiness_command)}}
    else:
        probe = {"tcpSocket": {"port": app.port}}
    probe.update(periodSeconds=2, failureThreshold=3, timeoutSeconds=2)
    mount: Obj = {"name": "data", "mountPath": app.mount}
    if app.sub_path:
        mount["subPath"] = app.sub_path
    env = _env(app.env)
    if per_clone(settings) and kind is Kind.VOLUME:
        bootstrap = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
        env = [e for e in env if e["name"] not in bootstrap]
        env += [
            *_env({"POSTGRES_USER": roles.ADMIN, "POSTGRES_DB": app.database}),
            _secret_env("POSTGRES_PASSWORD", settings, name, ADMIN_PASSWORD),
        ]
    container: Obj = {
        "name": "database",
        "image": app.image,
        "ports": [{"name": "database", "containerPort": app.port}],
        "env": env,
        "volumeMounts": [mount],
        "resources": _resources(app.resources),
        "readinessProbe": probe,
    }
    if app.pull_policy:
        container["imagePullPolicy"] = app.pull_policy
    if app.command:
        container["command"] = list(app.command)
    if app.args:
        container["args"] = list(app.args)
    if app.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": app.env_from_secret}}]
    spec: Obj = {
        "restartPolicy": "Always",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.stop_grace_seconds,
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": object_name(settings, name)}}
        ],
    }
    if per_clone(settings) and kind is Kind.CLONE:
        credentials: Obj = {
            "name": "credentials",
            "image": app.image,
            "command": ["sh", "-c", CREDENTIALS_SCRIPT],
            "env": [
                *_env(
                    {
                        **app.env,
                        "ALDAAS_DATA": app.mount,
                        "ALDAAS_CREDENTIALS_SQL": credentials_sql(
                            settings, lease_superuser=lease_superuser
                        ),
                    }
                ),
                *(
                    _secret_env(env_name, settings, name, key)
                    for key, env_name in sorted(_VERIFIER_ENV.items())
                ),
            ],
            "volumeMounts": [dict(mount)],
            "resources": _resources(app.resources),
        }
        if app.pull_policy:
            credentials["imagePullPolicy"] = app.pull_policy
        spec["initContainers"] = [credentials]
    if app.service_account:
        spec["serviceAccountName"] = app.service_account
    meta = metadata(settings, kind.value, name, {})
    if claim is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "name": claim["metadata"]["name"],
                "uid": claim["metadata"]["uid"],
                "controller": True,
            }
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": _pod_spec(settings, spec)}


def disruption_budget(settings: KubernetesSettings, name: str) -> Obj:
    """The PodDisruptionBudget that keeps drains from evicting leased clone ``name``'s pod.

    ``minAvailable: 1`` over its one pod refuses every eviction (HTTP 429,
    which ``kubectl drain`` reports and retries) while the pod is Ready; an
    integer ``minAvailable`` is the form Kubernetes allows for pods without a
    scalable controller. A pod that is not Ready may still be evicted
    (``unhealthyPodEvictionPolicy: AlwaysAllow``): a broken database should
    not block a drain, and the broker starts it again elsewhere.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(settings, Kind.CLONE.value, name, {}),
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": system_labels(settings, Kind.CLONE.value, name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _job(
    settings: KubernetesSettings,
    step: str,
    name: str,
    container: Obj,
    pod_extra: Obj,
    timeout: float,
    annotations: Mapping[str, str],
) -> Obj:
    step_settings = settings.restore if step == "restore" else settings.check
    container.update(name=step, resources=_resources(step_settings.resources))
    if "image" not in container:  # the application image's psql, as the original
        container["image"] = step_settings.image or settings.application.image
        if settings.application.pull_policy and not step_settings.image:
            container["imagePullPolicy"] = settings.application.pull_policy
    if step == "check" and (step_settings.command or step_settings.args):
        container["command"] = [*step_settings.command, *step_settings.args]  # as given
    if step_settings.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": step_settings.env_from_secret}}]
    job_metadata = metadata(settings, step, name, {}, suffix=f"-{step}")
    job_metadata["annotations"].update(annotations)
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        **pod_extra,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": max(1, math.ceil(timeout)),
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": system_labels(settings, step, name)},
                "spec": _pod_spec(settings, pod_spec),
            },
        },
    }


def backup_file(settings: KubernetesSettings, backup: Backup) -> tuple[str, str, str]:
    """The file name of ``backup``, where the download puts it and where the restore reads it."""
    restore = settings.restore
    if restore.backup_path:
        basename = restore.backup_path.rstrip("/").rsplit("/", 1)[-1]
    else:
        basename = re.sub(r"[^A-Za-z0-9._-]", "_", backup.key.rsplit("/", 1)[-1]) or "backup"
    fetched = f"{restore.backup_dir.rstrip('/')}/{basename}"
    return basename, fetched, restore.backup_path or fetched


TERMINATION_LOG = "/dev/termination-log"
"""Where the restore engine writes its outcome (JSON); the kubelet makes it the container's
``state.terminated.message`` (at most 4096 bytes), which the broker reads before deleting the Job."""


def uses_engine(settings: KubernetesSettings, command: Command) -> bool:
    """Whether the restore Job runs aldaas's restore engine (``restore.engine_command``).

    It does unless a command was configured: the pool's ``restore.argv`` (then
    ``command`` is not built in) or the original's ``restore.command``/``args``.
    """
    restore = settings.restore
    return command.builtin and not (restore.command or restore.args)


def _engine_container(settings: KubernetesSettings, backup: Backup, fetched: str) -> Obj:
    """The restore container that runs ``aldaas restore-backup`` on the downloaded file."""
    restore = settings.restore
    argv = [
        *restore.engine_command,
        "--file",
        fetched,
        "--key",
        backup.key,
        "--work-dir",
        f"{restore.backup_dir.rstrip('/')}/aldaas-work",
        "--outcome",
        TERMINATION_LOG,
    ]
    if restore.database:
        argv += ["--database", restore.database]
    if per_clone(settings):  # the engine runs the seal step itself, with its own psql
        argv += ["--seal-login", settings.application.user]
    return {
        "image": restore.image or settings.helper_image,
        "command": argv,
        # Spool files of a compressed archive and unpacked directory dumps go next to the backup.
        "volumeMounts": [{"name": "backup", "mountPath": restore.backup_dir}],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }


def _command_container(
    settings: KubernetesSettings, backup: Backup, command: Command, env: dict[str, str]
) -> Obj:
    """The restore container that runs a configured command (the original's, or the pool's
    ``restore.argv``), then the seal step with per-clone credentials; it adds to ``env``."""
    restore = settings.restore
    basename, _, path = backup_file(settings, backup)
    env["ALDAAS_BACKUP_FILE"] = path
    argv = list(command.argv)
    run = '"$@" < "$ALDAAS_BACKUP_FILE"' if restore.stdin_from_backup else '"$@"'
    if restore.command or restore.args:  # the original's values: run exactly as given
        argv, run = [*restore.command, *restore.args], '"$@"'
    if per_clone(settings):  # the restore, then the seal step, in one container
        argv = ["sh", "-c", f"set -eu\n{run}\n{SEAL_SCRIPT}", "aldaas-restore", *argv]
        env.update(_seal_env(settings))
    elif run != '"$@"':
        argv = ["sh", "-c", f"exec {run}", "aldaas-restore", *argv]
    mount: Obj = {"name": "backup", "mountPath": restore.backup_dir, "readOnly": True}
    if restore.backup_path:  # the one file, at the fixed path the original used
        mount = {**mount, "mountPath": restore.backup_path, "subPath": basename}
    return {"command": argv, "volumeMounts": [mount]}


def restore_job(
    settings: KubernetesSettings,
    name: str,
    backup: Backup,
    command: Command,
    address: Mapping[str, str],
) -> Obj:
    """The Job that downloads ``backup`` (init container) and restores it into volume ``name``.

    ``address`` is the database's environment (:meth:`Endpoint.environ`). The
    restore is aldaas's engine (:func:`uses_engine`) or the configured command.
    """
    restore = settings.restore
    _, fetched, _ = backup_file(settings, backup)
    env = {**address, **restore.env, **command.env, "ALDAAS_BACKUP_FILE": fetched}
    if uses_engine(settings, command):
        container = _engine_container(settings, backup, fetched)
    else:
        container = _command_container(settings, backup, command, env)
    container["env"] = _step_env(settings, name, env)
    mount: Obj = {"name": "backup", "mountPath": restore.backup_dir}
    volumes: list[Obj] = [{"name": "backup", "emptyDir": {}}]
    fetch_env = dict(restore.fetch_env)
    fetch_mounts = [mount]
    ca_volume = _ca_bundle_volume(settings)
    if ca_volume is not None:  # `aldaas fetch-backup` reads the first, other downloaders the second
        ca_file = f"{CA_BUNDLE_DIR}/{CA_BUNDLE_FILE}"
        fetch_env.update(ALDAAS_S3_CA_BUNDLE=ca_file, AWS_CA_BUNDLE=ca_file)
        fetch_mounts.append({"name": "s3-ca", "mountPath": CA_BUNDLE_DIR, "readOnly": True})
        volumes.append(ca_volume)
    fetch: Obj = {
        "name": "fetch",
        "image": settings.helper_image,
        "command": [*restore.fetch_command, "--key", backup.key, "--to", fetched],
        "env": _env(fetch_env),
        "volumeMounts": fetch_mounts,
        "resources": _resources(restore.resources),
    }
    secret = settings.s3_credentials_secret
    if secret and settings.s3_credentials_env:  # key names differ from the AWS_* names
        fetch["env"] += [
            {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for env_name, key in sorted(settings.s3_credentials_env.items())
        ]
    elif secret:
        fetch["envFrom"] = [{"secretRef": {"name": secret}}]
    if restore.backup_size_limit:
        volumes[0]["emptyDir"]["sizeLimit"] = restore.backup_size_limit
    extra: Obj = {"initContainers": [fetch], "volumes": volumes}
    if restore.service_account:  # workload identity: the download needs the account's token
        extra.update(serviceAccountName=restore.service_account, automountServiceAccountToken=True)
    prefix = settings.label_prefix
    annotations = {f"{prefix}backup-key": backup.key, f"{prefix}backup-etag": backup.etag}
    return _job(settings, "restore", name, container, extra, command.timeout_seconds, annotations)


def _ca_bundle_volume(settings: KubernetesSettings) -> Obj | None:
    """The volume holding the S3 CA bundle as ``CA_BUNDLE_FILE``, or None when none is set."""
    ca = settings.s3_ca_bundle
    items = [{"key": ca.key, "path": CA_BUNDLE_FILE}]
    if ca.config_map:
        return {"name": "s3-ca", "configMap": {"name": ca.config_map, "items": items}}
    if ca.secret:
        return {"name": "s3-ca", "secret": {"secretName": ca.secret, "items": items}}
    return None


def check_job(
    settings: KubernetesSettings, name: str, command: Command, address: Mapping[str, str]
) -> Obj:
    """The Job that runs the check command against clone ``name`` (at ``address``)."""
    env = {**address, **settings.check.env, **command.env}
    container: Obj = {"command": list(command.argv), "env": _step_env(settings, name, env)}
    return _job(settings, "check", name, container, {}, command.timeout_seconds, {})


def volume_snapshot(
    settings: KubernetesSettings, volume: str, snapshot: str, meta: Mapping[str, str]
) -> Obj:
    """The VolumeSnapshot ``snapshot`` of volume ``volume``'s PVC."""
    spec: Obj = {"source": {"persistentVolumeClaimName": object_name(settings, volume)}}
    if settings.snapshot_class:
        spec["volumeSnapshotClassName"] = settings.snapshot_class
    snapshot_metadata = metadata(settings, Kind.SNAPSHOT.value, snapshot, meta)
    if per_clone(settings):  # its roles were sealed: clones of it can get per-clone passwords
        snapshot_metadata["annotations"][credentials_annotation(settings)] = "per-clone"
    return {
        "apiVersion": f"{SNAPSHOT_GROUP}/v1",
        "kind": "VolumeSnapshot",
        "metadata": snapshot_metadata,
        "spec": spec,
    }


def failed_snapshot_record(settings: KubernetesSettings, name: str, meta: Mapping[str, str]) -> Obj:
    """A ConfigMap that holds only a failed snapshot's meta (no data, nothing to clone)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(settings, Kind.SNAPSHOT.value, name, meta),
        "data": {},
    }


def lease(
    name: str,
    *,
    holder: str,
    duration_seconds: float,
    renew_time: str,
    acquire_time: str | None,
    transitions: int | None,
    resource_version: str | None = None,
) -> Obj:
    """The leader-election Lease, built from known fields only (never echoing what was read).

    ``acquire_time`` and ``transitions`` are set when the holder changes; a
    ``resource_version`` makes the write a compare-and-set.
    """
    spec: Obj = {
        "holderIdentity": holder,
        "leaseDurationSeconds": max(1, math.ceil(duration_seconds)),
        "renewTime": renew_time,
    }
    if acquire_time is not None:
        spec["acquireTime"] = acquire_time
    if transitions is not None:
        spec["leaseTransitions"] = transitions
    meta: Obj = {"name": name}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def _quantity(value: str) -> int:
    """A storage quantity in bytes (0 when it cannot be read: the other size wins)."""
    try:
        return int(parse_quantity(str(value)))  # type: ignore[no-untyped-call]
    except ValueError:
        return 0
