"""TLS for ``amqps://``: URL query parameters to an ``ssl.SSLContext``, and TLS failures explained.

The parameters are those of RabbitMQ's URI spec
(https://www.rabbitmq.com/docs/uri-query-parameters)::

    amqps://user:pass@host:5671/vhost?cacertfile=ca.pem&certfile=client.pem&keyfile=client.key

- ``cacertfile``: PEM file of CAs to trust besides the system's (the CA of a private broker);
- ``certfile`` and ``keyfile``: our client certificate and its unencrypted key, for a broker
  with ``ssl_options.verify = verify_peer`` and ``fail_if_no_peer_cert = true``;
- ``verify``: ``verify_peer`` (the default: the broker's certificate must chain to a trusted CA
  and name the host we dial) or ``verify_none`` (encrypted, but anyone can pose as the broker);
- ``server_name_indication``: the name to send as SNI and to check the certificate against,
  when it differs from the host in the URL (e.g. dialling an IP address).

pika's ``URLParameters`` does not know these names, so ``split_url`` takes them out before the
URL reaches pika. Only the standard library is used: no pika types in here.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from messages.errors import ConfigError

log = logging.getLogger("dfl.tls")

TLS_PARAMS = ("cacertfile", "certfile", "keyfile", "verify", "server_name_indication")
VERIFY_MODES = ("verify_peer", "verify_none")
# Alerts a broker sends when it refuses our certificate (or our lack of one).
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "UNKNOWN_CA",
                       "BAD_CERTIFICATE", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                       "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_UNKNOWN", "ACCESS_DENIED")


@dataclass(frozen=True)
class TLSOptions:
    """The TLS parameters of an ``amqps://`` URL, checked (files exist, values known)."""

    cacertfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    server_name: str | None = None


def _file(name: str, value: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"--broker: {name} {value!r} is not a file; give {what}")
    return str(path)


def parse_options(query: dict[str, str]) -> TLSOptions:
    """``TLSOptions`` from the TLS parameters in ``query``; ``ConfigError`` for a bad one."""
    verify = query.get("verify", "verify_peer")
    if verify not in VERIFY_MODES:
        raise ConfigError(f"--broker: verify={verify!r}: use {' or '.join(VERIFY_MODES)}")
    if "keyfile" in query and "certfile" not in query:
        raise ConfigError("--broker: keyfile needs certfile (the client certificate it signs)")
    sni = query.get("server_name_indication")
    if sni is not None and not sni:
        raise ConfigError("--broker: server_name_indication is empty; give the host name in "
                          "the broker's certificate")
    ca, cert, key = (query.get(name) for name in ("cacertfile", "certfile", "keyfile"))
    return TLSOptions(
        cacertfile=_file("cacertfile", ca, "the PEM file of the CA that signed the broker's "
                         "certificate") if ca is not None else None,
        certfile=_file("certfile", cert, "the PEM file of this client's certificate")
        if cert is not None else None,
        keyfile=_file("keyfile", key, "the PEM file of the client certificate's key")
        if key is not None else None,
        verify=verify == "verify_peer", server_name=sni)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its TLS parameters (what pika is given), and those parameters.

    Every query parameter may appear once; ``ConfigError`` otherwise.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"--broker: the URL parameter {name} is given twice")
    tls = {name: value for name, value in pairs if name in TLS_PARAMS}
    rest = urlencode([(n, v) for n, v in pairs if n not in TLS_PARAMS])
    return urlunsplit(parts._replace(query=rest)), tls


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, and a
    # daemon would hang; with it, such a key fails to load with an error we can explain.
    return b""


def context(options: TLSOptions) -> ssl.SSLContext:
    """A client ``SSLContext``: system CAs plus ``cacertfile``, our certificate if given.

    Raises ``ConfigError`` (naming the parameter, never a file's contents) for a file that
    is not PEM, a key that does not fit the certificate, or an encrypted key.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if options.cacertfile is not None:
        try:
            ctx.load_verify_locations(cafile=options.cacertfile)
        except ssl.SSLError as exc:
            raise ConfigError(f"--broker: cacertfile {options.cacertfile!r} holds no PEM "
                              f"certificate ({_reason(exc)})") from None
    if options.certfile is not None:
        try:
            ctx.load_cert_chain(options.certfile, options.keyfile, password=_no_password)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"--broker: certfile {options.certfile!r} / keyfile {options.keyfile!r} "
                f"cannot be used ({_reason(exc)}); give PEM files of a certificate and its "
                "unencrypted key") from None
    if not options.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _warn_unverified()
    return ctx


@functools.cache
def _warn_unverified() -> None:
    # Once per process: a daemon reconnects many times, and one warning says it all.
    log.warning("verify=verify_none: the broker's certificate is not checked, so the "
                "connection is encrypted but anyone on the path can pose as the broker")


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words (``KEY_VALUES_MISMATCH`` -> ``key values mismatch``)."""
    reason = getattr(exc, "reason", None)
    return reason.replace("_", " ").lower() if reason else (exc.strerror or str(exc))


def probe(host: str, port: int, ctx: ssl.SSLContext, server_name: str | None,
          timeout: float = 3.0) -> ssl.SSLError | None:
    """The TLS error a broker answers our handshake with, or ``None`` if it does not refuse.

    With TLS 1.3 the server checks our certificate after our side of the handshake is done,
    so its refusal is an alert that pika may lose in a reset stream: it reports only a lost
    connection. Here nothing is sent after the handshake, so the alert arrives intact.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.recv(1)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return None
    except ssl.SSLError as exc:
        return exc
    except OSError:  # refused, reset, timed out: not a TLS verdict
        return None
    return None


def explain(exc: ssl.SSLError, where: str, options: TLSOptions) -> str | None:
    """One line saying why a TLS handshake failed and what to pass; ``None`` when the error
    is a lost connection (retrying may help) rather than a refusal."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError,
                        ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return None
    head = f"TLS handshake with {where} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or _reason(exc)).rstrip(".")
        if "hostname mismatch" in detail.lower() or "ip address mismatch" in detail.lower():
            return (f"{head}: certificate verify failed: {detail}; dial a name in the "
                    "certificate's subjectAltName or pass ?server_name_indication=NAME")
        return (f"{head}: certificate verify failed: {detail}; pass ?cacertfile=CA.pem (the "
                "CA that signed the broker's certificate)")
    reason = getattr(exc, "reason", None) or ""
    if reason == "WRONG_VERSION_NUMBER":
        return (f"{head}: the port does not speak TLS; amqps:// needs the broker's TLS "
                "listener (listeners.ssl, port 5671 by default)")
    if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
        if options.certfile is None:
            return (f"{head}: the broker requires a client certificate ({_reason(exc)}); pass "
                    "?certfile=CLIENT.pem&keyfile=CLIENT.key signed by a CA it trusts")
        return (f"{head}: the broker refused our client certificate ({_reason(exc)}); use a "
                "certfile signed by a CA in the broker's ssl_options.cacertfile")
    return f"{head}: {_reason(exc)}"
