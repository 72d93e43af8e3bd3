"""docker-compose.yml (and its TLS override) checked without Docker.

Structure, names and ports must agree between the etcd members, their health checks, the
endpoints the trainers use and the certificates deploy/gen-certs.sh makes; every `rdzv-launch`
command must parse with our CLI (in-process, nothing is launched). The files are read with
PyYAML when it is installed, else with the small parser below (which handles the subset of YAML
the compose files keep to; a test holds the two to the same answer).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from rdzv_testlib import ROOT

BASE = ROOT / "docker-compose.yml"
TLS = ROOT / "docker-compose.tls.yml"
GEN_CERTS = ROOT / "deploy" / "gen-certs.sh"
ETCD_IMAGE_RE = re.compile(r"^quay\.io/coreos/etcd:v3\.5\.\d+$")
CLIENT_PORT = 2379
PEER_PORT = 2380


# ------------------------------------------------------------------------------ a small YAML reader


def _strip_comment(line: str) -> str:
    quote: str | None = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _split_flow(text: str) -> list[str]:
    items, current, quote, depth = [], [], None, 0
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch in "[{":
            depth += 1
            current.append(ch)
        elif ch in "]}":
            depth -= 1
            current.append(ch)
        elif ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        items.append("".join(current).strip())
    return items


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item) for item in _split_flow(text[1:-1])]
    if text.startswith("{") and text.endswith("}"):
        out = {}
        for item in _split_flow(text[1:-1]):
            key, _, value = item.partition(":")
            out[str(_scalar(key))] = _scalar(value)
        return out
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return json.loads(text)
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    if text in ("", "~", "null"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return text


_KEY_RE = re.compile(r"""^("[^"]*"|'[^']*'|[^\s"'\[{#-][^:]*|-[^\s:][^:]*):(\s+|$)""")


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and sequences, flow sequences/mappings of scalars, quoted and plain scalars.

    No anchors, tags, multi-line or block scalars, multiple documents: the compose files use none.
    """
    lines = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"tab in indentation: {raw!r}")
        body = _strip_comment(raw)
        if body.strip():
            lines.append((len(body) - len(body.lstrip(" ")), body.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(i, indent)
        return mapping(i, indent)

    def sequence(i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
            item = lines[i][1][1:].strip()
            if not item:
                value, i = block(i + 1, lines[i + 1][0])
            elif _KEY_RE.match(item):
                # "- key: value" opens a mapping whose keys sit two columns in.
                lines[i] = (indent + 2, item)
                value, i = mapping(i, indent + 2)
            else:
                value, i = _scalar(item), i + 1
            out.append(value)
        return out, i

    def mapping(i: int, indent: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            m = _KEY_RE.match(lines[i][1])
            if not m:
                raise ValueError(f"expected 'key:' at indent {indent}: {lines[i][1]!r}")
            key = str(_scalar(m.group(1)))
            rest = lines[i][1][m.end() :].strip()
            i += 1
            if rest:
                out[key] = _scalar(rest)
            elif i < len(lines) and (
                lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))
            ):
                out[key], i = block(i, lines[i][0])
            else:
                out[key] = None
        return out, i

    if not lines:
        return None
    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"could not read from line {lines[end][1]!r}")
    return value


def load_yaml(path: Path) -> Any:
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        return parse_yaml_subset(text)
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------ compose semantics

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$ in every string."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1) or m.group(4)
            op, default = m.group(2), m.group(3)
            if name in env and not (op == ":-" and env[name] == ""):
                return env[name]
            if op is None:
                raise AssertionError(f"${{{name}}} has no default: compose would use an empty string")
            return default

        return _VAR_RE.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _volume_target(spec: Any) -> str:
    if isinstance(spec, dict):
        return str(spec["target"])
    parts = str(spec).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override` for what our files use: mappings merge, command and
    health-check tests are replaced, volumes merge by container path, ports add up."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_volume_target(v): v for v in base}
        by_target.update({_volume_target(v): v for v in override})
        return list(by_target.values())
    if key == "ports" and isinstance(base, list) and isinstance(override, list):
        return base + [p for p in override if p not in base]
    return override


def flags(argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            out[name] = value if sep else True
    return out


@pytest.fixture(scope="module")
def stacks() -> dict[str, dict[str, Any]]:
    base = load_yaml(BASE)
    tls = load_yaml(TLS)
    return {"plain": interpolate(base, {}), "tls": interpolate(merge(base, tls), {})}


def services(stack: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in stack["services"].items()
        if (kind == "etcd") == str(svc.get("image", "")).startswith("quay.io/coreos/etcd")
    }


# ------------------------------------------------------------------------------ tests


def test_small_parser_reads_the_files_as_pyyaml_does() -> None:
    yaml = pytest.importorskip("yaml")
    for path in (BASE, TLS):
        text = path.read_text()
        assert parse_yaml_subset(text) == yaml.safe_load(text), path.name


def test_small_parser_subset() -> None:
    text = """
