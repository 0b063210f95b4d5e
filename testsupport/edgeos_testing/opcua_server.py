"""A real asyncua OPC UA server on loopback for tests, the HIL default rig and benchmarks.

:class:`OpcUaTestServer` runs on the caller's event loop; :class:`OpcUaServerThread` runs one
on a daemon thread with its own loop so several tests (each with its own loop) can share a
server that takes a second or two to start. :func:`generate_certificate` makes the
self-signed application instance certificates OPC UA security needs.

Variables live in the namespace :data:`NAMESPACE_URI` (index 2 on a fresh server) with string
node ids, so ``ns=2;s=<name>`` stays the same across restarts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "NAMESPACE_URI",
    "OpcUaServerThread",
    "OpcUaTestServer",
    "ServerCounters",
    "Variable",
    "generate_certificate",
]

NAMESPACE_URI = "urn:edgeos:testing"
SERVER_URI = "urn:edgeos:testing:server"

_T = TypeVar("_T")

_VARIANT: dict[str, tuple[ua.VariantType, int]] = {
    "int16": (ua.VariantType.Int16, ObjectIds.Int16),
    "uint16": (ua.VariantType.UInt16, ObjectIds.UInt16),
    "int32": (ua.VariantType.Int32, ObjectIds.Int32),
    "uint32": (ua.VariantType.UInt32, ObjectIds.UInt32),
    "int64": (ua.VariantType.Int64, ObjectIds.Int64),
    "float32": (ua.VariantType.Float, ObjectIds.Float),
    "float64": (ua.VariantType.Double, ObjectIds.Double),
    "bool": (ua.VariantType.Boolean, ObjectIds.Boolean),
    "string": (ua.VariantType.String, ObjectIds.String),
}
#: asyncua checks a parent's children linearly when adding a node; folders keep it fast.
_FOLDER_SIZE = 100
_ACCESS_READ = 1
_ACCESS_READ_WRITE = 3


def _node(identifier: int | str, namespace: int = 0) -> ua.NodeId:
    # asyncua annotates NodeId fields with NewTypes (Int16, String…); plain values are fine.
    return ua.NodeId(cast(Any, identifier), cast(Any, namespace))


@dataclass(frozen=True, slots=True)
class Variable:
    """One server variable: name (its string node id), edgeos data type, initial value."""

    name: str
    dtype: str
    value: Any
    writable: bool = True


@dataclass(slots=True)
class ServerCounters:
    """Service calls that touched the test namespace (the client's status probes excluded)."""

    read_requests: int = 0
    nodes_read: int = 0
    write_requests: int = 0
    nodes_written: int = 0


class _PasswordUsers:
    """asyncua user manager: a fixed table of user → password."""

    def __init__(self, users: Mapping[str, str], allow_anonymous: bool) -> None:
        self._users = dict(users)
        self._anonymous = allow_anonymous

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self._anonymous else None
        if self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaTestServer:
    """An asyncua server bound to 127.0.0.1 (port 0 = ephemeral, read back after start).

    ``certificate``/``private_key`` enable Basic256Sha256 Sign and SignAndEncrypt next to
    None; ``users`` enables user/password login (anonymous stays allowed unless
    ``allow_anonymous=False``).
    """

    def __init__(
        self,
        variables: Iterable[Variable] = (),
        *,
        port: int = 0,
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        self.variables = {v.name: v for v in variables}
        self._requested_port = port
        self._certificate = certificate
        self._private_key = private_key
        self._users = users
        self._allow_anonymous = allow_anonymous
        self._server: Server | None = None
        self.namespace_index = 2
        self.counters = ServerCounters()
        self._port = 0

    @property
    def server(self) -> Server:
        """The asyncua server (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self._port}/edgeos/test"

    def node_id(self, name: str) -> str:
        """``ns=2;s=name``: the configuration form of a variable's node id."""
        return f"ns={self.namespace_index};s={name}"

    def ua_node_id(self, name: str) -> ua.NodeId:
        return _node(name, self.namespace_index)

    async def start(self) -> None:
        """Build the address space and listen; the port is known afterwards."""
        user_manager = (
            _PasswordUsers(self._users, self._allow_anonymous) if self._users is not None else None
        )
        server = Server(user_manager=user_manager)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self._requested_port}/edgeos/test")
        await server.set_application_uri(SERVER_URI)
        server.set_server_name("edgeos test server")
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self._certificate is not None and self._private_key is not None:
            await server.load_certificate(str(self._certificate))
            await server.load_private_key(str(self._private_key))
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        server.set_security_policy(policies)
        tokens: list[type] = []
        if self._allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if self._users is not None:
            tokens.append(ua.UserNameIdentityToken)
        server.set_identity_tokens(tokens)
        self.namespace_index = await server.register_namespace(NAMESPACE_URI)
        await self._add_variables(server, list(self.variables.values()))
        server.subscribe_server_callback(CallbackType.PreRead, self._count_read)
        server.subscribe_server_callback(CallbackType.PreWrite, self._count_write)
        await server.start()
        assert server.bserver is not None
        self._port = int(server.bserver.port)
        self._server = server

    async def stop(self) -> None:
        """Stop listening and drop every client connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
            # asyncua keeps sessions that have subscriptions alive after their connection
            # drops (for reactivation) and does not end them on stop(); a stopped server
            # must not leave their timers running, and a restart must forget them.
            sessions = list(server.iserver._external_sessions.values())
            for session in sessions:
                await session.close_session(True)

    async def __aenter__(self) -> OpcUaTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _add_variables(self, server: Server, variables: list[Variable]) -> None:
        idx = self.namespace_index
        folders = []
        for f in range(0, len(variables), _FOLDER_SIZE):
            folders.append(
                await server.nodes.objects.add_folder(_node(f"folder{f}", idx), f"folder{f}")
            )
        items = []
        for i, var in enumerate(variables):
            vtype, type_id = _VARIANT[var.dtype]
            attrs = ua.VariableAttributes()
            attrs.DisplayName = ua.LocalizedText(var.name)
            attrs.Value = ua.Variant(var.value, vtype)
            attrs.DataType = _node(type_id)
            attrs.ValueRank = -1
            access = _ACCESS_READ_WRITE if var.writable else _ACCESS_READ
            attrs.AccessLevel = access
            attrs.UserAccessLevel = access
            item = ua.AddNodesItem()
            item.RequestedNewNodeId = _node(var.name, idx)
            item.BrowseName = ua.QualifiedName(var.name, idx)
            item.NodeClass = ua.NodeClass.Variable
            item.ParentNodeId = folders[i // _FOLDER_SIZE].nodeid
            item.ReferenceTypeId = _node(ObjectIds.HasComponent)
            item.TypeDefinition = _node(ObjectIds.BaseDataVariableType)
            item.NodeAttributes = attrs
            items.append(item)
        if items:
            results = await server.iserver.isession.add_nodes(items)
            bad = [r for r in results if not r.StatusCode.is_good()]
            if bad:
                raise RuntimeError(f"could not add {len(bad)} variables: {bad[0].StatusCode}")

    def _in_namespace(self, node_ids: Iterable[ua.NodeId]) -> int:
        return sum(1 for n in node_ids if n.NamespaceIndex == self.namespace_index)

    def _count_read(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        ours = self._in_namespace(r.NodeId for r in event.request_params.NodesToRead)
        if ours:
            self.counters.read_requests += 1
            self.counters.nodes_read += ours

    def _count_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        ours = self._in_namespace(w.NodeId for w in event.request_params.NodesToWrite)
        if ours:
            self.counters.write_requests += 1
            self.counters.nodes_written += ours

    async def set_value(
        self,
        name: str,
        value: Any,
        *,
        status: int = 0,
        source_time: dt.datetime | None = None,
    ) -> None:
        """Change a variable server-side (subscribers are notified)."""
        vtype, _ = _VARIANT[self.variables[name].dtype]
        bad = bool(status & 0x80000000)
        variant = ua.Variant(None, ua.VariantType.Null) if bad else ua.Variant(value, vtype)
        now = dt.datetime.now(dt.UTC)
        await self.server.write_attribute_value(
            self.ua_node_id(name),
            ua.DataValue(
                variant,
                StatusCode=ua.StatusCode(cast(Any, status)),
                SourceTimestamp=cast(Any, source_time or now),
                ServerTimestamp=cast(Any, now),
            ),
        )

    def value(self, name: str) -> Any:
        """The current value of a variable, read directly from the address space."""
        dv = self.server.read_attribute_value(self.ua_node_id(name))
        return dv.Value.Value if dv.Value is not None else None


class OpcUaServerThread:
    """Runs an :class:`OpcUaTestServer` on a daemon thread with its own event loop.

    Use from synchronous fixtures (``start``/``stop``) and reach the server from any loop with
    ``await thread.call(lambda server: server.set_value(...))``.
    """

    def __init__(self, server: OpcUaTestServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="opcua-test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self, timeout: float = 60.0) -> OpcUaServerThread:
        self._thread.start()
        self._submit(self.server.start()).result(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        try:
            self._submit(self.server.stop()).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def _submit(self, coro: Awaitable[_T]) -> Future[_T]:
        async def wrapper() -> _T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop)

    async def call(self, fn: Callable[[OpcUaTestServer], Awaitable[_T]]) -> _T:
        """Run ``fn(server)`` on the server's loop and await its result from this loop."""
        return await asyncio.wrap_future(self._submit(fn(self.server)))

    def call_sync(self, fn: Callable[[OpcUaTestServer], _T]) -> _T:
        """Run a plain function on the server's loop (for reads of server state)."""

        async def run() -> _T:
            return fn(self.server)

        return self._submit(run()).result(30)


def generate_certificate(
    directory: Path,
    name: str,
    application_uri: str,
    *,
    hostname: str | None = None,
    days: int = 30,
) -> tuple[Path, Path]:
    """Write a self-signed OPC UA application instance certificate and its key (PEM).

    The application URI goes into subjectAltName (OPC UA Part 6 requires it), with the host
    name and 127.0.0.1; the key file is written with mode 600. Returns ``(cert, key)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    host = hostname or socket.gethostname()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeos tests"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(application_uri),
                    x509.DNSName(host),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.cert.pem"
    key_path = directory / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
