"""Serving benchmark: N concurrent clients against python -m hybridchat.serve on 127.0.0.1 for S seconds.

    python -m hybridchat.bench serve [--clients 32] [--seconds 60] [--max-tokens 16] [--faults] [-- SERVE_ARGS ...]

Starts the server in a subprocess (any free port; SERVE_ARGS after `--` go to it, e.g.
`-- run_name=hybrid_tiny batch_size=16`; the default is make run's checkpoint, as `make serve` serves),
asks one question to warm it up, then each client asks questions one after another (non-streamed
chat completions over plain HTTP, a fresh connection each) until the time is up. Reports failed
requests (any status but 200, or no answer), p50/p95 latency, requests/s and generated tokens/s
(the usage the server reports), the server's CPU time per generated token (Linux /proc: what the
server's work costs, whatever else shares the cores), and its resident memory, sampled every
--rss-every seconds from the warm-up to the end: start, end, max (and a plot over the run).
--faults adds one misbehaving client beside them (bench/serve_faults.py: malformed JSON, an unknown
model, an oversized prompt, clients that leave mid-request) and reports what each of its requests
got; after the run the server must still answer. Bounded: requests still running at the deadline
are waited for, at most one request timeout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from hybridchat.bench import report, serve_faults
from hybridchat.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["Where was {} born?", "Where does {} live?", "Who founded {}?", "What does {} do?"]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time the process has used, all its threads (Linux /proc): unlike wall time, barely moved
    by other processes taking turns on the same core, so two versions compare under shared load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def start_server(args: list[str], timeout: float, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, str, list[str]]:
    """python -m hybridchat.serve port=0 *args in a subprocess, once it listens: (the process, its
    address, its stderr lines, which a thread keeps collecting while it runs)."""
    proc = subprocess.Popen([sys.executable, "-m", "hybridchat.serve", "port=0", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving ") and " on http://" in line:
                found.append(line.split(" on ")[1].split()[0].rstrip("/"))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    if not found:
        proc.kill()
        said = [line for line in lines if line.startswith("error: ")]
        raise UserError(f"the server did not start: {said[-1][7:].strip() if said else ''.join(lines)[-500:]}")
    return proc, found[0], lines


class Sampler:
    """The server's resident memory every `every` seconds on a thread of its own: (seconds, MB)."""

    def __init__(self, pid: int, every: float, t0: float):
        self.pid, self.every, self.t0 = pid, every, t0
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            if (mb := rss_mb(self.pid)) is not None:
                self.samples.append((time.perf_counter() - self.t0, mb))
            if self.stopped.wait(self.every):
                return

    def stop(self) -> list[tuple[float, float]]:
        self.stopped.set()
        self.thread.join()
        return self.samples