a: 1            # comment
b: "x # not a comment"
c:
  - one
  - "two: 2"
  - k: v
    n: [1, "b", c]
d:
- x
e: {p: q}
f:
"""
    assert parse_yaml_subset(text) == {
        "a": 1, "b": "x # not a comment", "c": ["one", "two: 2", {"k": "v", "n": [1, "b", "c"]}],
        "d": ["x"], "e": {"p": "q"}, "f": None,
    }


def test_interpolation_defaults_and_overrides() -> None:
    assert interpolate("--rdzv-id=${RDZV_RUN_ID:-demo}", {}) == "--rdzv-id=demo"
    assert interpolate("--rdzv-id=${RDZV_RUN_ID:-demo}", {"RDZV_RUN_ID": "job7"}) == "--rdzv-id=job7"
    assert interpolate("$$HOME", {}) == "$HOME"
    with pytest.raises(AssertionError, match="no default"):
        interpolate("${UNSET_WITHOUT_DEFAULT}", {})


@pytest.mark.parametrize("variant", ["plain", "tls"])
def test_etcd_members_agree(stacks: dict[str, dict[str, Any]], variant: str) -> None:
    stack = stacks[variant]
    scheme = "https" if variant == "tls" else "http"
    etcd = services(stack, "etcd")
    assert len(etcd) == 3, "a 3-member cluster survives the loss of one member"
    declared_volumes = set((stack.get("volumes") or {}).keys())
    peers = {}
    tokens, images, data_volumes = set(), set(), set()
    for name, svc in etcd.items():
        assert ETCD_IMAGE_RE.match(svc["image"]), f"{name}: pin an official 3.5.x image, not {svc['image']}"
        images.add(svc["image"])
        cmd = svc["command"]
        assert isinstance(cmd, list) and cmd[0].endswith("/etcd"), f"{name}: exec-form command running etcd"
        f = flags(cmd[1:])
        assert f["name"] == name == svc.get("hostname", name)
        listen_client = urlsplit(f["listen-client-urls"])
        advertise_client = urlsplit(f["advertise-client-urls"])
        listen_peer = urlsplit(f["listen-peer-urls"])
        advertise_peer = urlsplit(f["initial-advertise-peer-urls"])
        assert listen_client.hostname == "0.0.0.0" and listen_peer.hostname == "0.0.0.0"
        assert listen_client.port == advertise_client.port == CLIENT_PORT
        assert listen_peer.port == advertise_peer.port == PEER_PORT
        assert advertise_client.hostname == advertise_peer.hostname == name
        for url in (listen_client, advertise_client, listen_peer, advertise_peer):
            assert url.scheme == scheme, f"{name}: {url.geturl()} in the {variant} stack"
        peers[name] = f["initial-advertise-peer-urls"]
        tokens.add((f["initial-cluster"], f["initial-cluster-token"], f["initial-cluster-state"]))
        # What a shared rendezvous etcd needs (docs/cluster.md).
        assert f.get("auto-compaction-retention") and f.get("auto-compaction-mode") in ("periodic", "revision")
        assert int(f["quota-backend-bytes"]) >= 2 * 1024**3
        # Data on its own named volume.
        mounts = {_volume_target(v): str(v).split(":")[0] for v in svc["volumes"]}
        assert mounts.get(f["data-dir"]) in declared_volumes, f"{name}: {f['data-dir']} is not on a named volume"
        data_volumes.add(mounts[f["data-dir"]])
        # Health check: exec form (the image has no shell), this member's client port and scheme.
        hc = svc["healthcheck"]
        test = hc["test"]
        assert test[0] == "CMD" and test[1].endswith("etcdctl") and "endpoint" in test and "health" in test
        hc_flags = flags(test[2:])
        hc_url = urlsplit(hc_flags["endpoints"])
        assert (hc_url.scheme, hc_url.port) == (scheme, CLIENT_PORT)
        assert hc_url.hostname in ("127.0.0.1", "localhost", name)
        for port in svc.get("ports", []):
            assert int(str(port).rsplit(":", 1)[1]) == CLIENT_PORT, f"{name}: publishes {port}"
        if variant == "tls":
            assert f["client-cert-auth"] is True and f["peer-client-cert-auth"] is True
            cert_dirs = {_volume_target(v) for v in svc["volumes"] if str(v).startswith("./deploy/certs:")}
            for key in ("trusted-ca-file", "cert-file", "key-file", "peer-trusted-ca-file", "peer-cert-file", "peer-key-file"):
                assert any(f[key].startswith(d + "/") for d in cert_dirs), f"{name}: {key}={f[key]} not in the certs mount"
            assert {Path(hc_flags[k]).name for k in ("cacert", "cert", "key")} == {"ca.crt", "client.crt", "client.key"}
    assert len(images) == 1 and len(tokens) == 1 and len(data_volumes) == 3
    initial = dict(item.split("=", 1) for item in next(iter(tokens))[0].split(","))
    assert initial == peers, "--initial-cluster must list every member at its advertised peer URL"


@pytest.mark.parametrize("variant", ["plain", "tls"])
def test_trainer_commands_parse_with_rdzv_launch(
    stacks: dict[str, dict[str, Any]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    import launcher.config as config
    import launcher.rendezvous_choice as rendezvous_choice
    from launcher.cli import PROG, parse
    from rdzv.rendezvous import settings as rdzv_settings

    stack = stacks[variant]
    etcd = services(stack, "etcd")
    trainers = services(stack, "trainer")
    assert len(trainers) == 2
    advertised = {
        urlsplit(flags(svc["command"][1:])["advertise-client-urls"]).netloc for svc in etcd.values()
    }
    checked: list[tuple[str, int]] = []
    monkeypatch.setattr(rendezvous_choice, "check_reachable", lambda eps, timeout, what: checked.extend(eps))
    monkeypatch.chdir(ROOT)  # the image's WORKDIR holds the repository's files
    known_conf = {f.name for f in fields(rdzv_settings.RendezvousSettings)}
    known_conf |= {a for aliases in rdzv_settings._ALIASES.values() for a in aliases}
    known_conf |= {"password_env", "password_file", "protocol", "username"}

    run_ids, nnodes, checkpoint_dirs = set(), set(), set()
    for name, svc in trainers.items():
        deps = svc["depends_on"]
        assert set(deps) >= set(etcd), f"{name} must wait for every etcd member"
        assert all(deps[e]["condition"] == "service_healthy" for e in etcd)
        cmd = svc["command"]
        assert cmd[0] == "rdzv-launch"
        for key in list(os.environ):
            if key.startswith("PET_"):
                monkeypatch.delenv(key)
        for key, value in (svc.get("environment") or {}).items():
            monkeypatch.setenv(key, str(value))
        parsed = parse(cmd[1:], PROG)
        assert isinstance(parsed, tuple), f"{name}: rdzv-launch answered {parsed} instead of running"
        values, given = parsed
        s = config.build_settings(values, given, values["legacy_local_rank"])
        assert s.backend == "etcd"
        assert s.local_addr == svc["hostname"] == name
        assert s.min_nodes <= len(trainers) <= s.max_nodes
        run_ids.add(s.run_id)
        nnodes.add((s.min_nodes, s.max_nodes))
        # The endpoints are exactly the members, as they advertise themselves.
        given_eps = [e.strip() for e in s.endpoint.split(",")]
        assert {urlsplit(e).netloc if "://" in e else e for e in given_eps} == advertised
        assert {f"{h}:{p}" for h, p in checked} == advertised
        checked.clear()
        # The handler accepts the configuration (known keys, sane values, TLS as intended).
        unknown = set(s.rdzv_configs) - known_conf
        assert not unknown, f"{name}: unknown --rdzv-conf keys {unknown}"
        params = RendezvousParameters(
            s.backend, s.endpoint, s.run_id, s.min_nodes, s.max_nodes, local_addr=s.local_addr, **s.rdzv_configs
        )
        rs = rdzv_settings.parse_settings(params)
        assert set(rs.endpoints) == advertised
        assert rs.access.tls == (variant == "tls")
        mounts = {_volume_target(v): str(v).split(":")[0] for v in svc.get("volumes", [])}
        if variant == "tls":
            files = {"cacert": rs.access.cacert, "cert": rs.access.cert, "key": rs.access.key}
            assert {k: Path(v or "").name for k, v in files.items()} == {
                "cacert": "ca.crt", "cert": "client.crt", "key": "client.key"
            }
            for path in files.values():
                assert mounts.get(str(Path(path or "").parent)) == "./deploy/certs", f"{name}: {path} not mounted"
        # The script and its arguments are what the example accepts.
        assert s.lead_args[-1] == "examples/train_ddp.py" and (ROOT / s.lead_args[-1]).is_file()
        example = _load_example()
        args = example.parse_args(s.script_args)
        assert args.checkpoint_dir is not None
        ckpt_mount = [t for t in mounts if str(args.checkpoint_dir).startswith(t + "/")]
        assert ckpt_mount and mounts[ckpt_mount[0]] in (stack.get("volumes") or {}), f"{name}: checkpoints not on a volume"
        checkpoint_dirs.add((mounts[ckpt_mount[0]], str(args.checkpoint_dir)))
    assert len(run_ids) == 1 and len(nnodes) == 1, "every trainer of one job: the same run id and --nnodes"
    assert len(checkpoint_dirs) == 1, "rank 0 saves, every rank resumes: one shared checkpoint directory"


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_ddp_example", ROOT / "examples" / "train_ddp.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_image_is_documented_and_buildable(stacks: dict[str, dict[str, Any]]) -> None:
    trainers = services(stacks["plain"], "trainer")
    images = {svc["image"] for svc in trainers.values()}
    assert len(images) == 1
    for name, svc in trainers.items():
        build = svc["build"]
        dockerfile = ROOT / build.get("context", ".") / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        text = dockerfile.read_text()
        assert re.search(r"^FROM python:3\.\d+", text, re.M)
        assert "torch==2.13.0" in text and re.search(r"pip install -e \.", text)
        # Sources in the build context must exist (COPY --from=IMAGE copies from another image).
        for src in re.findall(r"^COPY (?!--from=)(\S+) ", text, re.M):
            assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is missing"


def test_generated_certificates_fit_the_tls_stack(stacks: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (deploy/gen-certs.sh needs it)")
    x509 = pytest.importorskip("cryptography.x509")
    out = tmp_path / "certs"
    subprocess.run(["bash", str(GEN_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"):
        assert (out / name).is_file()
        if name.endswith(".key"):
            assert (out / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    stack = stacks["tls"]
    for name, svc in services(stack, "etcd").items():
        assert name in dns, f"server certificate does not cover {name}"
        hc_host = urlsplit(flags(svc["healthcheck"]["test"][2:])["endpoints"]).hostname or ""
        try:
            assert str(ipaddress.ip_address(hc_host)) in ips
        except ValueError:
            assert hc_host in dns
    # A second run keeps the CA (certs already handed out stay valid) and re-issues the leaves.
    ca_before = (out / "ca.crt").read_bytes()
    subprocess.run(["bash", str(GEN_CERTS), str(out), "10.0.0.5"], check=True, capture_output=True, timeout=60)
    assert (out / "ca.crt").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    assert server.issuer == ca.subject
    server_ips = {str(a) for a in server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}
    assert "10.0.0.5" in server_ips


# ------------------------------------------------------------------------------ the compose spec


def compose_spec_errors(text: str) -> list[str]:
    """Where ``text`` breaks the Compose Specification's JSON schema (the copy the maintained
    check-jsonschema package vendors), as "path: message" lines; [] when it conforms."""
    import importlib.resources

    import jsonschema
    import yaml

    schema = json.loads(
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]


@pytest.mark.parametrize("path", [BASE, TLS], ids=lambda p: p.name)
def test_files_conform_to_the_compose_spec(path: Path) -> None:
    assert compose_spec_errors(path.read_text()) == []


@pytest.mark.parametrize(("good", "bad", "where"), [
    ("    stop_grace_period: 40s\n", "    stop_grace_perod: 40s\n", "services/trainer-1"),  # a misspelt key
    ("        condition: service_healthy\n", "        condition: service_healty\n", "depends_on"),  # not an allowed value
    ("      retries: 12\n", "      retries: [12]\n", "healthcheck/retries"),                # a wrong type
])
def test_a_wrong_field_breaks_the_compose_spec(good: str, bad: str, where: str) -> None:
    text = BASE.read_text()
    assert good in text
    errors = compose_spec_errors(text.replace(good, bad, 1))
    assert errors and any(where in e for e in errors), errors
