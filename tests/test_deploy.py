"""The deployment files under deploy/ keep their promises, checked without a cluster.

Kubernetes manifests are validated against the OpenAPI schemas that ship inside
`kubernetes-validate`, in strict mode (an unknown or misspelt field fails);
the rest (Deployment safety settings, cross-references between manifests,
kustomization, Slack manifests, Dockerfile, systemd unit) is asserted here.
"""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UID = 10001
DATA_DIR = "/var/lib/etcd-chatops"
CONFIG_PATH = "/etc/etcd-chatops/config.toml"
CERT_DIR = "/etc/etcd-chatops/etcd"
SSH_DIR = "/etc/etcd-chatops/ssh"
PORT = 3000

# The oldest Kubernetes we support, and the newest schema the installed
# kubernetes-validate ships (catches fields removed since).
K8S_VERSIONS = sorted({"1.30.0", kubernetes_validate.utils.latest_version()},
                      key=lambda v: tuple(int(p) for p in v.split(".")))

NOT_APPLIED = {"kustomization.yaml", "secret-example.yaml"}


# ------------------------------------------------------------------ helpers

def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml"))


def all_objects() -> list[dict]:
    return [d for p in manifest_files() if p.name != "kustomization.yaml" for d in load_docs(p)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in all_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def strict_validate(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')} invalid for Kubernetes {version} at {where}: "
                    f"{e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(e.message)


@pytest.fixture(scope="module")
def deployment() -> dict:
    return one("Deployment", "etcd-chatops")


@pytest.fixture(scope="module")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} is not a named port of the container"
    return named[port]


def mount_at(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"expected one volume mounted at {path}, found {len(mounts)}"
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[0]["name"]]
    return mounts[0], volume


# ------------------------------------------------- (a) Kubernetes schemas

def test_there_are_the_expected_manifests():
    names = {p.name for p in manifest_files()}
    assert {"namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "secret-example.yaml", "pvc.yaml",
            "deployment.yaml", "service.yaml", "networkpolicy.yaml", "kustomization.yaml"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [p for p in manifest_files() if p.name != "kustomization.yaml"], ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes_strict(path: Path, version: str):
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"
        strict_validate(doc, version)


def test_strict_validation_catches_a_misspelt_field(deployment):
    """The schema check is not vacuous: one typo in the Deployment fails it."""
    broken = copy.deepcopy(deployment)
    sc = broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFilesytem"] = sc.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_namespaced_objects_carry_no_other_namespace():
    for doc in all_objects():
        ns = doc["metadata"].get("namespace")
        assert ns in (None, "etcd-chatops"), f"{doc['kind']}/{doc['metadata']['name']} is in namespace {ns}"


def test_namespace_enforces_restricted_pod_security():
    ns = one("Namespace")
    assert ns["metadata"]["name"] == "etcd-chatops"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -------------------------------------------- (b) the Deployment's promises

def test_one_replica_recreated_never_rolled(deployment):
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_runs_non_root_with_a_read_only_root(pod, container):
    psc, csc = pod["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == UID and psc["runAsGroup"] == UID and psc["fsGroup"] == UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert not csc["capabilities"].get("add")
    assert csc.get("privileged") in (None, False)
    assert csc.get("runAsUser", UID) == UID


def test_no_kubernetes_api_credentials(pod):
    sa = one("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert not [d for d in all_objects() if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_requests_and_limits_are_set(container):
    res = container["resources"]
    for key in ("cpu", "memory"):
        assert res["requests"][key], f"no {key} request"
        assert res["limits"][key], f"no {key} limit"
    assert res["limits"]["memory"] == "512Mi"
    assert res["requests"]["memory"] == "128Mi"


def test_probes_on_healthz_and_readyz(container):
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert ready["path"] == "/readyz"
    assert port_number(container, live["port"]) == PORT
    assert port_number(container, ready["port"]) == PORT
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Liveness must tolerate a slow answer or two: a restart mid-step costs more.
    assert container["livenessProbe"]["failureThreshold"] >= 3
    assert container["livenessProbe"]["timeoutSeconds"] >= 2


def test_runs_http_mode_on_3000_with_the_mounted_config(container):
    args = container["args"]
    assert args[0] == "run" and "--http" in args
    assert args[args.index("--port") + 1] == str(PORT)
    assert args[args.index("--config") + 1] == CONFIG_PATH
    assert {p["containerPort"] for p in container["ports"]} == {PORT}


def test_state_on_the_pvc(pod, container):
    mount, volume = mount_at(pod, container, DATA_DIR)
    assert not mount.get("readOnly")
    assert "subPath" not in mount
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_tmp_is_an_empty_dir(pod, container):
    _, volume = mount_at(pod, container, "/tmp")
    assert "emptyDir" in volume


def test_config_and_certs_mounted_read_only(pod, container):
    mount, volume = mount_at(pod, container, CONFIG_PATH)
    assert mount["readOnly"] is True and mount["subPath"] == "config.toml"
    cm = one("ConfigMap", volume["configMap"]["name"])
    assert "config.toml" in cm["data"]

    mount, volume = mount_at(pod, container, CERT_DIR)
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o400


def test_the_ssh_launchers_key_and_known_hosts_come_from_a_secret(pod, container):
    """The shipped config uses the ssh launcher: its key and pinned host keys are files of a Secret mounted
    read-only (0400), optional so the other launchers need none, and the config names exactly those files."""
    mount, volume = mount_at(pod, container, SSH_DIR)
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o400 and volume["secret"]["optional"] is True
    secret = one("Secret", volume["secret"]["secretName"])
    cm = one("ConfigMap", mount_at(pod, container, CONFIG_PATH)[1]["configMap"]["name"])
    for cluster in tomllib.loads(cm["data"]["config.toml"])["clusters"]:
        launcher = cluster["launcher"]
        assert launcher["kind"] == "ssh"
        for key in ("key_file", "known_hosts"):
            path = Path(launcher[key])
            assert str(path.parent) == SSH_DIR and path.name in secret["stringData"], f"launcher.{key}: {path}"


def test_env_comes_from_the_example_secret(container):
    secret = one("Secret", "etcd-chatops")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {"SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN"} <= set(refs)
    assert not refs["SLACK_BOT_TOKEN"].get("optional"), "the bot token is always needed"
    for name, ref in refs.items():
        assert ref["name"] == "etcd-chatops"
        assert ref["key"] in secret["stringData"], f"{name}: key {ref['key']} is not in secret-example.yaml"
    literal = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    assert not any(v and v.startswith(("xoxb-", "xapp-")) for v in literal.values()), "a token in plain env"


def test_example_secrets_hold_placeholders_only():
    for secret in (d for d in load_docs(K8S / "secret-example.yaml")):
        assert secret["kind"] == "Secret"
        assert "data" not in secret, "use stringData placeholders, never encoded values"
        for key, value in secret["stringData"].items():
            assert "REPLACE" in value, f"{secret['metadata']['name']}.{key} looks like a real value"


def test_config_points_at_the_mounted_files(pod, container):
    cm = one("ConfigMap", mount_at(pod, container, CONFIG_PATH)[1]["configMap"]["name"])
    config = tomllib.loads(cm["data"]["config.toml"])
    assert config["database"].startswith(DATA_DIR + "/")
    assert config["snapshot_dir"].startswith(DATA_DIR + "/")
    cert_secret = one("Secret", mount_at(pod, container, CERT_DIR)[1]["secret"]["secretName"])
    assert config["clusters"], "no [[clusters]]"
    for cluster in config["clusters"]:
        for key in ("cacert", "cert", "key"):
            path = Path(cluster[key])
            assert str(path.parent) == CERT_DIR, f"clusters.{key} is not under the cert mount"
            assert path.name in cert_secret["stringData"], f"clusters.{key}: {path.name} is not a key of the Secret"


def with_stand_in_files(data: dict, tmp_path: Path) -> dict:
    """A shipped config.toml with its files (certificates, the ssh launcher's key and known_hosts), which exist
    only in the pod, redirected to stand-ins: a generated key, an empty known_hosts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    for cluster in data["clusters"]:
        for name in ("cacert", "cert", "key"):
            stand_in = tmp_path / Path(cluster[name]).name
            stand_in.write_text("stand-in\n")
            cluster[name] = str(stand_in)
        launcher = cluster.get("launcher", {})
        if launcher.get("kind") == "ssh":
            (tmp_path / "id_ed25519").write_bytes(key)
            (tmp_path / "known_hosts").write_text("")
            launcher.update(key_file=str(tmp_path / "id_ed25519"), known_hosts=str(tmp_path / "known_hosts"))
    return data


def test_configmap_config_is_accepted_by_the_bot(pod, container, tmp_path):
    """The shipped config.toml passes the bot's own strict loader (certificate
    paths redirected to stand-in files, since they exist only in the pod)."""
    from bot.config import parse_config

    cm = one("ConfigMap", mount_at(pod, container, CONFIG_PATH)[1]["configMap"]["name"])
    data = tomllib.loads(cm["data"]["config.toml"])
    config = parse_config(with_stand_in_files(data, tmp_path), tmp_path)
    assert str(config.database) == data["database"]
    assert config.clusters and all(c.channels for c in config.clusters)


def test_service_and_networkpolicy_select_the_pod(deployment, container):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one("Service", "etcd-chatops")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80 and port_number(container, port["targetPort"]) == PORT
    np = one("NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_prometheus_scrape_annotations(deployment):
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(PORT)
    assert ann["prometheus.io/path"] == "/metrics"


def test_networkpolicy_allows_exactly_what_the_bot_needs():
    spec = one("NetworkPolicy")["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {(p["protocol"], p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress_ports == {("TCP", PORT)}

    def rules_for(protocol: str, port: int) -> list[dict]:
        return [r for r in spec["egress"]
                if any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in r["ports"])]

    (etcd,) = rules_for("TCP", 2379)
    assert etcd["to"] and all("ipBlock" in peer for peer in etcd["to"]), "etcd egress must be an ipBlock (the nodes)"
    assert all(not peer["ipBlock"]["cidr"].startswith(("0.0.0.0/", "::/")) for peer in etcd["to"])
    assert rules_for("TCP", 443), "no egress to Slack"
    assert rules_for("UDP", 53) and rules_for("TCP", 53), "no DNS"
    (ssh,) = rules_for("TCP", 22)   # the ssh launcher, to the same control-plane nodes only
    assert ssh["to"] == etcd["to"], "SSH egress must go to the etcd members' nodes, nowhere else"
    all_ports = {(p.get("protocol", "TCP"), p["port"]) for r in spec["egress"] for p in r["ports"]}
    assert all_ports == {("TCP", 2379), ("TCP", 22), ("TCP", 443), ("UDP", 53), ("TCP", 53)}


# ---------------------------------------------------- (c) kustomization

def test_kustomization_lists_exactly_the_manifests():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    assert kust["namespace"] == "etcd-chatops"
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists {name}, which does not exist"
    assert "secret-example.yaml" not in listed
    assert set(listed) == {p.name for p in manifest_files()} - NOT_APPLIED


# ---------------------------------------------------- (d) Slack manifests

SCOPES = {"commands", "chat:write", "reactions:read", "usergroups:read", "users:read"}

# The shape of Slack's app manifest (https://api.slack.com/reference/manifests),
# closed where this app uses a section, with Slack's documented length limits.
_URL = {"type": "string", "pattern": r"^https://[^\s/]+(/\S*)?$"}
SLACK_MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["display_information", "features", "oauth_config", "settings"],
    "additionalProperties": False,
    "properties": {
        "_metadata": {"type": "object", "additionalProperties": False,
                      "properties": {"major_version": {"type": "integer", "enum": [1, 2]},
                                     "minor_version": {"type": "integer", "minimum": 0}}},
        "display_information": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 35},
                           "description": {"type": "string", "maxLength": 140},
                           "long_description": {"type": "string", "minLength": 174, "maxLength": 4000},
                           "background_color": {"type": "string", "pattern": r"^#([0-9a-fA-F]{3}){1,2}$"}}},
        "features": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "app_home": {"type": "object", "additionalProperties": False,
                             "properties": {"home_tab_enabled": {"type": "boolean"},
                                            "messages_tab_enabled": {"type": "boolean"},
                                            "messages_tab_read_only_enabled": {"type": "boolean"}}},
                "bot_user": {"type": "object", "required": ["display_name"], "additionalProperties": False,
                             "properties": {"display_name": {"type": "string", "minLength": 1, "maxLength": 80},
                                            "always_online": {"type": "boolean"}}},
                "shortcuts": {"type": "array"},
                "unfurl_domains": {"type": "array"},
                "slash_commands": {
                    "type": "array", "maxItems": 50,
                    "items": {"type": "object", "required": ["command", "description"], "additionalProperties": False,
                              "properties": {"command": {"type": "string", "pattern": r"^/[a-z0-9_-]+$",
                                                         "maxLength": 32},
                                             "description": {"type": "string", "minLength": 1, "maxLength": 2000},
                                             "usage_hint": {"type": "string", "maxLength": 1000},
                                             "should_escape": {"type": "boolean"},
                                             "url": _URL}}}}},
        "oauth_config": {
            "type": "object", "required": ["scopes"], "additionalProperties": False,
            "properties": {"redirect_urls": {"type": "array", "items": _URL},
                           "scopes": {"type": "object", "additionalProperties": False,
                                      "properties": {"bot": {"type": "array", "maxItems": 255, "uniqueItems": True,
                                                             "items": {"type": "string",
                                                                       "pattern": r"^[a-z]+(:[a-z.]+)?$"}},
                                                     "user": {"type": "array"}}}}},
        "settings": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "allowed_ip_address_ranges": {"type": "array", "items": {"type": "string"}},
                "event_subscriptions": {"type": "object", "additionalProperties": False,
                                        "properties": {"request_url": _URL,
                                                       "bot_events": {"type": "array", "maxItems": 100,
                                                                      "uniqueItems": True, "items": {"type": "string"}},
                                                       "user_events": {"type": "array"},
                                                       "metadata_subscriptions": {"type": "array"}}},
                "interactivity": {"type": "object", "required": ["is_enabled"], "additionalProperties": False,
                                  "properties": {"is_enabled": {"type": "boolean"}, "request_url": _URL,
                                                 "message_menu_options_url": _URL}},
                "incoming_webhooks": {"type": "object"},
                "org_deploy_enabled": {"type": "boolean"},
                "socket_mode_enabled": {"type": "boolean"},
                "token_rotation_enabled": {"type": "boolean"},
                "is_hosted": {"type": "boolean"},
                "function_runtime": {"type": "string"}}},
        "functions": {"type": "object"},
        "outgoing_domains": {"type": "array"},
    },
}

SLACK_MANIFESTS = {"slack-app-manifest.yaml": True, "slack-app-manifest-http.yaml": False}


def slack_manifest(name: str) -> dict:
    (doc,) = load_docs(DEPLOY / name)
    return doc


def test_slack_manifest_schema_is_not_vacuous():
    bad = copy.deepcopy(slack_manifest("slack-app-manifest.yaml"))
    bad["features"]["slash_commands"][0]["shouldEscape"] = False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SLACK_MANIFEST_SCHEMA)


@pytest.mark.parametrize("name,socket_mode", SLACK_MANIFESTS.items())
def test_slack_manifest(name: str, socket_mode: bool):
    m = slack_manifest(name)
    jsonschema.validate(m, SLACK_MANIFEST_SCHEMA)
    assert m["display_information"]["name"] == "etcd-chatops"
    assert m["features"]["bot_user"]["display_name"] == "etcd-chatops"

    (cmd,) = m["features"]["slash_commands"]
    assert cmd["command"] == "/etcd"
    assert cmd["usage_hint"]  # every command of the registry: tests/test_shipped_files.py
    assert cmd["should_escape"] is False
    assert cmd["description"]

    assert set(m["oauth_config"]["scopes"]["bot"]) == SCOPES
    assert "user" not in m["oauth_config"]["scopes"], "the app acts as its bot user only"
    settings = m["settings"]
    # the events the listeners of handlers/ take, and interactivity for the buttons and forms
    assert settings["event_subscriptions"]["bot_events"] == ["app_home_opened", "reaction_added"]
    assert settings["interactivity"]["is_enabled"] is True
    assert m["features"]["app_home"]["home_tab_enabled"] is True
    assert settings["org_deploy_enabled"] is False
    assert settings["socket_mode_enabled"] is socket_mode

    urls = [cmd.get("url"), settings["event_subscriptions"].get("request_url"),
            settings["interactivity"].get("request_url")]
    if socket_mode:
        assert urls == [None, None, None], "Socket Mode takes no request URLs"
    else:
        assert all(u == "https://etcd-chatops.example.com/slack/events" for u in urls), urls


def test_slack_manifests_subscribe_to_what_the_listeners_take():
    """The events the listeners of handlers/ register are the manifests' bot events (an event the app is not
    subscribed to never arrives; one nobody listens to is a 404 to Slack), and buttons and forms need
    interactivity on."""
    source = "\n".join(path.read_text() for path in sorted((ROOT / "handlers").glob("*.py")))
    events = sorted(set(re.findall(r'app\.event\("([a-z_]+)"\)', source)))
    assert events == ["app_home_opened", "reaction_added"]
    assert re.search(r"app\.(action|view)\(", source)
    for name in SLACK_MANIFESTS:
        settings = slack_manifest(name)["settings"]
        assert settings["event_subscriptions"]["bot_events"] == events and settings["interactivity"]["is_enabled"]


def test_slack_manifests_differ_only_in_transport():
    sock, http = slack_manifest("slack-app-manifest.yaml"), slack_manifest("slack-app-manifest-http.yaml")
    for m in (sock, http):
        m["settings"].pop("socket_mode_enabled")
        m["settings"]["event_subscriptions"].pop("request_url", None)
        m["settings"]["interactivity"].pop("request_url", None)
        m["features"]["slash_commands"][0].pop("url", None)
    assert sock == http


# ---------------------------------------------------------- (e) Dockerfile

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) and blank lines, also inside continuations
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return out


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (FROM first)."""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for ins, rest in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if ins == "FROM":
            stages.append([])
        if not stages:
            assert ins == "ARG", f"{ins} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        stages[-1].append((ins, rest))
    return args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|build-base|python3?-dev|libc6?-dev|cargo|rustc)\b")


def test_dockerfile_is_multi_stage_with_a_slim_final_stage():
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    final_from = expand(stages[-1][0][1].split()[0], args)
    assert "$" not in final_from, f"unresolved ARG in {final_from}"
    image, _, tag = final_from.partition(":")
    assert image in ("python", "docker.io/library/python"), final_from
    assert re.match(r"^3\.1[1-9](\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?$", tag), \
        f"final stage is not python:3.x-slim: {final_from}"


def test_dockerfile_final_stage_runs_as_uid_10001_without_build_tools():
    _, stages = dockerfile_stages()
    final = stages[-1]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} is not a numeric non-root UID"
    assert int(uid) == UID, "the image's UID differs from the Deployment's runAsUser"
    for ins, rest in final:
        if ins == "RUN" and re.search(r"\b(apt-get|apt|apk|yum|dnf)\b.*\binstall\b", rest):
            assert not BUILD_TOOLS.search(rest), f"build tools installed in the final stage: {rest}"
        if ins == "RUN" and re.search(r"\bpip3?\b.*\binstall\b", rest):
            assert "--no-index" in rest, "the final stage must install prebuilt wheels only (pip install --no-index)"


