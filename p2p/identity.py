"""Key files, each used by one running process at a time.

A peer id is the hash of a public key: two processes on one key are one peer to the swarm, and
when one of them leaves, its offline announcement would remove the other. So a process that uses
a key file holds an exclusive ``flock`` on ``KEYFILE.lock`` (next to it) for as long as it uses
the key: :func:`claim_identity` takes the lock first and only then reads the key, or creates it
(written to a temporary file and renamed into place, so no one reads half a key), which also
settles two processes creating the same new key at once. The lock file holds the owner's pid for
the error message. The kernel drops the lock when its process dies, so a crash leaves nothing to
clean up.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

from swarm.p2p.bridge import P2PError

__all__ = ["Identity", "IdentityInUseError", "claim_default_identity", "claim_identity", "load_or_create_identity"]

MAX_DEFAULT_KEYS = 1000


class IdentityInUseError(P2PError):
    """Another running process (``pid``, when known) holds the key file ``path``."""

    def __init__(self, path: Path, pid: int | None):
        owner = f" (pid {pid})" if pid else ""
        super().__init__(
            f"the identity file {path} is in use by another running swarm process{owner}; "
            f"give another --identity or stop that process"
        )
        self.path, self.pid = path, pid


@dataclass(eq=False)
class Identity:
    """A key pair, and the lock on its key file while this process uses it (none for a fresh key
    that lives in memory only). :meth:`release` lets other processes claim the file."""

    key_pair: KeyPair
    path: Path | None = None
    _lock: IO | None = None

    @property
    def peer_id(self) -> str:
        return ID.from_pubkey(self.key_pair.public_key).to_base58()

    def release(self) -> None:
        """Give the key file up (idempotent)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def load_or_create_identity(path: Path) -> KeyPair:
    """The Ed25519 key pair stored at ``path``, created on first use (parent directories made,
    file mode 0600) so the peer id stays the same across restarts. Takes no lock: processes use
    :func:`claim_identity`.

    Raises ``ValueError`` naming the file if it holds no valid key, ``OSError`` if it cannot be
    read or written.
    """
    path = Path(path)
    if path.exists():
        return load_identity(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key_pair = generate_new_ed25519_identity()
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_identity(key_pair, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return key_pair


def claim_identity(path: Path | str) -> Identity:
    """The key pair at ``path`` (created on first use), held by this process until
    :meth:`Identity.release` or its exit. Raises :class:`IdentityInUseError` if another process
    (or another host in this one) holds it; ``OSError``/``ValueError`` as
    :func:`load_or_create_identity`."""
    path = Path(path).resolve()  # one lock for every spelling of the path (symlinks, relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip()
        lock.close()
        raise IdentityInUseError(path, int(owner) if owner.isdigit() else None) from None
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return Identity(load_or_create_identity(path), path, lock)
    except BaseException:
        lock.close()
        raise


def claim_default_identity(home: Path) -> Identity:
    """``home/identity.key``, or ``identity-2.key``, ... when another process holds it (whether
    it picked the file as its default or was given it with ``--identity``): several servers on
    one machine get distinct peer ids, each stable across restarts."""
    for n in range(1, MAX_DEFAULT_KEYS + 1):
        try:
            return claim_identity(home / ("identity.key" if n == 1 else f"identity-{n}.key"))
        except IdentityInUseError:
            continue
    raise P2PError(f"all {MAX_DEFAULT_KEYS} identity files under {home} are in use; pass --identity PATH")
