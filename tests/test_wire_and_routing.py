"""The wire format and the pure decisions (block choice, routing), without a network."""

from __future__ import annotations

import dataclasses
import struct
from types import SimpleNamespace

import msgpack
import pytest
import torch

from swarm.p2p.routing import NoRouteError, Span, choose_blocks, find_chain, load_factor
from swarm.p2p.table import PeerTable, ServerInfo, coverage, gaps, model_id, parse_announcement
from swarm.p2p.wire import PROTOCOL_VERSION, Frame, WireError, decode_body, encode


def _roundtrip(frame: Frame) -> Frame:
    data = b"".join(bytes(b) for b in encode(frame))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    return decode_body(data[4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_frame_roundtrip_keeps_tensors_exact(dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = _roundtrip(Frame("step", {"step_id": "a", "position": 7}, [t, torch.tensor([1, 0])]))
    assert back.kind == "step" and back["position"] == 7 and back["step_id"] == "a"
    assert back.tensors[0].dtype == dtype and torch.equal(back.tensors[0], t)
    assert torch.equal(back.tensors[1], torch.tensor([1, 0]))


def test_non_contiguous_and_empty_tensors():
    t = torch.randn(4, 6).t()
    assert torch.equal(_roundtrip(Frame("result", {}, [t])).tensors[0], t)
    assert _roundtrip(Frame("result", {}, [torch.empty(0, 3)])).tensors[0].shape == (0, 3)


def _body(header: dict, payload: bytes = b"") -> bytes:
    h = msgpack.packb(header)
    return struct.pack(">H", len(h)) + h + payload


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "shorter"),
        (b"\x00\x10abc", "header length exceeds"),
        (struct.pack(">H", 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
        (_body([1, 2]), "not a msgpack map"),  # type: ignore[arg-type]
        (_body({"v": 99, "kind": "info", "tensors": []}), "unsupported protocol version 99"),
        (_body({"v": PROTOCOL_VERSION, "kind": "hack", "tensors": []}), "unknown frame kind"),
        (_body({"v": PROTOCOL_VERSION, "kind": "open", "tensors": []}), "missing field"),
        (_body({"v": PROTOCOL_VERSION, "kind": "forward", "start": 0, "end": 1, "tensors": [["float32", [2]]]}, b"\x00" * 4), "runs past"),
        (_body({"v": PROTOCOL_VERSION, "kind": "forward", "start": 0, "end": 1, "tensors": [["complex", [1]]]}, b"\x00" * 8), "bad tensor entry"),
        (_body({"v": PROTOCOL_VERSION, "kind": "forward", "start": 0, "end": 1, "tensors": [["float32", [-1]]]}), "bad tensor shape"),
        (_body({"v": PROTOCOL_VERSION, "kind": "forward", "start": 0, "end": 1, "tensors": [["float32", [1]]]}, b"\x00" * 5), "trailing"),
        (_body({"v": PROTOCOL_VERSION, "kind": "forward", "start": 0, "end": 1, "tensors": []}), "must carry 1 to 1025 tensor"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(body, message):
    with pytest.raises(WireError, match=message):
        decode_body(body)


def _server(peer, start, end, throughput=10.0, state="online", cache=10_000):
    return ServerInfo(peer_id=peer, addrs=(), model="m", start=start, end=end, state=state, throughput=throughput,
                      cache_tokens_left=cache, received=0.0)


def _table(*servers):
    return {s.peer_id: s for s in servers}


@pytest.mark.parametrize(
    "servers, count, expected",
    [
        ((), 10, 0),
        ((_server("a", 0, 10),), 10, 10),
        ((_server("a", 0, 10), _server("b", 10, 20)), 10, 20),
        ((_server("a", 0, 10), _server("b", 20, 30)), 10, 10),
        ((_server("a", 0, 30, throughput=5), _server("b", 0, 10, throughput=50)), 10, 10),
        ((_server("a", 0, 30),), 30, 0),
        ((_server("a", 0, 30, state="offline"),), 10, 0),
    ],
)
def test_choose_blocks_takes_the_weakest_window(servers, count, expected):
    assert choose_blocks(_table(*servers), 30, count) == expected


def test_find_chain_prefers_fast_and_near_servers():
    servers = _table(_server("a", 0, 10), _server("b", 10, 20), _server("c", 20, 30), _server("d", 10, 20, throughput=1))
    chain = find_chain(servers, 30, rtts={"a": 0.001, "b": 0.001, "c": 0.001, "d": 0.001})
    assert chain == [Span("a", 0, 10), Span("b", 10, 20), Span("c", 20, 30)]
    # one wide server beats three hops when hops are expensive
    servers["w"] = _server("w", 0, 30, throughput=100)
    assert find_chain(servers, 30, rtts={"w": 0.05, "a": 0.05, "b": 0.05, "c": 0.05}) == [Span("w", 0, 30)]


def _loaded(peer, start, end, sessions=0, max_batch=1, queued=0, throughput=10.0):
    return dataclasses.replace(_server(peer, start, end, throughput=throughput), sessions=sessions,
                               max_batch=max_batch, queued=queued)


@pytest.mark.parametrize("case, servers, expected", [
    ("idle servers: the faster", [_loaded("a", 0, 30, throughput=20), _loaded("b", 0, 30)], "a"),
    ("a busy server without batching yields to an idle one", [_loaded("a", 0, 30, sessions=4), _loaded("b", 0, 30)], "b"),
    ("a batching server with 16 sessions yields to an idle one",
     [_loaded("a", 0, 30, sessions=16, max_batch=32), _loaded("b", 0, 30, max_batch=32)], "b"),
    ("a batching server's few sessions cost less than a 3× slower idle server",
     [_loaded("a", 0, 30, sessions=2, max_batch=32, throughput=30), _loaded("b", 0, 30, throughput=10)], "a"),
    ("work queued now counts", [_loaded("a", 0, 30, queued=8), _loaded("b", 0, 30, throughput=5)], "b"),
    ("the less loaded of two loaded servers",
     [_loaded("a", 0, 30, sessions=6, max_batch=4), _loaded("b", 0, 30, sessions=2, max_batch=4)], "b"),
])
def test_find_chain_spreads_clients_by_announced_load(case, servers, expected):
    chain = find_chain(_table(*servers), 30, rtts={s.peer_id: 0.01 for s in servers})
    assert [span.peer_id for span in chain] == [expected], case
    assert load_factor(_loaded("x", 0, 30)) == 1.0


def test_find_chain_subranges_banned_and_cache_penalty():
    servers = _table(_server("a", 0, 20), _server("b", 10, 30))
    chain = find_chain(servers, 30, rtts={"a": 0.01, "b": 0.01})
    assert chain[0].start == 0 and chain[-1].end == 30 and len(chain) == 2
    assert find_chain(servers, 30, start=12, end=18, rtts={"a": 0.01, "b": 0.5}) == [Span("a", 12, 18)]
    assert find_chain(servers, 30, start=12, end=18, banned={"a"}) == [Span("b", 12, 18)]
    # banning the only server of a block is ignored
    assert find_chain(servers, 30, start=0, end=5, banned={"a"}) == [Span("a", 0, 5)]
    full = _table(_server("a", 0, 30, cache=0, throughput=1000), _server("b", 0, 30, cache=10_000, throughput=10))
    assert find_chain(full, 30, cache_tokens_needed=100) == [Span("b", 0, 30)]


def test_no_route_names_the_missing_blocks():
    with pytest.raises(NoRouteError, match=r"block\(s\) 10:20 .*--blocks 10:20"):
        find_chain(_table(_server("a", 0, 10), _server("c", 20, 30)), 30)


def test_peer_table_expiry_offline_and_gaps():
    table = PeerTable("m", 30, period=1.0)
    table.update(ServerInfo("a", (), "m", 0, 10, period=1.0, received=0.0))
    table.update(ServerInfo("b", (), "m", 10, 30, period=1.0, received=2.5))
    table.update(ServerInfo("slow", (), "m", 0, 5, period=10.0, received=0.0))
    assert not table.update(ServerInfo("x", (), "other-model", 0, 5))
    assert set(table.snapshot(now=2.0)) == {"a", "b", "slow"}
    assert set(table.snapshot(now=3.5)) == {"b", "slow"}, "a was last heard 3.5 s ago: more than 3 of its periods"
    assert set(table.snapshot(now=31.0)) == set(), "slow announces every 10 s: gone after 30 s"
    table.update(ServerInfo("b", (), "m", 10, 30, period=1.0, received=31.0))
    table.update(ServerInfo("b", (), "m", 10, 30, state="offline"))
    assert table.snapshot(now=31.5) == {}
    assert gaps(_table(_server("a", 0, 10), _server("c", 20, 25)), 30) == [(10, 20), (25, 30)]
    assert coverage(_table(_server("a", 0, 2, throughput=1.5), _server("b", 1, 3, throughput=2)), 3) == [1.5, 3.5, 2.0]


def test_announcements_are_validated():
    with pytest.raises(ValueError, match="malformed"):
        ServerInfo.from_wire({"peer_id": "p", "model": "m", "start": 5, "end": 2})
    with pytest.raises(ValueError, match="malformed"):
        ServerInfo.from_wire({"peer_id": "p", "model": "m", "start": "x", "end": 2})
    info = _server("p", 0, 3)
    assert ServerInfo.from_wire(info.to_wire(), received=0.0) == info
    # what a stranger may put in the newer fields: each a one-line ValueError, never another error
    base = {"peer_id": "p", "model": "m", "start": 0, "end": 2}
    for bad in ({"moves": [[1.0]]}, {"moves": [[]]}, {"moves": [b"x"]}, {"moves": 5}, {"moves": [[1.0, 2, 1, 0, 1]]},
                {"moves": [["inf", 0, 1, 1, 2]]}, {"moves": [[1.0, "a", 1, 1, 2]]}, {"bandwidth": -1},
                {"bandwidth_source": "guessed"}, {"throughput_source": 3}, {"compute": "nan"}, {"network": None}):
        with pytest.raises(ValueError, match="malformed"):
            ServerInfo.from_wire({**base, **bad})
    moved = ServerInfo.from_wire({**base, "moves": [[1.5, 0, 2, 2, 4]] * 50, "bandwidth_source": "measured"})
    assert moved.moves == ((1.5, 0, 2, 2, 4),) * 10  # the latest ten


def test_model_id_depends_on_config_not_file_details():
    def checkpoint(weights="w", **config):  # a stand-in: model_id reads raw_config and fingerprint()
        return SimpleNamespace(raw_config={"model_type": "llama", **config}, fingerprint=lambda: weights)

    a = model_id(checkpoint(hidden_size=8, dtype="float32", _name_or_path="here"))
    b = model_id(checkpoint(hidden_size=8, dtype="bfloat16", _name_or_path="there"))
    c = model_id(checkpoint(hidden_size=16))
    d = model_id(checkpoint(weights="other", hidden_size=8))
    assert a == b and len({a, c, d}) == 3 and a.startswith("llama-")


def test_announcements_must_come_from_the_peer_they_describe():
    info = _server("p", 0, 3)
    assert parse_announcement(msgpack.packb(info.to_wire()), "p").peer_id == "p"
    assert parse_announcement(info.to_wire(), "p").end == 3
    with pytest.raises(ValueError, match="sent by"):
        parse_announcement(msgpack.packb(info.to_wire()), "q")
    with pytest.raises(ValueError, match="not valid msgpack"):
        parse_announcement(b"\xc1\xc1", "p")
    with pytest.raises(ValueError, match="malformed"):
        parse_announcement(msgpack.packb([1, 2]), "p")


def test_bad_throughputs_are_refused_and_joining_servers_count_for_block_choice():
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="malformed"):
            ServerInfo.from_wire({**_server("p", 0, 3).to_wire(), "throughput": bad})
    assert choose_blocks(_table(_server("a", 0, 2, state="joining")), 6, 2) == 2
    with pytest.raises(NoRouteError):
        find_chain(_table(_server("a", 0, 4)), 4, start=0, end=6)


def test_odd_headers_are_wire_errors():
    for header in ({"v": PROTOCOL_VERSION, "kind": [1], "tensors": []},
                   {"v": PROTOCOL_VERSION, "kind": "result", "tensors": [[["x"], [1]]]},
                   {"v": PROTOCOL_VERSION, "kind": "result", "tensors": [["float32", [65536] * 4]]},
                   {"v": PROTOCOL_VERSION, "kind": "result", "tensors": [["float32", [2**31 - 1] * 8]]}):
        with pytest.raises(WireError):
            decode_body(_body(header))


@pytest.mark.parametrize("totals, want", [
    ([3.0, 1.0, 1.0, 2.0, 1.0], {"throughput": 1.0, "blocks": [[1, 3], [4, 5]]}),
    ([2.0, 2.0], {"throughput": 2.0, "blocks": [[0, 2]]}),
    ([0.0, 5.0], {"throughput": 0.0, "blocks": [[0, 1]]}),
    ([], {"throughput": 0.0, "blocks": []}),
])
def test_bottleneck_names_the_weakest_blocks(totals, want):
    from swarm.p2p.status import bottleneck

    assert bottleneck(totals) == want