def test_dockerfile_runtime_contract():
    _, stages = dockerfile_stages()
    final = stages[-1]
    last = {ins: rest for ins, rest in final}
    assert last["ENTRYPOINT"] == '["etcd-chatops"]'
    assert last["CMD"] == '["run", "--http", "--port", "3000"]'
    assert str(PORT) in last["EXPOSE"].split()
    assert last["WORKDIR"].startswith("/")
    assert last["WORKDIR"] == DATA_DIR or last["WORKDIR"] == "/tmp", "WORKDIR must be writable with a read-only root"


def dockerignore_patterns() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches a path or one of its parent directories;
    the last matching pattern wins, and `!` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_state_and_secrets_out_and_the_sources_in():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/config", ".pytest_cache/v/x", "etcd-chatops.db", "x/etcd-chatops.db-wal",
                 "snapshots/prod/a.db", "tests/test_deploy.py", "bot/__pycache__/x.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    _, stages = dockerfile_stages()
    for stage in stages:
        for ins, rest in stage:
            if ins == "COPY" and "--from" not in rest:
                *sources, _dest = shlex.split(rest)
                for src in sources:
                    assert (ROOT / src).exists(), f"COPY {src}: no such file in the repo"
                    assert not ignored(src.removeprefix("./"), patterns), f"COPY {src}: excluded by the dockerignore"
                    for f in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
                        rel = f.relative_to(ROOT).as_posix()
                        assert not ignored(rel, patterns), f"{rel} is needed by the image but ignored"


