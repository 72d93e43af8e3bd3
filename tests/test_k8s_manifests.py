"""deploy/k8s/*.yaml checked offline: schemas, agreement between manifests, commands that parse.

- Core kinds (StatefulSet, Service, PodDisruptionBudget, Job, PersistentVolumeClaim) against the
  Kubernetes JSON schemas the `kubernetes-validate` package ships, strictly (an unknown field is
  an error), for the oldest release the manifests need (1.33: the Job's successPolicy) and the
  newest the package knows.
- Kubeflow's PyTorchJob (a CRD, not in those schemas): its top level against the small schema
  vendored in tests/schemas/, and each replica's pod template against the Kubernetes schema of a
  core PodTemplate.
- The etcd members agree with each other and with what the trainers dial; every rdzv-launch
  command parses with the real CLI (the PyTorchJob's with the PET_* variables the operator sets);
  the auth Job's script runs against a real TLS etcd.
Nothing here needs a cluster; what does (applying them) is in docs/cluster.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from etcd_binaries import etcdctl_binary
from etcd_harness import EtcdServer
from rdzv_testlib import ROOT

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
PYTORCHJOB_SCHEMA = ROOT / "tests" / "schemas" / "pytorchjob-kubeflow-v1.json"
VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
NAMESPACE = "rdzv"


def documents(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text() if text is None else text) if d]


def validate(doc: dict[str, Any], version: str) -> None:
    """Raises (kubernetes_validate.ValidationError or jsonschema.ValidationError) when invalid."""
    if doc.get("kind") == "PyTorchJob":
        jsonschema.validate(doc, json.loads(PYTORCHJOB_SCHEMA.read_text()))
        for name, replica in doc["spec"]["pytorchReplicaSpecs"].items():
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.lower()},
                        "template": replica["template"]}
            kubernetes_validate.validate(template, version, strict=True)
        return
    kubernetes_validate.validate(doc, version, strict=True)


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in documents(path) if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return found


# ------------------------------------------------------------------------------ schemas


def test_the_manifests_are_there() -> None:
    assert {p.name for p in MANIFESTS} == {"etcd.yaml", "etcd-auth-job.yaml", "train-job.yaml", "train-pytorchjob.yaml"}
    kinds = {d["kind"] for p in MANIFESTS for d in documents(p)}
    assert kinds == {"Service", "PodDisruptionBudget", "StatefulSet", "Job", "PersistentVolumeClaim", "PyTorchJob"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates(path: Path, version: str) -> None:
    for doc in documents(path):
        validate(doc, version)


@pytest.mark.parametrize(("path", "good", "bad"), [
    ("etcd.yaml", "  replicas: 3\n", "  replica: 3\n"),                       # a misspelt field
    ("etcd.yaml", "maxUnavailable: 1", "maxUnavailable: [1]"),                 # a wrong type
    ("train-job.yaml", "  parallelism: 4\n", "  paralelism: 4\n"),
    ("train-job.yaml", "containerPort: 9465", "containerport: 9465"),
    ("train-pytorchjob.yaml", "    minReplicas: 2\n", "    minReplica: 2\n"),  # the CRD's own schema
    ("train-pytorchjob.yaml", "rdzvBackend: etcd", "rdzvBackend: etcd-v3"),
    ("train-pytorchjob.yaml", "containerPort: 9465", "containerport: 9465"),    # inside its pod template
])
def test_a_wrong_field_fails_validation(path: str, good: str, bad: str) -> None:
    text = (K8S / path).read_text()
    assert good in text
    broken = documents(K8S / path, text.replace(good, bad, 1))
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        for doc in broken:
            validate(doc, VERSIONS[-1])


# ------------------------------------------------------------------------------ etcd


def pod_env(env: list[dict[str, Any]], **values: str) -> dict[str, str]:
    """A container's env with Kubernetes' $(VAR) expansion; downward-API values from ``values``."""
    out: dict[str, str] = {}
    for var in env:
        if "value" in var:
            out[var["name"]] = expand(var["value"], out)
        elif var["name"] in values:
            out[var["name"]] = values[var["name"]]
    return out


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def flags(argv: list[str]) -> dict[str, Any]:
    return {a[2:].partition("=")[0]: (a.partition("=")[2] or True) for a in argv if a.startswith("--")}


def mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], {"name": m["name"]}) for m in container.get("volumeMounts", [])}


def secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at ``path`` in the container comes from."""
    for mount_path, volume in mounts(pod, container).items():
        if path.startswith(mount_path + "/") and "secret" in volume:
            name = path[len(mount_path) + 1:]
            items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
            return volume["secret"]["secretName"], items.get(name, name)
    raise AssertionError(f"{path} is not in a Secret mounted into {container['name']}")


def member_names() -> list[str]:
    sts = one("StatefulSet", "rdzv-etcd")
    return [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]


