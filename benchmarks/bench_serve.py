"""``zptr serve`` under concurrent streaming clients: one slot against four (continuous batching),
Omega off and fast, next to llama.cpp's own ``llama-server`` when its binary is given.

    .venv/bin/python benchmarks/bench_serve.py                       # bundled SmolLM2 + a random sidecar
    .venv/bin/python benchmarks/bench_serve.py MODEL.gguf -t 2 -n 64 -r 3 --clients 1,4,8
    .venv/bin/python benchmarks/bench_serve.py --llama-server /path/to/llama-server

Every server loads the same GGUF and stays up for the whole run; the measurements interleave
them round by round (a busy machine slows them alike). A round sends, for each client count,
``clients`` threads that each stream one greedy chat request per prompt, every end-of-generation
token banned with ``logit_bias`` so that each request generates exactly ``-n`` tokens. Per
configuration: aggregate tokens/s (all tokens / wall time of the round), first-token latency
(median and p95 over the requests, queue wait included) and per-request decode tokens/s; medians
over the rounds with their spread ((max - min) / median of the aggregate). A spread over 10 %
is flagged ``noisy``: do not file such a figure. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle.", "Tell me about the history of tea."]
NOISY = 0.10


def bundled_with_sidecar(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from omega_fixtures import smollm2_with_sidecar

    return smollm2_with_sidecar(directory)


class Server:
    """One server process on a free port; ``body`` fields it adds to every request."""

    def __init__(self, name: str, argv: list[str], url: str, body: dict):
        self.name, self.url, self.body = name, url, body
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)

    def wait_ready(self) -> None:
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name}: exited with {self.process.returncode}")
            time.sleep(0.5)
        raise SystemExit(f"{self.name}: not ready after 300 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zptr_server(model: Path, slots: int, omega: str, threads: int, cache_prompt: bool) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "zptr", "serve", str(model), "--port", str(port), "-t", str(threads),
            "-np", str(slots), "--queue", "64", *(["--cache-prompt"] if cache_prompt else [])]
    cached = ", cache-prompt" if cache_prompt else ""
    return Server(f"zptr serve -np {slots}, Omega {omega}{cached}", argv, f"http://127.0.0.1:{port}",
                  {"omega": omega})


def llama_server(binary: Path, model: Path, slots: int, threads: int) -> Server:
    port = free_port()
    argv = [str(binary), "-m", str(model), "--port", str(port), "-t", str(threads), "-np", str(slots),
            "-c", str(2048 * slots), "--no-webui"]
    return Server(f"llama-server -np {slots}", argv, f"http://127.0.0.1:{port}", {})


def stream_request(server: Server, prompt: str, n: int, bias: dict) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
            "stream": True, "logit_bias": bias, **server.body}
    sent = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):  # one chunk per token with text
                stamps.append(time.perf_counter())
    first, last = stamps[0], stamps[-1]
    return {"tokens": len(stamps), "first_token_s": first - sent,
            "decode_tps": (len(stamps) - 1) / (last - first) if len(stamps) > 1 else 0.0}


def one_round(server: Server, clients: int, n: int, bias: dict) -> dict:
    jobs = [p for _ in range(clients) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda p: stream_request(server, p, n, bias), jobs))
        wall = time.perf_counter() - start
    waits = sorted(r["first_token_s"] for r in results)
    return {"aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "first_token_s": statistics.median(waits),
            "first_token_p95_s": waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))],
            "decode_tps": statistics.median(r["decode_tps"] for r in results)}


def summarize(rounds: list[dict]) -> dict:
    row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    aggregate = [r["aggregate_tps"] for r in rounds]
    row["spread"] = (max(aggregate) - min(aggregate)) / row["aggregate_tps"]
    return row


def end_tokens(model: Path) -> dict:
    from zptr.runtime.engine import ZptrLlama

    probe = ZptrLlama(model, omega="off", n_ctx=64)
    try:
        return {str(t): -100 for t in range(probe.llm.n_vocab()) if probe.is_end(t)}
    finally:
        probe.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="GGUF with its sidecar (default: bundled SmolLM2 + random sidecar)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-n", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--clients", default="1,4", help="client counts (default 1,4)")
    parser.add_argument("--slots", default="1,4", help="zptr serve -np values (default 1,4)")
    parser.add_argument("--omega", default="off,fast", help="Omega modes (default off,fast)")
    parser.add_argument("--cache-prompt", action="store_true",
                        help="zptr serve --cache-prompt (llama-server reuses a repeated prompt's cache by default)")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else bundled_with_sidecar(Path(tmp))
        bias = end_tokens(model)
        servers = [zptr_server(model, int(slots), omega, args.threads, args.cache_prompt)
                   for slots in args.slots.split(",") for omega in args.omega.split(",")]
        if args.llama_server:
            servers.append(llama_server(args.llama_server, model, max(int(s) for s in args.slots.split(",")),
                                        args.threads))
        try:
            for server in servers:
                server.wait_ready()
                stream_request(server, PROMPTS[0], 8, bias)  # warm-up
            rounds: dict[tuple[str, int], list[dict]] = {}
            for _ in range(args.rounds):
                for count in clients:
                    for server in servers:
                        rounds.setdefault((server.name, count), []).append(one_round(server, count, args.n, bias))
        finally:
            for server in servers:
                server.stop()
    rows = {key: summarize(value) for key, value in rounds.items()}
    print(f"{args.n} tokens per request, {len(PROMPTS)} requests per client, -t {args.threads}, "
          f"{args.rounds} interleaved rounds (medians)\n")
    print("| server | clients | aggregate tok/s | × first row | first token median / p95 | "
          "decode tok/s per request | spread |")
    print("|---|---|---|---|---|---|---|")
    for count in clients:
        base = rows[(servers[0].name, count)]["aggregate_tps"]
        for server in servers:
            row = rows[(server.name, count)]
            flag = " noisy" if row["spread"] > NOISY else ""
            print(f"| {server.name} | {count} | {row['aggregate_tps']:.1f} | {row['aggregate_tps'] / base:.2f} | "
                  f"{row['first_token_s'] * 1000:.0f} / {row['first_token_p95_s'] * 1000:.0f} ms | "
                  f"{row['decode_tps']:.1f} | {100 * row['spread']:.0f} %{flag} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]} / {k[1]}": v for k, v in rows.items()}, indent=2)
                                   + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
