"""Membership: which servers a peer counts on. Runs of one peer id (a restart) never remove each
other."""

from __future__ import annotations

import time

from swarm.p2p.table import PeerTable, ServerInfo


# ---- runs of one peer id -----------------------------------------------------------------------


def test_an_earlier_run_never_removes_a_later_one():
    table = PeerTable("m", 4, period=1.0)

    def info(run: str, state="online", start=0):
        return ServerInfo("p", (), "m", start, 4, state=state, instance=run, received=time.monotonic())

    assert table.update(info("01"))
    assert table.update(info("02", start=1)), "a restart (later run) replaces the entry"
    assert not table.update(info("01", state="offline")), "the old run's goodbye arrives late"
    assert not table.update(info("01")), "nor does the old run's last hello come back"
    assert table.snapshot()["p"].instance == "02" and table.snapshot()["p"].start == 1
    table.merge([info("01").to_wire()])
    assert table.snapshot()["p"].instance == "02", "another table's older entry does not win either"
    table.merge([info("03").to_wire()])
    assert table.snapshot()["p"].instance == "03", "but its later run does"
    assert table.update(info("03", state="offline")) and table.snapshot() == {}
    assert ServerInfo.from_wire(info("04").to_wire(), received=0.0).instance == "04"