def test_etcd_members_agree() -> None:
    sts = one("StatefulSet", "rdzv-etcd")
    headless = one("Service", sts["spec"]["serviceName"])
    assert sts["spec"]["replicas"] == 3 and headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in by_kind("Service"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
    pdb = one("PodDisruptionBudget", "rdzv-etcd")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1, "a drain may take one member of three: the quorum stays"
    pod = sts["spec"]["template"]["spec"]
    (etcd,) = pod["containers"]
    # Each member's flags, as Kubernetes expands them in that member's pod.
    peers = {}
    for name in member_names():
        env = pod_env(etcd["env"], POD_NAME=name, POD_NAMESPACE=NAMESPACE)
        f = flags([expand(a, env) for a in etcd["command"][1:]])
        fqdn = f"{name}.{headless['metadata']['name']}.{NAMESPACE}.svc"
        assert f["name"] == name
        assert urlsplit(f["advertise-client-urls"]).netloc == f"{fqdn}:2379"
        assert f["initial-advertise-peer-urls"] == f"https://{fqdn}:2380"
        peers[name] = f["initial-advertise-peer-urls"]
        initial = dict(item.split("=", 1) for item in f["initial-cluster"].split(","))
        assert f["client-cert-auth"] is True and f["peer-client-cert-auth"] is True
        for key in ("trusted-ca-file", "cert-file", "key-file", "peer-trusted-ca-file", "peer-cert-file", "peer-key-file"):
            assert secret_file(pod, etcd, f[key])[0] == "rdzv-etcd-tls"
        assert f["data-dir"] in mounts(pod, etcd)
        assert mounts(pod, etcd)[f["data-dir"]]["name"] in {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        assert int(f["quota-backend-bytes"]) >= 2 * 1024**3 and f["auto-compaction-retention"]
    assert initial == peers, "--initial-cluster must list every member at its advertised peer URL"
    # Spread: never two members on one node (the PDB then bounds what a drain takes).
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname" and anti["labelSelector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------------------ the trainers


def endpoints_of(text: str) -> set[str]:
    return {urlsplit(e).hostname or e for e in text.split(",")}


def short_member_names() -> set[str]:
    sts = one("StatefulSet", "rdzv-etcd")
    return {f"{n}.{sts['spec']['serviceName']}" for n in member_names()}


def pytorchjob_env(job: dict[str, Any]) -> dict[str, str]:
    """The PET_* variables Kubeflow's training-operator sets from an elastic policy."""
    policy = job["spec"]["elasticPolicy"]
    env = {
        "PET_RDZV_BACKEND": policy["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"{policy['rdzvHost']}:{policy['rdzvPort']}",
        "PET_RDZV_ID": policy["rdzvId"],
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
        "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
        "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
    }
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    return env


def trainers() -> list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """(name, pod spec, container, the environment the container sees) of each training workload."""
    out = []
    job = one("Job", "rdzv-train")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = pod_env(c["env"], POD_IP="10.1.2.3", JOB_NAME=job["metadata"]["name"])
    out.append(("indexed-job", pod, c, env))
    pt = one("PyTorchJob", "rdzv-train-pt")
    pod = pt["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
    out.append(("pytorchjob", pod, c, {**pytorchjob_env(pt), **pod_env(c["env"], POD_IP="10.1.2.3")}))
    return out


@pytest.mark.parametrize("workload", ["indexed-job", "pytorchjob"])
def test_training_commands_parse_with_rdzv_launch(workload: str, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    import launcher.config as config
    import launcher.rendezvous_choice as rendezvous_choice
    from launcher.cli import PROG, parse
    from rdzv.rendezvous import settings as rdzv_settings

    name, pod, container, env = next(t for t in trainers() if t[0] == workload)
    monkeypatch.setattr(rendezvous_choice, "check_reachable", lambda eps, timeout, what: None)
    monkeypatch.chdir(ROOT)  # the image's WORKDIR holds the repository's files
    for key in list(os.environ):
        if key.startswith(("PET_", "TORCHELASTIC_", "RDZV_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert container["command"] == ["rdzv-launch"]
    parsed = parse([expand(a, env) for a in container["args"]], PROG)
    assert isinstance(parsed, tuple), f"{name}: rdzv-launch answered {parsed} instead of running"
    values, given = parsed
    s = config.build_settings(values, given, values["legacy_local_rank"])
    assert s.backend == "etcd" and (s.min_nodes, s.max_nodes) == (2, 4)
    assert s.local_addr == "10.1.2.3"
    assert s.run_id in ("rdzv-train", "rdzv-train-pt")
    assert endpoints_of(s.endpoint) == short_member_names(), "every etcd member, by its stable name"
    assert all(e.startswith("https://") for e in s.endpoint.split(","))
    assert s.metrics_port == 9465 and int(container["ports"][0]["containerPort"]) == 9465
    # TLS files and the password come from Secrets mounted into the pod.
    conf = s.rdzv_configs
    assert {secret_file(pod, container, conf[k]) for k in ("cacert", "cert", "key")} == {
        ("rdzv-etcd-client-tls", "ca.crt"), ("rdzv-etcd-client-tls", "client.crt"), ("rdzv-etcd-client-tls", "client.key")}
    assert secret_file(pod, container, conf["password_file"]) == ("rdzv-etcd-auth", "team-a-password")
    assert conf["user"] == "team-a" and conf["prefix"] == "/team-a"
    # The handler accepts the configuration, every key known (the password file stands in for the Secret's).
    password = tmp_path / "password"
    password.write_text("pw\n")
    params = RendezvousParameters(s.backend, s.endpoint, s.run_id, s.min_nodes, s.max_nodes,
                                  local_addr=s.local_addr, **{**conf, "password_file": str(password)})
    rs = rdzv_settings.parse_settings(params)
    assert rs.access.tls and rs.access.user == "team-a"
    # Checkpoints on the shared volume.
    assert s.lead_args[-1] == "examples/train_ddp.py" and (ROOT / s.lead_args[-1]).is_file()
    ckpt = next(a.split("=", 1)[1] for a in s.script_args if a.startswith("--checkpoint-dir="))
    claim = next(v for p, v in mounts(pod, container).items() if ckpt.startswith(p + "/"))
    assert claim["persistentVolumeClaim"]["claimName"] == one("PersistentVolumeClaim", "rdzv-checkpoints")["metadata"]["name"]
    assert {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim")} == {"rdzv-checkpoints"}


def test_indexed_job_replaces_lost_pods_and_ends_with_the_training() -> None:
    job = one("Job", "rdzv-train")["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 4
    assert job["successPolicy"]["rules"] == [{"succeededCount": 1}]
    ignore = job["podFailurePolicy"]["rules"][0]
    assert ignore["action"] == "Ignore" and ignore["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


# ------------------------------------------------------------------------------ the auth Job


def test_auth_job_script_on_a_real_tls_etcd(tmp_path: Path) -> None:
    from etcd_certs import make_certs

    job = one("Job", "rdzv-etcd-auth")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/bin/sh", "-c"]
    script = c["args"][0]
    spec_env = {e["name"]: e.get("value") for e in c["env"]}
    assert endpoints_of(spec_env["ETCDCTL_ENDPOINTS"]) == short_member_names()
    certs = make_certs(tmp_path / "certs")
    with EtcdServer("3.5", certs=certs) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env.update({k: v for k, v in spec_env.items() if v is not None})
        env.update(ETCDCTL_ENDPOINTS=",".join(server.client_urls),
                   ETCDCTL_CACERT=str(certs.ca_cert), ETCDCTL_CERT=str(certs.client_cert),
                   ETCDCTL_KEY=str(certs.client_key), ROOT_PASSWORD="root-pw", TEAM_PASSWORD="team-pw",
                   PATH=f"{etcdctl_binary().parent}{os.pathsep}{env['PATH']}")

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)

        first = run()
        assert first.returncode == 0, first.stdout + first.stderr
        assert "Authentication Enabled" in first.stdout
        # The team may use its prefix and nothing else.
        server.etcdctl("put", "/team-a/x", "1", user="team-a:team-pw")
        r = subprocess.run([str(etcdctl_binary()), f"--endpoints={env['ETCDCTL_ENDPOINTS']}", f"--cacert={certs.ca_cert}",
                            f"--cert={certs.client_cert}", f"--key={certs.client_key}", "--user=team-a:team-pw",
                            "put", "/team-b/x", "1"], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "permission denied" in r.stderr, r.stderr
        # A rerun (the Job retried, or applied again) leaves the enabled cluster alone.
        again = run()
        assert again.returncode == 0 and "auth already enabled" in again.stdout, again.stdout + again.stderr


def test_the_documented_certificates_name_every_host(tmp_path: Path) -> None:
    """docs/cluster.md's `deploy/gen-certs.sh` command, run as written (into a temp dir), makes a
    server certificate that names every host the manifests dial or advertise."""
    x509 = pytest.importorskip("cryptography.x509")
    docs = (ROOT / "docs" / "cluster.md").read_text()
    match = re.search(r"^deploy/gen-certs\.sh deploy/certs((?: \\\n|[^\n])*)$", docs, re.M)
    assert match, "the gen-certs command of the Kubernetes walkthrough"
    sans = match.group(1).replace("\\\n", " ").split()
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-certs.sh"), str(tmp_path), *sans], check=True,
                   capture_output=True, timeout=60)
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    dns = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    dialed = set().union(*(endpoints_of(expand(a, env).split("=", 1)[1]) for _, _, c, env in trainers()
                           for a in c["args"] if a.startswith("--rdzv-endpoint=")))
    (auth,) = one("Job", "rdzv-etcd-auth")["spec"]["template"]["spec"]["containers"]
    dialed |= endpoints_of(next(e["value"] for e in auth["env"] if e["name"] == "ETCDCTL_ENDPOINTS"))
    sts = one("StatefulSet", "rdzv-etcd")
    (etcd,) = sts["spec"]["template"]["spec"]["containers"]
    advertised = set()
    for name in member_names():
        env = pod_env(etcd["env"], POD_NAME=name, POD_NAMESPACE=NAMESPACE)
        f = flags([expand(a, env) for a in etcd["command"][1:]])
        advertised |= {urlsplit(f[k]).hostname for k in ("advertise-client-urls", "initial-advertise-peer-urls")}
    assert dialed == short_member_names()
    assert dialed | advertised <= dns, (dialed | advertised) - dns