def call(url: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """POST body as JSON (GET without one); (the status, the JSON answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def questions(url: str, model: str) -> list[str]:
    """Questions about the knowledge base's own entities (its titles), so retrieval finds something."""
    status, found = call(url, "/search", {"query": "born founded lives company city", "top_k": 8})
    titles = [r["title"] for r in found.get("results", [])] if status == 200 else []
    return [q.format(t) for t in titles or ["Ada Vell"] for q in QUESTIONS]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16, help="per reply (the server caps it at max_answer_tokens)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request, and for the server to start")
    parser.add_argument("--faults", action="store_true", help="one misbehaving client beside the others")
    parser.add_argument("--rss-every", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--out", default="outputs/bench/serve")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1 or args.timeout <= 0 or args.rss_every <= 0:
        raise UserError("--clients and --max-tokens must be >= 1, --seconds, --timeout and --rss-every > 0")

    proc, url, log = start_server(serve_args, args.timeout)
    faults: list[tuple[str, int | None]] = []
    try:
        status, models = call(url, "/v1/models")
        if status != 200:
            raise UserError(f"GET /v1/models: {status} {models.get('error', {}).get('message')} (an api_key set? "
                            f"the benchmark sends none: give api_key=null after --)")
        model, about = models["data"][0]["id"], models["data"][0]["hybridchat"]
        asked = questions(url, model) if about["retrieval"] else [q.format("Ada Vell") for q in QUESTIONS]
        body = lambda q: {"model": model, "max_tokens": args.max_tokens,  # noqa: E731
                          "messages": [{"role": "user", "content": q}]}
        call(url, "/v1/chat/completions", body(asked[0]), args.timeout)  # warm-up

        records: list[tuple[float, float, int, int]] = []  # (end time, latency, status, tokens)
        lock, t0 = threading.Lock(), time.perf_counter()
        sampler, cpu_start = Sampler(proc.pid, args.rss_every, t0), cpu_seconds(proc.pid)
        deadline = t0 + args.seconds

        def client(i: int) -> None:
            n = i
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    status, reply = call(url, "/v1/chat/completions", body(asked[n % len(asked)]), args.timeout)
                    tokens = reply.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
                except (OSError, http.client.HTTPException, ValueError):
                    status, tokens = 0, 0
                end = time.perf_counter()
                with lock:
                    records.append((end - t0, end - start, status, tokens))
                n += args.clients

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        if args.faults:
            threads.append(threading.Thread(target=lambda: faults.extend(serve_faults.misbehave(
                url, model, lambda: time.perf_counter() >= deadline))))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        memory, cpu_end = sampler.stop(), cpu_seconds(proc.pid)
        # still up and answering once the load and the faults are over
        after = call(url, "/v1/chat/completions", body(asked[0]), args.timeout)[0] if proc.poll() is None else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    ok = [r for r in records if r[2] == 200]
    latencies = sorted(r[1] for r in ok)
    quantile = (lambda q: statistics.quantiles(latencies, n=100)[q - 1] if len(latencies) > 1  # noqa: E731
                else (latencies[0] if latencies else None))
    mb = [m for _, m in memory]
    row = {"model": model, "clients": args.clients, "seconds": round(wall, 1), "requests": len(records),
           "failed": len(records) - len(ok), "p50_s": quantile(50), "p95_s": quantile(95),
           "req_per_s": len(ok) / wall, "tokens_per_s": sum(r[3] for r in ok) / wall,
           "server_cpu_ms_per_token": (1000 * (cpu_end - cpu_start) / max(sum(r[3] for r in ok), 1)
                                       if cpu_start is not None and cpu_end is not None else None),
           "rss_start_MB": mb[0] if mb else None, "rss_end_MB": mb[-1] if mb else None,
           "rss_max_MB": max(mb, default=None), "after_status": after}
    statuses = {str(s): sum(r[2] == s for r in records) for s in sorted({r[2] for r in records})}
    extra = {}
    if args.faults:
        extra["faults"] = serve_faults.summary(faults)
        print(report.format_table(extra["faults"], list(extra["faults"][0])))
    report.save("serve", [row], list(row), args.out, figure=_figure(records, memory, args), statuses=statuses,
                rss_samples=memory, config={**vars(args), "serve_args": serve_args}, **extra)


def _figure(records, memory, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    ok = [r for r in records if r[2] == 200]
    axes[0].hist([r[1] for r in ok] or [0], bins=30)
    axes[0].set(title="latency of answered requests", xlabel="seconds", ylabel="requests")
    axes[1].scatter([r[0] for r in ok], [r[1] for r in ok], s=6, label="answered")
    failed = [r for r in records if r[2] != 200]
    if failed:
        axes[1].scatter([r[0] for r in failed], [r[1] for r in failed], s=10, c="red", label="failed")
    axes[1].set(title="latency over the run", xlabel="seconds since start", ylabel="latency (s)")
    axes[1].legend()
    axes[2].plot([t for t, _ in memory], [m for _, m in memory])
    axes[2].set(title="server resident memory", xlabel="seconds since start", ylabel="MB")
    axes[2].set_ylim(bottom=0)
    fig.suptitle(f"hybridchat.serve: {args.clients} clients for {args.seconds:g} s")
    fig.tight_layout()
    return fig
