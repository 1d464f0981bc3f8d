"""The local S3 server (`services.local_s3`, what `make demo`, `make up` and the tests start) exposes S3 alone,
keys required: through every other port and Unix socket that SeaweedFS opens, an unauthenticated read or
write is refused or cannot even be spoken.

The ports are read from the running process (its listening sockets in /proc), not from a list, so a server
that a new SeaweedFS version adds is probed too. Each is tried as HTTP (filer upload and download, WebDAV
PUT, the master's assign and submit, a volume server's needle read and write, directory listings) and as
gRPC without a certificate, with the wrong CA's and with a certificate from another CA (filer lookup and
create, master assign, volume status). A control server started as before this hardening (`weed mini` with
no security configuration) shows that the same probes do find open doors: they can fail.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import socket
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import boto3
import botocore
import botocore.config
import grpc
import pytest

from trafficwatch import services
from trafficwatch.config import environ

pytestmark = pytest.mark.integration

BUCKET = "trafficwatch"
PAYLOAD_KEY = "raw/date=2024-08-26/20240826T104300Z.json.gz"
TIMEOUT_S = 3


@dataclass
class Server:
    home: Path
    port: int
    keys: dict[str, str]
    payload: bytes
    security_dir: Path | None
    tcp_ports: set[int] = field(default_factory=set)
    unix_sockets: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def s3(self, **overrides: str) -> object:
        keys = {"aws_access_key_id": self.keys["AWS_ACCESS_KEY_ID"]}
        keys["aws_secret_access_key"] = self.keys["AWS_SECRET_ACCESS_KEY"]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", **{**keys, **overrides})

    def keys_listed(self) -> set[str]:
        listing = self.s3().list_objects_v2(Bucket=BUCKET)
        return {item["Key"] for item in listing.get("Contents", [])}


# --------------------------------------------------------------------------- the process's listening sockets


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_sockets(pid: int) -> tuple[set[int], set[str]]:
    """TCP ports and Unix socket paths on which process `pid` listens."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
            paths.add(fields[7])
    return ports, paths


# --------------------------------------------------------------------------- probes


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(self.path)


def _http(where: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body) or None when nothing answered as HTTP."""
    if where.startswith("unix:"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(where[len("unix:") :])
    else:
        conn = http.client.HTTPConnection("127.0.0.1", int(where.split(":")[1]), timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _multipart(name: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def http_breaches(server: Server, where: str, fids: list[str]) -> list[str]:
    """What an HTTP client without credentials managed through `where`: reads of the payload, then writes."""
    found = []
    tag = where.replace("/", "_").replace(":", "-")
    intruder = f"raw/intruder-{tag}.json"
    upload, upload_headers = _multipart("intruder.json", b'{"intruder": true}')
    writes = [
        ("POST", f"/buckets/{BUCKET}/{intruder}", upload, upload_headers),  # filer upload
        ("PUT", f"/buckets/{BUCKET}/{intruder}", b'{"intruder": true}', {}),  # filer / WebDAV PUT
        ("PUT", f"/{BUCKET}/{intruder}", b'{"intruder": true}', {}),  # unsigned S3-style PUT
        ("POST", "/submit", upload, upload_headers),  # master: assign and upload in one
    ]
    for fid in fids:  # a new needle beside the payload's, on its volume
        volume = fid.split(",")[0]
        writes.append(
            ("POST", f"/{volume},{secrets.randbelow(2**32):x}{secrets.randbelow(2**32):08x}", upload, upload_headers)
        )
        writes.append(("DELETE", f"/{fid}", None, {}))
    reads = [f"/buckets/{BUCKET}/{PAYLOAD_KEY}", f"/{BUCKET}/{PAYLOAD_KEY}", *(f"/{fid}" for fid in fids)]
    for path in reads:
        answer = _http(where, "GET", path)
        if answer and server.payload[:64] in answer[1]:
            found.append(f"{where}: GET {path} returned the object")
    for path in (f"/buckets/{BUCKET}/raw/date=2024-08-26/", f"/{BUCKET}/raw/"):  # listings name the objects
        answer = _http(where, "GET", path, headers={"Accept": "application/json"})
        if answer and b"20240826T104300Z" in answer[1]:
            found.append(f"{where}: GET {path} listed the objects")
    for method, path, body, headers in writes:
        answer = _http(where, method, path, body, headers)
        if answer and 200 <= answer[0] < 300:
            found.append(f"{where}: {method} {path} -> {answer[0]}")
    answer = _http(where, "GET", "/dir/assign")
    if answer and b'"fid"' in answer[1]:
        found.append(f"{where}: GET /dir/assign handed out a file id")
    return found


def _pb_string(number: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


GRPC_CALLS = {  # name: (method, request)
    "filer lookup": (
        "/filer_pb.SeaweedFiler/LookupDirectoryEntry",
        _pb_string(1, f"/buckets/{BUCKET}/{PAYLOAD_KEY.rsplit('/', 1)[0]}")
        + _pb_string(2, PAYLOAD_KEY.rsplit("/", 1)[1]),
    ),
    "filer create": (
        "/filer_pb.SeaweedFiler/CreateEntry",
        _pb_string(1, f"/buckets/{BUCKET}/raw") + _pb_string(2, _pb_string(1, "intruder-grpc.json")),
    ),
    "master assign": ("/master_pb.Seaweed/Assign", b""),
    "volume status": ("/volume_server_pb.VolumeServer/VolumeServerStatus", b""),
}


def grpc_call(target: str, method: str, request: bytes, credentials: grpc.ChannelCredentials | None) -> bytes:
    options = [("grpc.ssl_target_name_override", "localhost")]
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        return channel.unary_unary(method)(request, timeout=TIMEOUT_S)


def foreign_credentials(tmp_path: Path, server_ca: bytes | None) -> dict[str, grpc.ChannelCredentials | None]:
    """The ways in without the server's own client certificate: plain text, TLS with no certificate (trusting
    the server's CA, or not), TLS with a certificate that another CA signed."""
    other = services.write_seaweedfs_security(tmp_path / "other-ca")
    other_cert, other_key = (other.parent / "seaweedfs.crt").read_bytes(), (other.parent / "seaweedfs.key").read_bytes()
    return {
        "plain": None,
        "tls, no certificate": grpc.ssl_channel_credentials(root_certificates=server_ca),
        "tls, another CA's certificate": grpc.ssl_channel_credentials(server_ca, other_key, other_cert),
    }


