"""What a machine's clients learned about servers' honesty, kept under ``$SWARM_HOME/verify.json``:
checks passed and failed per server, and the servers caught lying (banned until an expiry, with
the reason). Every client of the machine reads it at start and adds to it; ``swarm status`` shows
it. Writes are atomic (a temporary file renamed into place) under an exclusive ``flock``, so two
clients writing at once lose nothing; an unreadable file is set aside and started afresh."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("swarm.client")

BAN_SECONDS = 7 * 24 * 3600.0  # how long a server caught lying stays banned (a week)
MAX_ENTRIES = 10_000  # servers remembered (the oldest bans and counters go first)


@dataclass
class Ban:
    until: float  # unix time
    reason: str
    since: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"until": self.until, "reason": self.reason, "since": self.since}


class Ledger:
    """Checks and bans, in memory and (``path`` set) in the file. Thread-safe enough for one
    event loop: every method runs to completion without awaiting."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.checks: dict[str, list[int]] = {}  # peer id → [passed, failed]
        self.bans: dict[str, Ban] = {}
        self._unsaved: dict[str, list[int]] = {}  # counts not yet added to the file
        if path is not None:
            self._merge(self._read())

    def passed(self, peer: str) -> int:
        return self.checks.get(peer, [0, 0])[0]

    def count(self, peer: str, passed: bool, n: int = 1) -> None:
        for table in (self.checks, self._unsaved):
            entry = table.setdefault(peer, [0, 0])
            entry[0 if passed else 1] += n

    def ban(self, peer: str, reason: str, seconds: float = BAN_SECONDS) -> None:
        self.bans[peer] = Ban(time.time() + seconds, reason)
        self.save()

    def banned(self) -> set[str]:
        now = time.time()
        return {p for p, b in self.bans.items() if b.until > now}

    def save(self) -> None:
        """Add this process's news to the file (others' since our last read are kept)."""
        if self.path is None:
            return
        try:
            with self._locked():
                data = self._read()
                for peer, (ok, bad) in self._unsaved.items():
                    entry = data["checks"].setdefault(peer, [0, 0])
                    entry[0] += ok
                    entry[1] += bad
                for peer, ban in self.bans.items():
                    old = data["bans"].get(peer)
                    if old is None or old.get("until", 0) < ban.until:
                        data["bans"][peer] = ban.to_json()
                _trim(data)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
                self._unsaved.clear()
                self._merge(data)
        except OSError as exc:
            log.warning("could not save %s: %s", self.path, exc)

    def _merge(self, data: dict) -> None:
        for peer, counts in data["checks"].items():
            mine = self._unsaved.get(peer, [0, 0])
            self.checks[peer] = [counts[0] + mine[0], counts[1] + mine[1]]
        for peer, ban in data["bans"].items():
            if peer not in self.bans or self.bans[peer].until < ban["until"]:
                self.bans[peer] = Ban(float(ban["until"]), str(ban.get("reason", "")), float(ban.get("since", 0)))

    def _read(self) -> dict:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return {"checks": {}, "bans": {}}
        except _UNREADABLE as exc:
            log.warning("%s is unreadable (%s): starting a new one", self.path, exc)
            try:
                os.replace(self.path, self.path.with_suffix(".bad"))
            except OSError:
                pass
            return {"checks": {}, "bans": {}}

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


_UNREADABLE = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def _parse(text: str) -> dict:
    """The file's ``{"checks", "bans"}``, checked and normalized; raises one of ``_UNREADABLE``."""
    data = json.loads(text)
    checks = {str(p): [int(c[0]), int(c[1])] for p, c in data.get("checks", {}).items()}
    bans = {str(p): {"until": float(b["until"]), "reason": str(b.get("reason", "")), "since": float(b.get("since", 0))}
            for p, b in data.get("bans", {}).items()}
    return {"checks": checks, "bans": bans}


def _trim(data: dict) -> None:
    now = time.time()
    data["bans"] = {p: b for p, b in data["bans"].items() if b["until"] > now}
    for key in ("checks", "bans"):
        if len(data[key]) > MAX_ENTRIES:
            keep = list(data[key])[-MAX_ENTRIES:]
            data[key] = {p: data[key][p] for p in keep}


def read_ledger(home: Path) -> Ledger:
    """The ledger of the machine whose ``$SWARM_HOME`` is ``home``, as ``swarm status`` shows it: a
    snapshot in memory (``save`` does nothing), read without the lock and never written or moved.
    A missing or unreadable file reads as an empty ledger (the clients set a bad one aside)."""
    ledger = Ledger()
    try:
        ledger._merge(_parse((home / "verify.json").read_text()))
    except _UNREADABLE:
        pass
    return ledger
