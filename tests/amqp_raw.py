"""Publish AMQP 0-9-1 messages over a raw socket, without pika.

pika re-encodes message properties from Python values, so it cannot send
envelopes that are legal on the wire but odd (timestamps past 2**63, float
headers, non-UTF-8 keys, 500-deep tables, unknown field types, ...).  Here the
content header is built byte by byte: :func:`field_table` encodes a header
table from ``(key, type_char, raw_value)`` entries and :class:`RawPublisher`
publishes it on a confirm-mode channel.  pamqp does the method framing and the
handshake.

Example (RabbitMQ 3.10 accepts this; pika's consumer then dies decoding it)::

    headers = field_table([(b"ts", *timestamp(2**63)), (b"\xff", *longstr(b"\xfe"))])
    with RawPublisher() as pub:
        assert pub.publish("", "some.queue", b"body", headers_raw=headers) == "ack"

Type chars follow RabbitMQ (and pika), not the 0-9-1 spec table: ``s`` is a
signed int16 (:func:`shortstr` sends the spec's short string under ``s``),
``l`` a signed int64, ``T`` an unsigned int64.  RabbitMQ parses the table at
publish and closes the connection (541 INTERNAL_ERROR) on what it cannot parse:
NaN/inf floats, unknown type chars, a table whose length lies.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from functools import partial
from types import TracebackType
from typing import TypeVar

from pamqp import base, commands, common, constants, frame, header
from pamqp import body as pbody

Field = tuple[bytes, bytes]  # (type_char, raw_value): what the helpers return
Entry = tuple[bytes, bytes, bytes]  # (key, type_char, raw_value): one table entry
_M = TypeVar("_M", bound=base.Frame)

_FMT = {"t": "B", "b": "b", "B": "B", "s": "h", "u": "H", "I": "i", "i": "I", "l": "q",
        "f": "f", "d": "d", "T": "Q"}  # fmt: skip


def field_table(items: Iterable[Entry]) -> bytes:
    """Encode a whole field table, its 4-byte length prefix included.

    Keys get a length octet and are otherwise verbatim (non-UTF-8 is fine);
    type chars and values are copied as given, so unknown types can be sent.
    """
    out = b"".join(struct.pack(">B", len(k)) + k + t + v for k, t, v in items)
    return struct.pack(">I", len(out)) + out


def scalar(type_char: str, value: float) -> Field:
    """A fixed-width field: t b B s u I i l f d T (struct range checks apply)."""
    return type_char.encode(), struct.pack(">" + _FMT[type_char], value)


bool_, int8, uint8 = partial(scalar, "t"), partial(scalar, "b"), partial(scalar, "B")
int16, uint16 = partial(scalar, "s"), partial(scalar, "u")
int32, uint32, int64 = partial(scalar, "I"), partial(scalar, "i"), partial(scalar, "l")
f32, f64, timestamp = partial(scalar, "f"), partial(scalar, "d"), partial(scalar, "T")


def decimal(scale: int, unscaled: int) -> Field:
    """'D': scale octet then a signed int32 (value = unscaled * 10**-scale)."""
    return b"D", struct.pack(">Bi", scale, unscaled)


def shortstr(value: bytes) -> Field:
    """The 0-9-1 spec's 's' short string (length octet + bytes); see module doc."""
    return b"s", struct.pack(">B", len(value)) + value


def sized(type_char: str, value: bytes) -> Field:
    """uint32 length + bytes: 'S' long string, 'x' byte array (RabbitMQ extension)."""
    return type_char.encode(), struct.pack(">I", len(value)) + value


longstr, bytes_ = partial(sized, "S"), partial(sized, "x")


def array(values: Sequence[Field]) -> Field:
    """'A': uint32 length then type_char + raw value for each element."""
    out = b"".join(t + v for t, v in values)
    return b"A", struct.pack(">I", len(out)) + out


def table(items: Iterable[Entry]) -> Field:
    """'F': a nested field table."""
    return b"F", field_table(items)


def void() -> Field:
    return b"V", b""


# Basic property names, flag bits and wire kinds in wire order (0-9-1 spec;
# the same bits as pamqp.commands.Basic.Properties.flags).
_PROPS = [
    ("content_type", "s"), ("content_encoding", "s"), ("headers", "F"),
    ("delivery_mode", "B"), ("priority", "B"), ("correlation_id", "s"),
    ("reply_to", "s"), ("expiration", "s"), ("message_id", "s"),
    ("timestamp", "T"), ("type", "s"), ("user_id", "s"), ("app_id", "s"),
    ("cluster_id", "s"),
]  # fmt: skip


def encode_properties(props: dict[str, bytes | str | int | None]) -> bytes:
    """Property flags (uint16) then each present property, in wire order.

    ``headers`` must be an encoded table (:func:`field_table`); short strings
    may be str or arbitrary bytes (at most 255).
    """
    flags, out = 0, []
    for bit, (name, kind) in zip(range(15, 1, -1), _PROPS, strict=True):
        value = props.get(name)
        if value is None:
            continue
        flags |= 1 << bit
        if isinstance(value, int):
            out.append(struct.pack(">Q" if kind == "T" else ">B", value))
        elif kind == "F":
            out.append(value if isinstance(value, bytes) else value.encode())
        else:
            raw = value.encode() if isinstance(value, str) else value
            if len(raw) > 255:
                raise ValueError(f"{name} is {len(raw)} bytes; a shortstr holds 255")
            out.append(struct.pack(">B", len(raw)) + raw)
    return struct.pack(">H", flags) + b"".join(out)


