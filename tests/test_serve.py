"""python -m hybridchat.serve as a person uses it: the real server in a subprocess on 127.0.0.1, spoken
to with the official openai client, plain HTTP and a headless browser, over a tiny checkpoint
(tests/serve_checkpoint.py: random weights that always cite document 1)."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_checkpoint import save_cited_checkpoint

from hybridchat.bench.serve import start_server
from hybridchat.rag.answer import ABSTAIN, Answerer
from hybridchat.rag.stream import ReplyStream
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.training.runs import load_run

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixture starts one server subprocess
# for the file.
pytestmark = pytest.mark.xdist_group("serve")

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
MODEL_ID = "tiny/rag"
TOKENS = 6
QUESTIONS = ["Where does Vipiren Reivailo live?", "Who founded Trogrouston Industries?", "When was it founded?"]


class Server:
    """python -m hybridchat.serve in a subprocess (started as the serving benchmark starts it)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc, self.url, self.lines = start_server(list(args), timeout=300, env=env)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    step = save_cited_checkpoint(out)
    server = Server(f"paths.outputs={out}", "run_name=tiny", f"max_answer_tokens={TOKENS}", "batch_size=4",
                    "queue_size=4", "max_request_bytes=20000", env={"HYBRIDCHAT_API_KEY": KEY})
    yield server, step, out
    log = server.stop()
    assert "Traceback" not in log.replace("openai", ""), log[-3000:]


@pytest.fixture(scope="module")
def reference(served):
    """The same checkpoint answering through the Answerer directly: the independent path."""
    _, step, out = served
    run = load_run(step)
    retriever = run.build_retriever(RetrieverConfig(kind="bm25"), out / "cache", progress=False)
    return run, retriever, Answerer(run.model, run.tokenizer, run.config.model.sequence_len, max_answer_tokens=TOKENS)


def client(served, **options):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, timeout=120, **options)


def ask(c, question: str, **options):
    return c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}], **options)


def test_answers_equal_the_answerers_and_streamed_pieces_join_to_them(served, reference):
    run, retriever, answerer = reference
    c = client(served)
    assert [m.id for m in c.models.list()] == [MODEL_ID]
    documents = [[h.document for h in row] for row in retriever.search(QUESTIONS, top_k=RetrieverConfig.top_k)]
    expected = answerer.answer(QUESTIONS, documents)
    closed = answerer.answer(QUESTIONS[:1], [None])[0]
    for question, want in zip(QUESTIONS, expected):
        got = ask(c, question)
        extra = got.model_extra["hybridchat"]
        assert got.choices[0].message.content == want.reply and want.reply.startswith("[1]")
        # cut at max_tokens: OpenAI's "length" (the tiny model rarely writes its stop token)
        cut = "length" if got.usage.completion_tokens == TOKENS else "stop"
        assert got.choices[0].finish_reason == cut
        assert extra["citations"] == want.citations == [1] and extra["cited"] == [want.documents[0].id]
        assert [s["id"] for s in extra["sources"]] == [d.id for d in want.documents]
        assert extra["mode"] == "rag" and extra["abstained"] is False and extra["confidence"] == pytest.approx(
            want.confidence, abs=1e-4)

        chunks = list(ask(c, question, stream=True))
        pieces = [ch.choices[0].delta.content or "" for ch in chunks]
        assert "".join(pieces) == want.reply
        extras = [(i, ch.model_extra.get("hybridchat")) for i, ch in enumerate(chunks) if ch.model_extra.get("hybridchat")]
        first_text = next(i for i, p in enumerate(pieces) if p)
        assert extras[0][0] < first_text and [s["id"] for s in extras[0][1]["sources"]] == [d.id for d in want.documents]
        assert chunks[-1].choices[0].finish_reason == cut and extras[-1][0] == len(chunks) - 1
        assert extras[-1][1]["citations"] == [1] and extras[-1][1]["cited"] == extra["cited"]
    book = ask(c, QUESTIONS[0], extra_body={"retrieval": False})
    assert book.choices[0].message.content == closed.reply and book.model_extra["hybridchat"]["mode"] == "closed-book"
    assert book.model_extra["hybridchat"]["sources"] == []


