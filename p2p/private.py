"""Private swarms: a pre-shared key every member holds, and optionally the peers allowed to serve.

**The key** (``swarm keygen --swarm-key FILE``, then ``--swarm-key FILE`` or ``SWARM_KEY_FILE`` on
every command) is 32 random bytes in go-libp2p's swarm.key format (``/key/swarm/psk/1.0.0/``,
``/base16/``, 64 hex digits). A host with a key encrypts every TCP connection with it below
Noise (libp2p's private-network "protector"): a peer without the same key cannot complete a
connection, so it can neither read the table, announce, nor exchange a byte of hidden state with
members; two swarms with different keys may share hosts and never mix. py-libp2p's own protector
(``libp2p.security.pnet``) is replaced here by :class:`ProtectedConn`, which

- reads the peer's nonce whole (py-libp2p's takes whatever one read returns),
- checks the key at once: each side's first bytes after its nonce are a fixed marker encrypted
  with the key, so a peer with another key (or none) is refused after one round trip, with an
  error that says so, instead of stalling the handshake for its 30 s timeout,
- keeps the connection's addresses and direction visible to the swarm.

The stream cipher is Salsa20 with an 8-byte nonce per direction, as in py-libp2p; go-libp2p's
uses XSalsa20 (24 bytes), so a key file is shared with go peers but a connection is not.

**Allowed peers** (``--allow-peers FILE``: one peer id per line, ``#`` comments): only these may
serve. Announcements of other peers are ignored by clients and servers alike (they never enter
a table, so no route uses them), and servers refuse their server-to-server streams (pushed
steps); a server not on its own list refuses to start.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from Crypto.Cipher import Salsa20
from libp2p.abc import IRawConnection
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID

KEY_HEADER = "/key/swarm/psk/1.0.0/"
KEY_ENV = "SWARM_KEY_FILE"
KEY_BYTES = 32
NONCE_BYTES = 8
# sent encrypted after the nonce in each direction, so a wrong key shows at once; long enough
# that a peer without a key, reading it as a multistream message (a varint length, see
# _nonce), finds the whole message there and refuses it at once rather than waiting for more
MARKER = b"swarm private network: the same key on both sides".ljust(56, b".")
MAX_ALLOW_FILE = 1 << 20  # bytes of an --allow-peers file


class PrivateSwarmError(RawConnError):
    """A connection whose peer does not hold this swarm's key (or holds one when we have none)."""


def new_swarm_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def format_swarm_key(key: bytes) -> str:
    return f"{KEY_HEADER}\n/base16/\n{key.hex()}\n"


