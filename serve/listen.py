"""Where the server listens: the address, a port nobody else holds, and the TLS files, each checked with a message
that names what is wrong (grpc itself says only "Failed to bind")."""

from __future__ import annotations

import errno
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from ponder.errors import PonderError


@dataclass
class TLSFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # when given, clients must present a certificate signed by it

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: Path, flag: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise PonderError(f"{flag} {str(path)!r}: {exc.strerror or exc}") from None

        key, cert = read(self.key, "--tls-key"), read(self.cert, "--tls-cert")
        ca = read(self.ca, "--tls-ca") if self.ca else None
        self._check_pem(key, cert)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def _check_pem(self, key: bytes, cert: bytes) -> None:
        """grpc reports unusable TLS files only as "Failed to bind"; say which file is wrong and how."""
        if b"-----BEGIN CERTIFICATE-----" not in cert:
            raise PonderError(f"--tls-cert {str(self.cert)!r} is not a PEM certificate (no '-----BEGIN "
                              f"CERTIFICATE-----' line); from DER, convert it with "
                              f"openssl x509 -inform DER -in CERT -out cert.pem")
        if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key):
            raise PonderError(f"--tls-key {str(self.key)!r} is not a PEM private key (no '-----BEGIN ... PRIVATE "
                              f"KEY-----' line)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(self.cert), str(self.key), password=b"")  # never prompts for a password
        except ssl.SSLError as exc:
            raise PonderError(f"--tls-cert {str(self.cert)!r} and --tls-key {str(self.key)!r} must be a PEM "
                              f"certificate and its unencrypted PEM private key: {exc.reason or exc}") from None
        if self.ca:
            try:
                context.load_verify_locations(cafile=str(self.ca))
            except ssl.SSLError as exc:
                raise PonderError(f"--tls-ca {str(self.ca)!r} must hold PEM certificates: "
                                  f"{exc.reason or exc}") from None


def check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise PonderError(f"--address must be HOST:PORT (for example 127.0.0.1:8001), got {address!r}")


def check_port_free(address: str, flag: str = "--address") -> None:
    """Refuse a port another process holds with one clear line (grpc would log a C++ error line before failing)."""
    host, _, port = address.rpartition(":")
    if int(port) == 0:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                              type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise PonderError(f"{flag} {address!r}: cannot resolve {host!r} ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds: a port in TIME_WAIT is free
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            hint = "another process holds the port" if exc.errno == errno.EADDRINUSE else "not this process's to bind"
            raise PonderError(f"cannot listen on {address}: {exc.strerror or exc} ({hint}: choose another with "
                              f"{flag})") from None