def grpc_breaches(where: str, ways_in: dict[str, grpc.ChannelCredentials | None]) -> list[str]:
    """gRPC calls that a server behind `where` answered at all (any status but UNAVAILABLE: it spoke)."""
    target = where if where.startswith("unix:") else f"127.0.0.1:{where.split(':')[1]}"
    found = []
    for way, credentials in ways_in.items():
        for name, (method, request) in GRPC_CALLS.items():
            try:
                grpc_call(target, method, request, credentials)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                found.append(f"{where}: gRPC {name} ({way}) answered {error.code().name}")
            else:
                found.append(f"{where}: gRPC {name} ({way}) succeeded")
    return found


def payload_fids(server: Server, credentials: grpc.ChannelCredentials | None) -> list[str]:
    """The volume file ids holding the payload, asked of the filer as its owner would."""
    filer_grpc = f"127.0.0.1:{server.port + 10002}"
    method, request = GRPC_CALLS["filer lookup"]
    answer = grpc_call(filer_grpc, method, request, credentials)
    return sorted({match.decode() for match in re.findall(rb"\b(\d+,[0-9a-f]{9,})", answer)})


def all_breaches(server: Server, fids: list[str], ways_in: dict) -> list[str]:
    found = []
    for port in sorted(server.tcp_ports - {server.port}):
        found += http_breaches(server, f"tcp:{port}", fids)
        found += grpc_breaches(f"tcp:{port}", ways_in)
    for path in sorted(server.unix_sockets):
        if "grpc" in path:
            found += grpc_breaches(f"unix:{path}", ways_in)
        else:
            found += http_breaches(server, f"unix:{path}", fids)
    return found


# --------------------------------------------------------------------------- servers