def test_search_returns_the_knowledge_bases_own_ranking(served, reference):
    _, retriever, _ = reference
    for query, k in (("Trogrouston Industries founded", 5), ("Vipiren Reivailo", 2)):
        response = httpx.post(served[0].url + "/search", json={"query": query, "top_k": k},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200
        want = retriever.search([query], top_k=k)[0]
        got = response.json()["results"]
        assert [r["id"] for r in got] == [h.document.id for h in want] and got
        assert [r["text"] for r in got] == [h.document.text for h in want]


def test_bad_requests_are_4xx_json_errors_and_the_server_goes_on(served):
    url, auth = served[0].url, {"Authorization": f"Bearer {KEY}"}
    message = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Who founded it?"}]}
    cases = [
        (dict(content=b'{"model": "tiny/rag", "messages": ['), auth, 400, "invalid_json"),
        (dict(json={**message, "model": "gpt-4o"}), auth, 404, "model_not_found"),
        (dict(json={**message, "messages": [{"role": "user", "content": "Who? " * 3000}]}), auth, 400,
         "context_length_exceeded"),
        (dict(json={**message, "messages": [{"role": "user", "content": "x" * 30000}]}), auth, 413, "too_large"),
        (dict(json={**message, "n": 2}), auth, 400, "invalid_value"),
        (dict(json={**message, "messages": [{"role": "system", "content": "hi"}]}), auth, 400, "invalid_value"),
        (dict(json=message), {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        (dict(json=message), {}, 401, "invalid_api_key"),
    ]
    for request, headers, status, code in cases:
        response = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, **request)
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert httpx.post(url + "/search", json={"query": ""}, headers=auth).json()["error"]["param"] == "query"
    assert httpx.get(url + "/v1/nothing").status_code == 404
    c = client(served, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="is not served here") as e:
        c.chat.completions.create(model="nope", messages=message["messages"])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="does not fit") as e:
        ask(c, "Who? " * 3000)
    assert e.value.code == "context_length_exceeded"
    assert ask(c, "Who founded it?").choices[0].message.content.startswith("[1]")
    # OpenAI's optional keys are nullable: null is the default, not a type error
    nulls = {key: None for key in ("stream", "n", "max_tokens", "max_completion_tokens", "retrieval", "temperature")}
    response = httpx.post(url + "/v1/chat/completions", json={**message, **nulls}, headers=auth, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"].startswith("[1]")
    assert httpx.post(url + "/search", json={"query": "Trogrouston", "top_k": None}, headers=auth).status_code == 200
    assert served[0].proc.poll() is None


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(served):
    url, auth = served[0].url, {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL_ID, "stream": True, "messages": [{"role": "user", "content": QUESTIONS[1]}]}
    for _ in range(3):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the role chunk, then gone
    assert ask(client(served), QUESTIONS[1]).choices[0].message.content.startswith("[1]")
    assert served[0].proc.poll() is None


def test_concurrent_clients_decode_together_and_a_full_queue_is_refused_with_503(served, reference):
    """batch_size=4, queue_size=4: of 24 clients at once, those queued get the answers one client
    alone gets; the others are refused at once with a JSON error, not left waiting."""
    c = client(served, max_retries=0)
    alone = {q: ask(c, q).choices[0].message.content for q in QUESTIONS}

    def one(i):
        try:
            return QUESTIONS[i % 3], ask(c, QUESTIONS[i % 3]).choices[0].message.content
        except openai.APIStatusError as e:
            return e.status_code, e.body

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    answered = [(q, text) for q, text in results if isinstance(q, str)]
    refused = [(status, body) for status, body in results if not isinstance(status, str)]
    assert answered and all(text == alone[q] for q, text in answered)
    assert refused and all(status == 503 and body["code"] == "server_busy" for status, body in refused)
    assert ask(c, QUESTIONS[0]).choices[0].message.content == alone[QUESTIONS[0]]


def test_command_line_mistakes_are_one_error_line(tmp_path, served):
    for args, needle in ((["run_name=nobody", f"paths.outputs={tmp_path}"], "holds no checkpoint"),
                         (["port=70000"], "port must be in 0..65535"),
                         (["batch_size=0"], "batch_size must be >= 1"),
                         ([f"paths.outputs={served[2]}", "run_name=tiny", "max_answer_tokens=400"],
                          "max_answer_tokens=400 leaves no room for a question in the model's 384-token context")):
        p = subprocess.run([sys.executable, "-m", "hybridchat.serve", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and lines[-1].startswith("error: ") and needle in lines[-1], p.stderr[-2000:]
        assert "Traceback" not in p.stderr


class Bytes:
    """A tokenizer whose tokens are the bytes of a UTF-8 text, decoded as byte-level BPE is."""

    def __init__(self, text):
        self.data = text.encode()

    def decode(self, ids):
        return bytes(self.data[i] for i in ids).decode(errors="replace")


@pytest.mark.parametrize("reply,final,hold,held", [
    (" [2] Vellport \n", "[2] Vellport", False, ""),      # the reply is stripped
    ("café crème", "café crème", False, ""),               # é is two tokens: no U+FFFD goes out between them
    ("The documents dance", "The documents dance", True, ""),
    (ABSTAIN, "[3] Kor", True, ""),                        # an abstention the threshold replaced, never shown
    ("[1] " + ABSTAIN, "[1] " + ABSTAIN, True, ""),
])
def test_streamed_pieces_join_to_the_finished_reply(reply, final, hold, held):
    stream = ReplyStream(Bytes(reply), hold_abstention=hold)
    pieces = [stream.push(i) for i in range(len(reply.encode()))]
    assert "\ufffd" not in "".join(pieces)
    if reply.strip() != final or ABSTAIN in reply:
        assert "".join(pieces) == held  # all of it held back
    assert "".join(pieces) + stream.finish(final) == final


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (Debian: apt-get install "
                    "chromium chromium-driver; `make install` does it as root)")
def test_the_page_streams_an_answer_beside_its_sources_with_the_citation_highlighted(served, reference, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run, retriever, answerer = reference
    question = QUESTIONS[1]
    documents = [h.document for h in retriever.search([question], top_k=RetrieverConfig.top_k)[0]]
    want = answerer.answer([question], [documents])[0]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(served[0].url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "apikey").is_displayed())  # the server wants a key
        driver.find_element(By.ID, "apikey").send_keys(KEY + "\n")
        driver.execute_script("document.getElementById('apikey').dispatchEvent(new Event('change'))")
        wait.until(lambda d: MODEL_ID in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "question").send_keys(question)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: "confidence:" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "answer").text == want.reply.strip()
        sources = driver.find_elements(By.CSS_SELECTOR, "#sources li")
        assert [s.get_attribute("data-id") for s in sources] == [d.id for d in want.documents]
        cited = driver.find_elements(By.CSS_SELECTOR, "#sources li.cited")
        assert [c.get_attribute("data-id") for c in cited] == [want.documents[0].id]
        assert "cited: [1]" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "search-query").send_keys("Trogrouston Industries\n")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results li[data-id]"))
        found = [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#search-results li")]
        assert found == [h.document.id for h in retriever.search(["Trogrouston Industries"], top_k=3)[0]]
        shot = os.environ.get("HYBRIDCHAT_SCREENSHOT") or str(tmp_path / "page.png")
        driver.save_screenshot(shot)
        assert Path(shot).stat().st_size > 1000
    finally:
        driver.quit()


def test_a_confidence_that_is_not_a_number_travels_as_null():
    """The confidence of damaged weights is NaN, which JSON cannot hold."""
    from hybridchat.rag.answer import Answer
    from hybridchat.serve.protocol import extras

    shown = extras(Answer("q", "x", "x", [], False, float("nan")), "rag", None)
    assert json.loads(json.dumps(shown, allow_nan=False))["confidence"] is None


@pytest.mark.parametrize("option", [["--clients", "0"], ["--seconds", "0"], ["--max-tokens", "0"], ["--timeout", "0"],
                                    ["--rss-every", "0"]])
def test_the_benchmarks_out_of_range_options_are_refused_before_a_server_starts(option):
    from hybridchat.bench.serve import main
    from hybridchat.core.errors import UserError

    with pytest.raises(UserError, match="--clients and --max-tokens must be >= 1, --seconds, --timeout and --rss-every > 0"):
        main(option)


def test_the_benchmark_under_faults_answers_every_client_and_samples_memory(served, tmp_path):
    """A short run of the serving benchmark with its misbehaving client beside two others: every
    fault got its status (or closed cleanly), no client failed, memory was sampled across the run
    and the server answered afterwards."""
    from hybridchat.bench.serve import main

    main(["--clients", "2", "--seconds", "6", "--max-tokens", "4", "--faults", "--rss-every", "0.2",
          "--out", str(tmp_path), "--", f"paths.outputs={served[2]}", "run_name=tiny", "api_key=null"])
    result = json.loads((tmp_path / "serve.json").read_text())
    row = result["rows"][0]
    assert row["requests"] > 0 and row["failed"] == 0 and row["after_status"] == 200
    assert 0 < row["server_cpu_ms_per_token"] < 1000
    assert {f["kind"] for f in result["faults"]} == {"malformed JSON", "unknown model", "oversized prompt",
                                                      "left, not streamed", "left mid-stream"}
    assert all(f["sent"] >= 1 and f["as expected"] for f in result["faults"]), result["faults"]
    times = [t for t, _ in result["rss_samples"]]
    assert len(times) >= 10 and times[-1] >= 5.5 and row["rss_max_MB"] >= max(row["rss_start_MB"], row["rss_end_MB"])
