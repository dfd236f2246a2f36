"""The site worker's wire: who may talk to it, and the frames they exchange.

Frames are `multiprocessing.connection.Connection`'s length-prefixed byte strings
(`send_bytes`/`recv_bytes`, never its pickling `send`/`recv`, so a peer can only ever
hand the other bytes). Its own `authkey` handshake is not used: it is HMAC-MD5 (refused
on FIPS builds), compares with `==`, waits without a timeout, and tells nothing about
the peer. Instead, on every connection:

1. the worker reads the peer's uid (SO_PEERCRED) and refuses any other user's;
2. proxy -> worker: MAGIC + the proxy's nonce;
3. worker -> proxy: the worker's nonce + HMAC-SHA256(secret, "w" + both nonces + key name);
4. proxy -> worker: HMAC-SHA256(secret, "p" + both nonces, the other way, + key name);
5. worker -> proxy: OK.

Each side compares with `hmac.compare_digest`, and waits at most `timeout` seconds
for each step, so a silent peer cannot hold the single-threaded worker. The secret
lives in a 0600 file in the 0700 worker directory: a process that may read it runs
as the SuperNode's user, and could run the node's code itself anyway.

After the handshake, one request per connection: a JSON header (`op` "handle"), then
the Message and Context protos; the reply: a JSON header, then (status "ok" of `handle`) the reply's and the new node
state's RecordDict protos. Messages travel as Flower's own protobufs
(`flwr.common.serde`), exactly as Flower moves them between its processes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from multiprocessing.connection import Connection

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedllm_flwr.site_worker.paths import WorkerFiles

MAGIC = b"FEDLLM-SW1"
OK = b"OK"
NONCE_BYTES = 32
#: Seconds each handshake step may take (a worker answers in milliseconds when idle).
HANDSHAKE_SECONDS = 5.0


class AuthError(Exception):
    """The other side did not prove it holds the worker's secret (or said nothing in time)."""


class HandshakeClosed(AuthError):
    """The other side closed the connection during the handshake (refused it, or died)."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel."""
    size = struct.calcsize("3i")
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))


def _mac(secret: bytes, role: bytes, first: bytes, second: bytes, name: str) -> bytes:
    return hmac.new(secret, role + first + second + name.encode(), hashlib.sha256).digest()


def _send_small(conn: Connection, frame: bytes) -> None:
    try:
        conn.send_bytes(frame)
    except OSError as exc:  # the other side closed first (a refused peer)
        raise HandshakeClosed(f"closed during the handshake ({type(exc).__name__})") from None


def _recv_small(conn: Connection, timeout: float) -> bytes:
    """One handshake frame (at most 256 bytes), or AuthError after `timeout` seconds."""
    if not conn.poll(timeout):
        raise AuthError(f"no answer within {timeout:g} s")
    try:
        return conn.recv_bytes(256)
    except (EOFError, OSError) as exc:
        raise HandshakeClosed(f"closed during the handshake ({type(exc).__name__})") from None


def handshake_client(conn: Connection, secret: bytes, name: str, timeout: float = HANDSHAKE_SECONDS) -> None:
    mine = secrets.token_bytes(NONCE_BYTES)
    _send_small(conn, MAGIC + mine)
    answer = _recv_small(conn, timeout)
    theirs, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if len(theirs) != NONCE_BYTES or not hmac.compare_digest(proof, _mac(secret, b"w", mine, theirs, name)):
        raise AuthError("the worker did not prove it holds the secret")
    _send_small(conn, _mac(secret, b"p", theirs, mine, name))
    if _recv_small(conn, timeout) != OK:
        raise AuthError("the worker refused the proof")


def handshake_server(conn: Connection, secret: bytes, name: str, timeout: float = HANDSHAKE_SECONDS) -> None:
    hello = _recv_small(conn, timeout)
    if len(hello) != len(MAGIC) + NONCE_BYTES or not hello.startswith(MAGIC):
        raise AuthError("not a site-worker hello")
    theirs, mine = hello[len(MAGIC) :], secrets.token_bytes(NONCE_BYTES)
    _send_small(conn, mine + _mac(secret, b"w", theirs, mine, name))
    if not hmac.compare_digest(_recv_small(conn, timeout), _mac(secret, b"p", mine, theirs, name)):
        raise AuthError("wrong proof of the secret")
    _send_small(conn, OK)


def connect(files: WorkerFiles, timeout: float = HANDSHAKE_SECONDS) -> Connection:
    """An authenticated connection to the worker at `files`. OSError when no worker
    listens there (yet); AuthError when the one that does fails the handshake."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(files.sock))
        sock.settimeout(None)
        _, uid, _ = peer_credentials(sock)
        if uid != os.getuid():
            raise AuthError(f"the socket is served by uid {uid}, not this user's")
        secret = files.key.read_bytes()
    except BaseException:
        sock.close()
        raise
    conn = Connection(sock.detach())
    try:
        handshake_client(conn, secret, files.name, timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def send_json(conn: Connection, header: dict) -> None:
    conn.send_bytes(json.dumps(header).encode())


def recv_json(conn: Connection) -> dict:
    header = json.loads(conn.recv_bytes())
    if not isinstance(header, dict):
        raise ValueError("a frame header must be a JSON object")
    return header


def encode_message(msg: Message) -> bytes:
    return message_to_proto(msg).SerializeToString()


def decode_message(data: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(data))


def encode_context(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def decode_context(data: bytes) -> Context:
    return context_from_proto(ProtoContext.FromString(data))


def encode_records(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def decode_records(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))