def write_swarm_key(path: Path, force: bool = False) -> bytes:
    """A new key written to ``path`` (readable by its owner only). ``ValueError`` naming the file
    when it exists (unless ``force``) or cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"--swarm-key: {path} is a directory; give the key file's name, e.g. swarm.key")
    if path.exists() and not force:
        raise ValueError(f"--swarm-key: {path} exists; every member of its swarm holds that key "
                         "(remove it or pass --force to replace it)")
    key = new_swarm_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(format_swarm_key(key))
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ValueError(f"--swarm-key: cannot write {path}: {exc.strerror or exc}") from None
    return key


def parse_swarm_key(text: str, name: str = "the key") -> bytes:
    """The 32 bytes of a swarm.key text (base16, or base64 as go-libp2p also writes). ``ValueError``
    naming ``name`` for anything else."""
    import base64
    import binascii

    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    hint = "expected the 3 lines `swarm keygen --swarm-key FILE` writes"
    if len(lines) != 3 or lines[0] != KEY_HEADER:
        raise ValueError(f"--swarm-key: {name} is not a swarm key file ({hint})")
    try:
        if lines[1] == "/base16/":
            key = bytes.fromhex(lines[2])
        elif lines[1] == "/base64/":
            key = base64.b64decode(lines[2], validate=True)
        else:
            raise ValueError
    except (ValueError, binascii.Error):
        raise ValueError(f"--swarm-key: {name} holds no valid key ({hint})") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"--swarm-key: the key in {name} has {len(key)} bytes, not {KEY_BYTES} ({hint})")
    return key


def read_swarm_key(path: Path) -> bytes:
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()[:4096].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"--swarm-key: {path} is not a swarm key file (not text)") from None
    except OSError as exc:
        raise ValueError(f"--swarm-key: cannot read {path}: {exc.strerror or exc}") from None
    return parse_swarm_key(text, str(path))


def read_allow_peers(path: Path) -> frozenset[str]:
    """The peer ids in an ``--allow-peers`` file. ``ValueError`` naming the file (and the line) for
    one that cannot be read, is empty, or holds something that is not a peer id."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ALLOW_FILE + 1)
    except OSError as exc:
        raise ValueError(f"--allow-peers: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_ALLOW_FILE:
        raise ValueError(f"--allow-peers: {path} is larger than {MAX_ALLOW_FILE >> 20} MiB")
    peers = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            peers.append(ID.from_base58(line).to_base58())
        except Exception:
            raise ValueError(f"--allow-peers: {path} line {number}: {line[:60]!r} is not a peer id "
                             "(one per line, as `swarm serve` prints after /p2p/)") from None
    if not peers:
        raise ValueError(f"--allow-peers: {path} lists no peer id (one per line, as `swarm serve` prints after /p2p/)")
    return frozenset(peers)


@dataclass(frozen=True)
class Membership:
    """Who belongs to this swarm: ``key`` (None: an open swarm), ``allowed`` (peer ids that may
    serve; None: any member)."""

    key: bytes | None = None
    allowed: frozenset[str] | None = None

    @classmethod
    def from_files(cls, swarm_key: Path | str | None = None, allow_peers: Path | str | None = None) -> Membership:
        """From the flags' files; ``swarm_key`` None: ``$SWARM_KEY_FILE`` if set. ``ValueError``
        naming the flag and the file."""
        if swarm_key is None and os.environ.get(KEY_ENV):
            swarm_key = os.environ[KEY_ENV]
        return cls(
            key=read_swarm_key(Path(swarm_key)) if swarm_key else None,
            allowed=read_allow_peers(Path(allow_peers)) if allow_peers else None,
        )

    @property
    def psk(self) -> str | None:
        """The key as py-libp2p's hosts take it (64 hex digits), or None."""
        return self.key.hex() if self.key is not None else None

    def may_serve(self, peer_id: str) -> bool:
        return self.allowed is None or peer_id in self.allowed


CLOSED_EARLY = ("the peer closed the connection at the private swarm's key check: it has another --swarm-key, "
                "or none (a peer of an open swarm)")


def _nonce() -> bytes:
    """A random nonce whose first byte is below 64: a peer without a key reads it as a one-byte
    varint, the length of a multistream message that the marker behind it fills, so it refuses
    the connection at once (62 random bits remain, plenty for one key's connections)."""
    nonce = bytearray(os.urandom(NONCE_BYTES))
    nonce[0] &= 0x3F
    return bytes(nonce)


def private_hint(membership: Membership) -> str:
    """What to add to "no initial peer answered": a peer without a key cannot tell an unreachable
    peer from a private swarm's."""
    if membership.key is None:
        return "\n(if the swarm is private, pass its key file: --swarm-key FILE or SWARM_KEY_FILE)"
    return "\n(this process is in a private swarm: the initial peers must hold the same --swarm-key)"


async def _read_exactly(conn, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await conn.read(n - len(data))
        if not chunk:
            raise PrivateSwarmError(CLOSED_EARLY)
        data += chunk
    return data


async def _check_marker(conn, reader: Salsa20.Salsa20Cipher) -> None:
    """Read the peer's marker, refusing at the first byte that differs (a peer without a key
    sends fewer bytes than the marker before it waits for an answer)."""
    seen = 0
    while seen < len(MARKER):
        chunk = await conn.read(len(MARKER) - seen)
        if not chunk:
            raise PrivateSwarmError(CLOSED_EARLY)
        if reader.decrypt(chunk) != MARKER[seen : seen + len(chunk)]:
            raise PrivateSwarmError("the peer is not in this private swarm: its --swarm-key differs (or it has none)")
        seen += len(chunk)


class ProtectedConn(RawConnection):
    """A raw connection encrypted with the swarm's key (see the module's docstring)."""

    def __init__(self, conn: RawConnection | IRawConnection, psk: str):
        # not RawConnection.__init__: it wraps a stream; this wraps a connection
        self._conn = conn
        self.stream = getattr(conn, "stream", None)
        self._key = bytes.fromhex(psk)
        self.is_initiator = getattr(conn, "is_initiator", False)
        self._reader: Salsa20.Salsa20Cipher | None = None
        self._writer: Salsa20.Salsa20Cipher | None = None

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            nonce = _nonce()
            self._writer = Salsa20.new(key=self._key, nonce=nonce)
            data = nonce + self._writer.encrypt(MARKER) + self._writer.encrypt(data)
            await self._conn.write(data)
            return
        await self._conn.write(self._writer.encrypt(data))

    async def read(self, n: int | None = None) -> bytes:
        if self._reader is None:
            nonce = await _read_exactly(self._conn, NONCE_BYTES)
            reader = Salsa20.new(key=self._key, nonce=nonce)
            await _check_marker(self._conn, reader)
            self._reader = reader
        data = await self._conn.read(n)
        return self._reader.decrypt(data) if data else b""

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self):
        return self._conn.get_remote_address()

    def get_local_address(self):
        get = getattr(self._conn, "get_local_address", None)
        return get() if get is not None else None

    def get_transport_addresses(self):
        return self._conn.get_transport_addresses()

    def get_connection_type(self):
        return self._conn.get_connection_type()


def private_swarm_reason(exc: BaseException) -> str | None:
    """The message of a :class:`PrivateSwarmError` behind ``exc`` (a failed dial wraps it in
    causes, contexts and groups), or None."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PrivateSwarmError):
            return str(e)
        todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ()), *getattr(e, "errors", ())])
    return None


def protected_conn(conn: RawConnection | IRawConnection, psk: str) -> ProtectedConn:
    if len(psk) != 2 * KEY_BYTES:
        raise ValueError(f"a swarm key has {KEY_BYTES} bytes")
    return ProtectedConn(conn, psk)


def install() -> None:
    """Make py-libp2p's swarm protect connections with :class:`ProtectedConn` (its hosts call
    ``new_protected_conn`` for every raw connection when they have a key)."""
    import libp2p.network.swarm as swarm_module

    swarm_module.new_protected_conn = protected_conn