def test_every_package_of_the_distribution_is_copied():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    _, stages = dockerfile_stages()
    copied = {shlex.split(rest)[0].strip("./") for stage in stages for ins, rest in stage
              if ins == "COPY" and "--from" not in rest}
    assert tops <= copied, f"packages not copied into the build: {tops - copied}"
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert any(readme in shlex.split(rest) for stage in stages for ins, rest in stage if ins == "COPY")


# ---------------------------------------------------------- (f) systemd unit

UNIT = DEPLOY / "systemd" / "etcd-chatops.service"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}: systemd keys may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_runs_http_mode_as_its_own_user():
    svc = unit_settings()["Service"]
    (exec_start,) = svc["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/etcd-chatops/venv/bin/etcd-chatops"
    assert argv[1:3] == ["run", "--http"]
    assert argv[argv.index("--port") + 1] == str(PORT)
    assert argv[argv.index("--config") + 1] == CONFIG_PATH
    assert svc["User"] == ["etcd-chatops"]
    assert svc["EnvironmentFile"] == ["/etc/etcd-chatops/env"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["StateDirectory"] == ["etcd-chatops"]
    assert unit_settings()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_is_hardened():
    svc = unit_settings()["Service"]
    expect = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
              "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}
    for key, value in expect.items():
        assert svc.get(key, [None])[-1] == value, f"{key}={svc.get(key)} (want {value!r})"
    assert DATA_DIR in " ".join(svc["ReadWritePaths"]).split()
    assert "@system-service" in svc["SystemCallFilter"]
    assert "User" in svc and svc["User"] != ["root"]


# ---------------------------------------------------- (f) the HA variant (deploy/kubernetes-ha)

HA = DEPLOY / "kubernetes-ha"


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace/remove, what the overlay's patches use (kustomize applies them the same way)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if op["op"] == "add":
                node.insert(len(node) if last == "-" else int(last), op["value"])
            elif op["op"] == "replace":
                node[int(last)] = op["value"]
            else:
                del node[int(last)]
        elif op["op"] == "remove" or (op["op"] == "replace" and last not in node):
            assert op["op"] == "remove" or last in node, f"{op['path']}: nothing to replace"
            del node[last]
        else:
            node[last] = op["value"]
    return doc


def ha_objects() -> list[dict]:
    """What `kubectl apply -k deploy/kubernetes-ha` applies: the base's objects and the overlay's own, patched."""
    kust = yaml.safe_load((HA / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for name in kust["resources"]:
        path = (HA / name).resolve()
        if path.is_dir():
            base = yaml.safe_load((path / "kustomization.yaml").read_text())
            objects += [d for f in base["resources"] for d in load_docs(path / f)]
        else:
            objects += load_docs(path)
    for patch in kust["patches"]:
        if "patch" in patch:  # a strategic-merge deletion of a whole object
            gone = yaml.safe_load(patch["patch"])
            assert gone.pop("$patch") == "delete"
            before = len(objects)
            objects = [o for o in objects if (o["kind"], o["metadata"]["name"]) != (gone["kind"],
                                                                                    gone["metadata"]["name"])]
            assert len(objects) == before - 1, f"the deletion of {gone['kind']} matched nothing"
            continue
        target = patch["target"]
        (i,) = [i for i, o in enumerate(objects) if o["kind"] == target["kind"]
                and o["metadata"]["name"] == target["name"]]
        objects[i] = json_patch(objects[i], yaml.safe_load((HA / patch["path"]).read_text()))
    return objects


def ha_one(kind: str) -> dict:
    (found,) = [o for o in ha_objects() if o["kind"] == kind]
    return found


def test_ha_json_patch_applies_as_rfc_6902_says():
    doc = {"a": [1, 2], "b": {"c": 1}}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "replace", "path": "/b/c", "value": 2},
                            {"op": "add", "path": "/d", "value": 4}]) == {"a": [1, 2, 3], "b": {"c": 2}, "d": 4}
    with pytest.raises(AssertionError):
        json_patch(doc, [{"op": "replace", "path": "/e", "value": 1}])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ha_objects_are_valid_kubernetes_strict(version: str):
    for doc in ha_objects() + load_docs(HA / "secret-example.yaml"):
        strict_validate(doc, version)


def test_ha_two_replicas_on_different_nodes_rolled_one_at_a_time():
    deployment = ha_one("Deployment")
    spec, labels = deployment["spec"], deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = ha_one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ha_state_in_postgresql_with_the_password_from_a_secret(tmp_path, monkeypatch):
    from bot.config import parse_config

    deployment = ha_one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cm = ha_one("ConfigMap")
    data = tomllib.loads(cm["data"]["config.toml"])
    assert data["database"].startswith("postgresql://") and ":" not in data["database"].split("//")[1].split("@")[0]
    env = {e["name"]: e for e in container["env"]}
    ref = env[data["database_password_env"]]["valueFrom"]["secretKeyRef"]
    (secret,) = load_docs(HA / "secret-example.yaml")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "REPLACE" in secret["stringData"][ref["key"]]
    monkeypatch.setenv(data["database_password_env"], "stand-in-password")
    config = parse_config(with_stand_in_files(data, tmp_path), tmp_path)  # the shipped config passes the loader
    assert config.replicas.lease_seconds * 4 / 3 <= 15  # a dead leader is replaced within 15 s
    # No ReadWriteOnce claim is left to pin both pods to one node: the snapshots are on a ReadWriteMany one.
    claims = [o for o in ha_objects() if o["kind"] == "PersistentVolumeClaim"]
    assert [c["spec"]["accessModes"] for c in claims] == [["ReadWriteMany"]]
    mount, volume = mount_at(pod, container, DATA_DIR)
    assert volume["persistentVolumeClaim"]["claimName"] == claims[0]["metadata"]["name"]
    assert data["snapshot_dir"].startswith(DATA_DIR + "/")


def test_ha_networkpolicy_adds_postgresql_only():
    base = {(p.get("protocol", "TCP"), p["port"]) for r in one("NetworkPolicy")["spec"]["egress"] for p in r["ports"]}
    ha = {(p.get("protocol", "TCP"), p["port"]) for r in ha_one("NetworkPolicy")["spec"]["egress"] for p in r["ports"]}
    assert ha - base == {("TCP", 5432)} and base <= ha
