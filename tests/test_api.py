"""`swarm api` (issue 13): the official `openai` client against a real API instance (uvicorn on a
thread here) over a real swarm of `swarm serve` processes (blocks 0:2, 2:4 and a spare 2:4) of a
tiny llama with a chat template. Text equals `swarm generate` with the same settings; concurrent
streams; a client that goes away frees its sessions; errors in OpenAI's shape; a server killed
mid-stream is invisible (that test runs last: it kills the spare's twin)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from conftest import write_tiny_checkpoint  # noqa: E402
from server_utils import served  # noqa: E402
from swarm.api.app import bind, make_server  # noqa: E402
from swarm.api.backend import ApiConfig, Backend, Job, StopScanner  # noqa: E402
from swarm.engine.adapter_io import save_deep_prompt  # noqa: E402
from swarm.engine.checkpoint import Checkpoint  # noqa: E402
from swarm.config import ClientOptions  # noqa: E402
from swarm.p2p.loop import BackgroundLoop, run  # noqa: E402
from swarm.p2p.status import gather_status  # noqa: E402
from swarm_utils import local_json, running_swarm  # noqa: E402

PROMPT = "The capital of France is"
KEY = "sk-test-key"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama whose tokenizer has a chat template, and a deep-prompt adapter for it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("api")
    model_dir = write_tiny_checkpoint(root / "model", "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    checkpoint = Checkpoint(model_dir)
    g = torch.Generator().manual_seed(3)
    hidden = checkpoint.config.hidden_size
    deep = {f"{i}.prompt": torch.randn(3, hidden, generator=g) * 0.5 for i in range(checkpoint.num_blocks)}
    save_deep_prompt(root / "deep", checkpoint, torch.randn(3, hidden, generator=g), deep, str(model_dir))
    return model_dir, root / "deep"


@contextmanager
def api_server(cfg: ApiConfig):
    """A started backend and its app on uvicorn on a thread; yields (base URL of /v1, backend)."""
    backend = Backend.start(cfg)
    sock = bind("127.0.0.1", 0)
    server = make_server(backend, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", backend
    finally:
        server.should_exit = True
        thread.join(15)
        backend.close()
        sock.close()


@pytest.fixture(scope="module")
def swarm(tiny, tmp_path_factory):
    with running_swarm(tiny[0], ["0:2", "2:4", "2:4"], tmp_path_factory.mktemp("api-swarm")) as servers:
        yield servers


@pytest.fixture(scope="module")
def api(tiny, swarm):
    model_dir, deep = tiny
    options = ClientOptions(model=model_dir, initial_peers=(swarm[0].maddr,), step_timeout=5.0, timeout=10.0)
    cfg = ApiConfig(client=options, api_key=KEY, adapters={"deep": deep})
    with api_server(cfg) as (url, backend):
        yield url, backend


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api[0], api_key=KEY, max_retries=0, timeout=60)


def expected(model_dir, new_tokens: int, *flags: str) -> dict:
    return local_json(["--model", str(model_dir), "--max-new-tokens", str(new_tokens), *flags, PROMPT])


def finish_of(ref: dict, new_tokens: int) -> str:
    return "stop" if len(ref["token_ids"]) < new_tokens else "length"


def complete(client, model: str, chat: bool, stream: bool, **kw) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of a completion or chat request, streamed or not."""
    if chat:
        call = client.chat.completions.create
        kw["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        call = client.completions.create
        kw["prompt"] = PROMPT
    if not stream:
        r = call(model=model, **kw)
        choice = r.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, counts(r.usage)
    parts, finish, usage = [], None, None
    for chunk in call(model=model, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = counts(chunk.usage)
        for choice in chunk.choices:
            parts.append((choice.delta.content or "") if chat else choice.text)
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


def counts(usage) -> dict:
    return {k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def usage_of(ref: dict) -> dict:
    prompt, new = len(ref["prompt_ids"]), len(ref["token_ids"])
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


@pytest.mark.slow
def test_models_swarm_and_page(api, swarm):
    url, backend = api
    headers = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(f"{url}/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["model", "deep"]
    deadline = time.monotonic() + 15  # a server's "online" may reach the API's table an announcement later
    while True:
        status = httpx.get(f"{url}/swarm", headers=headers).json()
        if all(s["state"] == "online" for s in status["servers"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    reference = run(gather_status([swarm[0].maddr]))  # what `swarm status --json` prints
    assert status.keys() == reference.keys()
    assert {s["peer_id"]: s["blocks"] for s in status["servers"]} == {s["peer_id"]: s["blocks"] for s in reference["servers"]}
    assert status["gaps"] == [] and all(c > 0 for c in status["coverage"]) and status["num_blocks"] == 4
    assert all(s["state"] == "online" and s["rtt_ms"] is not None for s in status["servers"]), status["servers"]
    page = httpx.get(url.removesuffix("/v1") + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_text_equals_swarm_generate(tiny, client, chat):
    """Greedy (temperature 0) and sampled (temperature, top_p, seed), streamed and not: the text,
    usage and finish reason of `swarm generate` with the same settings."""
    model_dir = tiny[0]
    chat_flag = ("--chat",) if chat else ()
    greedy = expected(model_dir, 12, *chat_flag)
    sampled = expected(model_dir, 12, "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", *chat_flag)
    for stream in (False, True):
        text, finish, usage = complete(client, "model", chat, stream, max_tokens=12, temperature=0)
        assert (text, finish, usage) == (greedy["text"], finish_of(greedy, 12), usage_of(greedy)), stream
        text, finish, usage = complete(client, "model", chat, stream, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
        assert (text, finish, usage) == (sampled["text"], finish_of(sampled, 12), usage_of(sampled)), stream


@pytest.mark.slow
def test_draft_changes_no_text_and_usage_says_what_speculation_did(tiny, api):
    """swarm's `draft` field: the same text with n-gram drafts as without, greedy or sampled with a
    seed; usage tells the drafted and accepted tokens and the round trips (none for plain
    decoding)."""
    url, _ = api
    headers = {"Authorization": f"Bearer {KEY}"}
    texts, usages = {}, {}
    for draft in ("none", "ngram", "auto"):
        body = {"model": "model", "prompt": PROMPT + " " + PROMPT, "max_tokens": 20, "temperature": 0, "draft": draft}
        reply = httpx.post(f"{url}/completions", json=body, headers=headers, timeout=120).json()
        texts[draft], usages[draft] = reply["choices"][0]["text"], reply["usage"]
    assert texts["ngram"] == texts["none"] == texts["auto"]
    assert "speculation" not in usages["none"]
    spec = usages["ngram"]["speculation"]
    assert spec["round_trips"] >= 1 and 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["round_trips"] + spec["accepted_tokens"] >= usages["ngram"]["completion_tokens"] - 1
    sampled = {"model": "model", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "seed": 1}
    replies = [httpx.post(f"{url}/completions", json={**sampled, "draft": d}, headers=headers, timeout=120).json()
               for d in ("none", "ngram")]
    assert replies[0]["choices"][0]["text"] == replies[1]["choices"][0]["text"]  # the same seed, the same text
    assert "speculation" in replies[1]["usage"]
    bad = httpx.post(f"{url}/completions", json={**sampled, "draft": "model"}, headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "draft"


@pytest.mark.slow
def test_stop_strings_and_adapter(tiny, client, api):
    model_dir, deep = tiny
    ref = expected(model_dir, 16)
    text = ref["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    # the tokens generated until the text first holds the stop string
    decode = api[1].decode
    needed = next(k for k in range(1, 17) if stop in decode(ref["token_ids"][:k]))
    for stream in (False, True):
        got = complete(client, "model", False, stream, max_tokens=16, temperature=0, stop=[stop, "never here"])
        assert got[0] == text[:cut] and got[1] == "stop", (got, stop)
        assert got[2]["completion_tokens"] == needed
    with_adapter = expected(model_dir, 12, "--adapter", str(deep))
    assert with_adapter["text"] != expected(model_dir, 12)["text"]
    assert complete(client, "deep", False, True, max_tokens=12, temperature=0)[0] == with_adapter["text"]


def test_stop_scanner_holds_back_what_may_start_a_stop():
    text = "Hello, world! Stop here."
    scanner = StopScanner(lambda ids: text[: len(ids)], ("Stop", "!!"))
    out = "".join(scanner.push(i) for i in range(len(text)) if not scanner.stopped)
    assert out == "Hello, world! " and scanner.stopped
    scanner = StopScanner(lambda ids: "ab\ufffd"[: len(ids)] if len(ids) < 3 else "abc", ())
    assert [scanner.push(i) for i in range(3)] == ["a", "b", "c"]


def test_token_offsets_follow_characters_split_over_tokens():
    """A character whose bytes come in several tokens (one replacement character per pending byte,
    as byte-fallback tokenizers decode them): its tokens begin where it does, offsets never go
    back, and each is reported once the character is out."""
    texts = ["a", "a\ufffd", "a\ufffd\ufffd", "a€", "a€b"]
    scanner = StopScanner(lambda ids: texts[len(ids) - 1], ())
    shown = []
    for i in range(5):
        scanner.push(i)
        shown.append(scanner.shown())
    assert scanner.offsets == [0, 1, 1, 1, 2]
    assert shown == [1, 1, 1, 4, 5] and scanner.flush() == ""


@pytest.mark.slow
def test_eight_concurrent_streams(tiny, client):
    ref = expected(tiny[0], 20)

    def one(i: int):
        return complete(client, "model", False, True, max_tokens=20, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r == (ref["text"], finish_of(ref, 20), usage_of(ref)) for r in results), results


def _reference_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """The whole model's log-probabilities at every position of ``ids``, in this process."""
    checkpoint = Checkpoint(model_dir)
    head, blocks = checkpoint.load_head(torch.float32), checkpoint.load_blocks(0, checkpoint.num_blocks)
    with torch.no_grad():
        return head.logits(blocks(head.embed(torch.tensor([ids]))))[0].log_softmax(-1)


@pytest.mark.slow
def test_n_choices_each_equal_their_seed_alone(tiny, client, api):
    """n choices run together (the servers batch them) from one prompt step (the servers copy the
    first choice's caches); with a seed, choice i is what seed + i gives alone, streamed or not;
    greedy choices are all the greedy text."""
    model_dir, backend = tiny[0], api[1]
    forked = backend.forked_choices
    refs = [expected(model_dir, 10, "--temperature", "0.9", "--seed", str(5 + i)) for i in range(3)]
    assert len({r["text"] for r in refs}) > 1  # the seeds do give different texts
    r = client.completions.create(model="model", prompt=PROMPT, max_tokens=10, temperature=0.9, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [ref["text"] for ref in refs]
    assert r.usage.completion_tokens == sum(len(ref["token_ids"]) for ref in refs)
    assert backend.forked_choices == forked + 2  # choices 1 and 2 continued from choice 0's prompt step
    texts = ["", "", ""]
    finishes = [None] * 3
    for chunk in client.completions.create(model="model", prompt=PROMPT, max_tokens=10, temperature=0.9, seed=5, n=3,
                                           stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [ref["text"] for ref in refs] and all(finishes)
    greedy = expected(model_dir, 8, "--chat")
    r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                       temperature=0, n=2)
    assert [c.message.content for c in r.choices] == [greedy["text"]] * 2


@pytest.mark.slow
def test_logprobs_and_echo(tiny, client, api):
    """Completions' logprobs with echo and chat's logprobs/top_logprobs: the whole model's
    log-probabilities of the tokens chosen (and of the prompt's), the greedy token the top one,
    tokens that spell the text, the same streamed and not."""
    model_dir, backend = tiny[0], api[1]
    ref = expected(model_dir, 8)
    r = client.completions.create(model="model", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, echo=True)
    choice = r.choices[0]
    assert choice.text == PROMPT + ref["text"]
    lp = choice.logprobs
    ids = ref["prompt_ids"] + ref["token_ids"]
    shown = len(lp.tokens) - len(ref["prompt_ids"])
    assert 0 < shown <= len(ref["token_ids"]) and lp.tokens == [backend.decode([t]) for t in ids[: len(lp.tokens)]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    whole = _reference_logprobs(model_dir, ids)
    for i in range(1, len(lp.tokens)):
        assert lp.token_logprobs[i] == pytest.approx(whole[i - 1, ids[i]].item(), abs=1e-4), i
        top = sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])
        assert len(top) <= 4 and lp.tokens[i] in lp.top_logprobs[i]  # the top 3 and the chosen token
        assert top[0][1] == pytest.approx(whole[i - 1].max().item(), abs=1e-4)
        if i >= len(ref["prompt_ids"]):  # a generated (greedy) token is the most likely one
            assert top[0][0] == lp.tokens[i]
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ref["prompt_ids"])] == len(PROMPT)
    scored = client.completions.create(model="model", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3, n=2)
    for c in scored.choices:  # the prompt alone, scored (what evaluation harnesses ask)
        assert c.text == PROMPT and c.logprobs.tokens == lp.tokens[: len(ref["prompt_ids"])]
        assert c.logprobs.token_logprobs == lp.token_logprobs[: len(ref["prompt_ids"])]
    assert scored.usage.completion_tokens == 0
    plain = client.completions.create(model="model", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    assert plain.choices[0].text == ref["text"] and plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[-shown:]
    streamed = []
    for chunk in client.completions.create(model="model", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                           stream=True):
        streamed += chunk.choices[0].logprobs.token_logprobs if chunk.choices and chunk.choices[0].logprobs else []
    assert streamed == plain.choices[0].logprobs.token_logprobs

    messages = [{"role": "user", "content": PROMPT}]
    chat_ref = expected(model_dir, 8, "--chat")
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == chat_ref["text"]
    assert [e.token for e in content] == [backend.decode([t]) for t in chat_ref["token_ids"][: len(content)]]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and bytes(e.bytes) == e.token.encode()
               for e in content)
    streamed = []
    for chunk in client.chat.completions.create(model="model", messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def _idle_budgets(url: str, timeout: float = 15.0) -> dict[str, int]:
    """The servers' announced cache budgets, once none holds a session."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/swarm", headers={"Authorization": f"Bearer {KEY}"}).json()
        if all(s["sessions"] == 0 for s in status["servers"]):
            return {s["peer_id"]: s["cache_tokens_left"] for s in status["servers"]}
        assert time.monotonic() < deadline, f"sessions still open: {status['servers']}"
        time.sleep(0.1)


@pytest.mark.slow
def test_disconnect_cancels_and_frees_sessions(api, client):
    url, backend = api
    before = _idle_budgets(url)
    stream = client.completions.create(model="model", prompt=PROMPT, max_tokens=240, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    (job,) = backend.jobs
    assert job.chain is not None
    stream.close()
    closed = time.monotonic()
    while not job.finished:
        assert time.monotonic() - closed < 3, "the generation went on after the client left"
        time.sleep(0.005)
    assert len(job.tokens) < 120, f"{len(job.tokens)} tokens generated for a client that left"
    assert _idle_budgets(url, timeout=5) == before  # every server's cache whole again
    assert backend.jobs == set()


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_whole_answer(api, monkeypatch):
    url, backend = api
    started = []
    start = Job.start
    monkeypatch.setattr(Job, "start", lambda job: (started.append(job), start(job)))
    body = {"model": "model", "prompt": PROMPT, "max_tokens": 240, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    left = time.monotonic()
    (job,) = started
    while not job.finished:
        assert time.monotonic() - left < 3, "the generation went on after the client left"
        time.sleep(0.005)
    assert len(job.tokens) < 200, f"{len(job.tokens)} tokens generated for a client that left"


@pytest.mark.slow
def test_errors_have_openai_shape_and_codes(tiny, client, api):
    url = api[0]
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(path, body, headers=auth):
        r = httpx.post(f"{url}/{path}", content=body if isinstance(body, (str, bytes)) else json.dumps(body),
                       headers=headers)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        return r.status_code, error

    assert post("completions", "{not json")[0] == 400
    assert post("chat/completions", b"\xff\xfe")[0] == 400
    for body, param in [
        ({"prompt": PROMPT, "temperature": 5}, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": PROMPT, "n": 17}, "n"),
        ({"prompt": PROMPT, "n": 0}, "n"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ({"prompt": PROMPT, "echo": "yes"}, "echo"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        ({"prompt": PROMPT, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": PROMPT, "stop": [""]}, "stop"),
        ({"prompt": "word " * 300}, "prompt"),  # past the 256-token context
        ({"prompt": ""}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": "false"}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3, "max_tokens": "x"}, "max_tokens"),
        ({"prompt": PROMPT, "model": 5}, "model"),
    ]:
        path = "chat/completions" if "messages" in body else "completions"
        status, error = post(path, {"model": "model", **body})  # (a body's own "model" wins)
        assert (status, error["param"]) == (400, param), (body, error)
    status, error = post("completions", {"model": "gpt-4o", "prompt": PROMPT})
    assert (status, error["code"]) == (404, "model_not_found") and "model" in error["message"]
    assert post("completions", {"model": "model", "prompt": PROMPT}, {"Authorization": "Bearer wrong"})[0] == 401
    assert post("completions", {"model": "model", "prompt": PROMPT}, {})[0] == 401
    assert httpx.get(f"{url}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="model", prompt=PROMPT, temperature=-1)
    assert complete(client, "model", True, True, max_tokens=3, temperature=0)[1] in ("length", "stop")  # still serving


def test_missing_blocks_is_503_naming_them(tiny):
    """A swarm whose only server holds blocks 0:2: every request is a 503 naming 2:4."""
    model_dir = tiny[0]
    background = BackgroundLoop()
    server = served(model_dir, "0:2")
    try:
        _, maddr = background.call(server.__aenter__(), timeout=60)
        cfg = ApiConfig(client=ClientOptions(model=model_dir, initial_peers=(maddr,), timeout=0.3))
        with api_server(cfg) as (url, _):
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as caught:
                    complete(client, "model", True, stream, max_tokens=4)
                assert caught.value.status_code == 503
                assert "2:4" in caught.value.body["message"] and caught.value.body["code"] == "blocks_unserved"
            status = httpx.get(f"{url}/swarm").json()
            assert status["gaps"] == [[2, 4]]
    finally:
        background.call(server.__aexit__(None, None, None), timeout=30)
        background.close()


def test_local_mode_with_an_adapter(tiny):
    """`swarm api --local`: every block here, the adapter's model too; text equals `swarm generate --local`."""
    model_dir, deep = tiny
    with api_server(ApiConfig(client=ClientOptions(model=model_dir, local=True), adapters={"deep": deep})) as (url, backend):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        chat = expected(model_dir, 10, "--chat")
        assert complete(client, "model", True, True, max_tokens=10, temperature=0)[0] == chat["text"]
        adapted = expected(model_dir, 10, "--adapter", str(deep))
        assert complete(client, "deep", False, False, max_tokens=10, temperature=0)[0] == adapted["text"]
        status = httpx.get(f"{url}/swarm").json()
        assert status["gaps"] == [] and [s["blocks"] for s in status["servers"]] == [[0, 4]]


def test_an_error_mid_stream_is_an_error_event(tiny, monkeypatch):
    """A failure after the first token ends the stream with an error event (the `openai` client
    raises it), not a hang or a cut connection; the next request is served."""
    import swarm.api.backend as api_backend
    from swarm.p2p.chain import SwarmError

    real, calls = api_backend.generate, []

    def fails_once(head, open_session, ids, cfg, on_token, prefix=None, scores=None, stats=None, on_rewind=None,
                   stop=None):
        calls.append(1)
        if len(calls) > 1:
            return real(head, open_session, ids, cfg, on_token, prefix=prefix, scores=scores, stats=stats, stop=stop)
        for token in ids[:3]:
            on_token(token)
        raise SwarmError("blocks 2:4 lost their server and no other could take them over")

    monkeypatch.setattr(api_backend, "generate", fails_once)
    with api_server(ApiConfig(client=ClientOptions(model=tiny[0], local=True))) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        parts = []
        with pytest.raises(openai.APIError, match="2:4"):
            for chunk in client.completions.create(model="model", prompt=PROMPT, max_tokens=8, stream=True):
                parts.extend(c.text for c in chunk.choices)
        assert "".join(parts)  # the text before the failure came through
        assert complete(client, "model", False, False, max_tokens=4, temperature=0)[0] == expected(tiny[0], 4)["text"]


def test_cli_errors_are_one_line(tiny, tmp_path):
    from typer.testing import CliRunner

    from swarm.cli.main import app

    model = str(tiny[0])
    taken = bind("127.0.0.1", 0)
    for args, words in [
        (["--local", "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
        ([], "--initial-peers"),
        (["--local", "--adapter", "nodir"], "NAME=DIR"),
        (["--local", "--adapter", f"x={tmp_path}"], "adapter_config.json"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
          "--timeout", "0"], "could not reach the swarm"),
    ]:
        result = CliRunner().invoke(app, ["api", "--model", model, "--port", "0", *args], env={"SWARM_INITIAL_PEERS": ""})
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output, result.output
    taken.close()


@pytest.mark.slow
def test_server_killed_mid_stream_is_invisible(tiny, api, client, swarm, caplog, monkeypatch):
    """Runs last: at the 6th token, kills whichever 2:4 server the stream uses (from the job's own
    thread, so the kill lands mid-generation however fast this machine is); the spare takes over
    from the client's history and the text equals an undisturbed run."""
    ref = expected(tiny[0], 40)
    by_peer = {s.maddr.rsplit("/p2p/", 1)[1]: s for s in swarm}
    killed = []
    on_token = Job._on_token

    def kill_at_6(job, token):
        on_token(job, token)
        if len(job.tokens) == 6:
            victim = by_peer[next(s.span.peer_id for s in job.chain.sessions if s.span.start == 2)]
            victim.proc.kill()
            victim.proc.wait()
            killed.append(victim)

    monkeypatch.setattr(Job, "_on_token", kill_at_6)
    with caplog.at_level("WARNING", logger="swarm.client"):
        text, finish, usage = complete(client, "model", False, True, max_tokens=40, temperature=0)
    assert len(killed) == 1
    assert (text, finish, usage) == (ref["text"], finish_of(ref, 40), usage_of(ref))
    assert any("recovered blocks 2:4" in r.getMessage() for r in caplog.records)


def test_history_prefix_and_fork_field():
    """What a fork copies on the client (the history of whole steps up to a position) and what a
    server takes as a fork request (a session of batch 1, positions within max_length)."""
    from swarm.cache.history import SpanHistory
    from swarm.p2p.sessions import _fork_field

    history = SpanHistory()
    steps = [torch.randn(1, n, 4) for n in (5, 1, 1)]
    for step in steps:
        history.record(step)
    prefix = history.prefix(6)
    assert prefix.step_lengths == [5, 1] and torch.equal(prefix.inputs, torch.cat(steps[:2], dim=1))
    with pytest.raises(ValueError, match="no history ends at position 3"):
        history.prefix(3)
    assert _fork_field(None, 1, 16) is None and _fork_field({"session": "ab", "positions": 6}, 1, 16) == ("ab", 6)
    for bad, batch in [({"session": "ab", "positions": 17}, 1), ({"session": "ab", "positions": 2}, 2),
                       ({"session": 3, "positions": 2}, 1), ("ab", 1)]:
        with pytest.raises(ValueError, match="fork"):
            _fork_field(bad, batch, 16)