class RawPublisher:
    """One AMQP connection with a confirm-mode channel, driven by hand."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.frame_max = 131072
        self.sock: socket.socket | None = None
        self.channel = 0  # 0: none open (the broker closed it); reopened lazily
        self.closed: str | None = None  # "closed: ..." once the connection is gone
        self.returned: list[commands.Basic.Return] = []  # for mandatory=True
        self._buf, self._seq, self._last_channel = b"", 0, 0

    def __enter__(self) -> RawPublisher:
        if self.sock is None:
            self.connect()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(
        self,
        host: str = "127.0.0.1",
        port: int = 5672,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
    ) -> RawPublisher:
        """Handshake (PLAIN, heartbeats off, the broker's frame_max), open a channel."""
        self.sock = socket.create_connection((host, port), self.timeout)
        self.sock.sendall(header.ProtocolHeader().marshal())
        self._expect(commands.Connection.Start)
        props: common.FieldTable = {"product": "tests.amqp_raw"}
        auth = f"\0{user}\0{password}"
        self._send(0, commands.Connection.StartOk(client_properties=props, response=auth))
        tune = self._expect(commands.Connection.Tune)
        self.frame_max = tune.frame_max or self.frame_max
        self._send(0, commands.Connection.TuneOk(tune.channel_max, self.frame_max, 0))
        self._send(0, commands.Connection.Open(virtual_host=vhost))
        self._expect(commands.Connection.OpenOk)
        self._open_channel()
        return self

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers_raw: bytes | None = None,
        delivery_mode: int | None = 2,
        raw_properties: bytes | None = None,
        mandatory: bool = False,
        **props: bytes | str | int | None,
    ) -> str:
        """Publish one message and wait for its confirm.

        ``props`` are the other Basic properties by name (``reply_to``,
        ``correlation_id``, ``timestamp``, ``type``, ...).  ``raw_properties``
        replaces flags + property list verbatim.  The content header goes out
        as one frame even when it exceeds frame_max (to test the broker); the
        body is split to frame_max.  Returns ``"ack"``, ``"nack"``,
        ``"closed: <code> <text>"`` (channel or connection closed by the
        broker) or ``"timeout"``.
        """
        if unknown := set(props) - {name for name, _ in _PROPS}:
            raise TypeError(f"unknown properties: {sorted(unknown)}")
        if self.closed:
            return self.closed
        if raw_properties is None:
            props.update(headers=headers_raw, delivery_mode=delivery_mode)
            raw_properties = encode_properties(props)
        try:
            if not self.channel:
                self._open_channel()
            ch, step = self.channel, self.frame_max - 8
            method = commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            content = struct.pack(">HHQ", 60, 0, len(body)) + raw_properties  # class, weight
            head = struct.pack(">BHI", constants.FRAME_HEADER, ch, len(content))
            frames = [frame.marshal(method, ch), head + content + constants.FRAME_END_CHAR]
            frames += [
                frame.marshal(pbody.ContentBody(body[i : i + step]), ch)
                for i in range(0, len(body), step)
            ]
            self._seq += 1
            self._sock().sendall(b"".join(frames))
            while True:
                got = self._read()
                if isinstance(got, str):
                    return got
                if isinstance(got, commands.Basic.Ack | commands.Basic.Nack) and (
                    got.delivery_tag >= self._seq or not got.multiple
                ):
                    return "ack" if isinstance(got, commands.Basic.Ack) else "nack"
        except TimeoutError:
            return "timeout"
        except OSError as exc:  # reset, or closed while reopening the channel
            self.closed = self.closed or f"closed: socket {exc!r}"
            return self.closed

    def close(self) -> None:
        """Close the connection politely if it is still open; idempotent."""
        if self.sock is None:
            return
        try:
            if not self.closed:
                self._send(0, commands.Connection.Close(200, "bye", 0, 0))
                self.sock.settimeout(2)
                while not isinstance(self._read(), str):
                    pass
        except OSError:
            pass
        finally:
            self.sock.close()
            self.sock = None

    # -- plumbing -------------------------------------------------------------
    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionError("not connected")
        return self.sock

    def _open_channel(self) -> None:
        self._last_channel += 1
        self.channel, self._seq = self._last_channel, 0
        self._send(self.channel, commands.Channel.Open())
        self._expect(commands.Channel.OpenOk)
        self._send(self.channel, commands.Confirm.Select())
        self._expect(commands.Confirm.SelectOk)

    def _send(self, channel: int, method: base.Frame) -> None:
        self._sock().sendall(frame.marshal(method, channel))

    def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self._sock().recv(65536)
            if not data:
                raise ConnectionResetError("broker closed the socket")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read(self) -> object:
        """Read one frame: a method, (2 or 3, payload) for a content frame (left
        raw: pamqp would choke on odd properties), or "closed: <code> <text>"
        after answering a Close."""
        head = self._recv_exact(7)
        kind, channel, size = struct.unpack(">BHI", head)
        raw = self._recv_exact(size + 1)
        if kind in (constants.FRAME_HEADER, constants.FRAME_BODY):
            return kind, raw[:-1]
        value = frame.unmarshal(head + raw)[2]
        if isinstance(value, commands.Channel.Close):
            self._send(channel, commands.Channel.CloseOk())
            self.channel = 0
            return f"closed: {value.reply_code} {value.reply_text}"
        if isinstance(value, commands.Connection.Close):
            self._send(0, commands.Connection.CloseOk())
            self.closed = f"closed: {value.reply_code} {value.reply_text}"
            return self.closed
        if isinstance(value, commands.Connection.CloseOk):
            self.closed = "closed: 200 client close"
            return self.closed
        if isinstance(value, commands.Basic.Return):
            self.returned.append(value)
        return value

    def _expect(self, kind: type[_M]) -> _M:
        while True:
            got = self._read()
            if isinstance(got, str):
                raise ConnectionError(f"waiting for {kind.__name__}: {got}")
            if isinstance(got, kind):
                return got