def _start(home: Path, service: services.Service, port: int, security_dir: Path | None) -> Iterator[Server]:
    keys = {"AWS_ACCESS_KEY_ID": "sec" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24)}
    boto3.DEFAULT_SESSION = None  # it caches the first keys it resolved
    try:
        with environ(keys):  # what weed and the readiness check read, as make's scripts/env.sh sets them
            try:
                pid = services.start(service, home)
                payload = b"TW-PAYLOAD-" + secrets.token_hex(16).encode() + b"\n" + os.urandom(4096).hex().encode()
                server = Server(home, port, keys, payload, security_dir)
                server.s3().put_object(Bucket=BUCKET, Key=PAYLOAD_KEY, Body=payload)
                server.tcp_ports, server.unix_sockets = listening_sockets(pid)
                yield server
            finally:
                services.stop(home, service.name)
    finally:
        boto3.DEFAULT_SESSION = None


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The local S3 server exactly as `make demo` starts it (services.local_s3), on free ports."""
    home = tmp_path_factory.mktemp("s3-hardened")
    port = services.free_s3_port()
    service = services.local_s3(home / "s3", port, BUCKET)
    yield from _start(home, service, port, home / "s3-security")


@pytest.fixture(scope="module")
def unhardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The control: `weed mini` as it was started before (no security configuration, every server on)."""
    home = tmp_path_factory.mktemp("s3-control")
    port = services.free_s3_port()
    data = home / "s3"
    data.mkdir()
    command = [
        services.venv_bin("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-bucket={BUCKET}", f"-s3.port={port}", f"-master.port={port + 1}",
        f"-filer.port={port + 2}", f"-volume.port={port + 3}", f"-admin.port={port + 4}",
        f"-webdav.port={port + 5}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    hardened_service = services.local_s3(data, port, BUCKET)
    service = replace(hardened_service, command=command, prepare=None, umask=-1)
    yield from _start(home, service, port, None)


# --------------------------------------------------------------------------- tests


def test_s3_works_with_the_keys_and_refuses_without(hardened: Server) -> None:
    client = hardened.s3()
    assert client.get_object(Bucket=BUCKET, Key=PAYLOAD_KEY)["Body"].read() == hardened.payload
    client.put_object(Bucket=BUCKET, Key="raw/keyed.json", Body=b"{}")
    with pytest.raises(botocore.exceptions.ClientError):  # conditional puts still enforced
        client.put_object(Bucket=BUCKET, Key="raw/keyed.json", Body=b"{}", IfNoneMatch="*")
    anonymous = hardened.s3(config=botocore.config.Config(signature_version=botocore.UNSIGNED))
    wrong = hardened.s3(aws_secret_access_key=secrets.token_urlsafe(24))
    for stranger in (anonymous, wrong):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            stranger.get_object(Bucket=BUCKET, Key=PAYLOAD_KEY)
        assert refused.value.response["Error"]["Code"] in {"AccessDenied", "SignatureDoesNotMatch"}
        with pytest.raises(botocore.exceptions.ClientError):
            stranger.put_object(Bucket=BUCKET, Key="raw/stranger.json", Body=b"{}")
    assert "raw/stranger.json" not in hardened.keys_listed()


def test_no_other_port_or_socket_reads_or_writes_without_credentials(hardened: Server, tmp_path: Path) -> None:
    # SeaweedFS still opens its master, filer, volume and admin servers, each with a gRPC twin: all are probed.
    assert len(hardened.tcp_ports - {hardened.port}) >= 8, hardened.tcp_ports
    assert hardened.security_dir is not None
    server_ca = (hardened.security_dir / "ca.crt").read_bytes()
    # The owner's certificate reads the filer (the calls are well formed) and gives the payload's volume ids.
    owner = grpc.ssl_channel_credentials(
        server_ca,
        (hardened.security_dir / "seaweedfs.key").read_bytes(),
        (hardened.security_dir / "seaweedfs.crt").read_bytes(),
    )
    fids = payload_fids(hardened, owner)
    assert fids, "the filer named no volume file for the payload"

    breaches = all_breaches(hardened, fids, foreign_credentials(tmp_path, server_ca))

    assert breaches == []
    assert not any("intruder" in key for key in hardened.keys_listed())
    assert hardened.s3().get_object(Bucket=BUCKET, Key=PAYLOAD_KEY)["Body"].read() == hardened.payload


def test_the_probes_find_the_open_doors_of_an_unhardened_server(unhardened: Server, tmp_path: Path) -> None:
    fids = payload_fids(unhardened, None)
    assert fids

    breaches = all_breaches(unhardened, fids, foreign_credentials(tmp_path, None))

    text = "\n".join(breaches)
    filer, volume, webdav = (f"tcp:{unhardened.port + offset}" for offset in (2, 3, 5))
    assert f"{filer}: POST /buckets/{BUCKET}/raw/intruder-" in text  # a write into raw/ through the filer
    assert f"{filer}: GET /buckets/{BUCKET}/{PAYLOAD_KEY} returned the object" in text
    assert f"{volume}: GET /{fids[0]} returned the object" in text
    assert f"{webdav}: PUT /buckets/{BUCKET}/raw/intruder-" in text
    assert f"tcp:{unhardened.port + 10002}: gRPC filer create (plain) succeeded" in text
    assert any(key.startswith("raw/intruder-") for key in unhardened.keys_listed())


def test_its_credentials_and_sockets_are_the_owners_only(hardened: Server) -> None:
    directory = hardened.security_dir
    assert directory is not None and stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = sorted(path.name for path in directory.iterdir())
    assert names == ["ca.crt", "seaweedfs.crt", "seaweedfs.key", "security.toml"]  # no CA key: nothing can sign
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((hardened.home / "s3").stat().st_mode) == 0o700
    assert hardened.unix_sockets, "weed opened no Unix socket: the probe of /proc found nothing"
    for path in hardened.unix_sockets:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path  # others cannot connect
