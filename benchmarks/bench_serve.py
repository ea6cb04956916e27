"""``zptr serve`` against ``zptr run`` on the same GGUF: first-token latency and decode tokens/s
at 1 and 4 concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py                 # bundled SmolLM2 + a random sidecar
    .venv/bin/python benchmarks/bench_serve.py MODEL.gguf -t 2 -n 64 -r 2

``zptr run`` (one process per prompt) reports its own prefill time (= its first-token latency,
model load excluded) and decode tokens/s. The server is measured from the client: a streamed
greedy chat request per prompt, first token = the first chunk carrying a route, decode tokens/s
= (tokens - 1) / (last token - first token); at 4 clients each of 4 threads sends every prompt,
so a request's first-token latency includes its wait in the queue, and the aggregate tokens/s is
all tokens / wall time. Every end-of-generation token is banned with logit_bias so that each
request generates exactly -n tokens. Medians over the requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle.", "Tell me about the history of tea."]


def bundled_with_sidecar(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from omega_fixtures import smollm2_with_sidecar

    return smollm2_with_sidecar(directory)


def run_cli(model: Path, prompt: str, n: int, threads: int) -> dict:
    """One ``zptr run`` with --show-routes: its own summary line."""
    done = subprocess.run([sys.executable, "-m", "zptr", "run", str(model), "-p", prompt, "-n", str(n),
                           "-t", str(threads), "--show-routes", "--no-color"],
                          capture_output=True, text=True, check=True)
    found = re.search(r"(\d+) tokens, prefill (\d+) ms, decode ([\d.]+) tok/s", done.stderr)
    tokens, prefill_ms, tps = found.groups()
    return {"tokens": int(tokens), "first_token_s": int(prefill_ms) / 1000, "decode_tps": float(tps)}


def stream_request(url: str, prompt: str, n: int, bias: dict) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
            "stream": True, "logit_bias": bias}
    sent = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"route": "' in line:
                stamps.append(time.perf_counter())
    first, last = stamps[0], stamps[-1]
    return {"tokens": len(stamps), "first_token_s": first - sent,
            "decode_tps": (len(stamps) - 1) / (last - first) if len(stamps) > 1 else 0.0,
            "sent": sent, "done": last}


def serve_round(url: str, clients: int, n: int, bias: dict, repeats: int) -> dict:
    jobs = [p for p in PROMPTS for _ in range(repeats)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda p: stream_request(url, p, n, bias),
                                [p for _ in range(clients) for p in jobs]))
        wall = time.perf_counter() - start
    return {"requests": len(results),
            "first_token_s": statistics.median(r["first_token_s"] for r in results),
            "first_token_max_s": max(r["first_token_s"] for r in results),
            "decode_tps": statistics.median(r["decode_tps"] for r in results),
            "aggregate_tps": sum(r["tokens"] for r in results) / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="GGUF with its sidecar (default: bundled SmolLM2 + random sidecar)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-n", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("-r", "--repeats", type=int, default=1, help="rounds over the prompts (default 1)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else bundled_with_sidecar(Path(tmp))
        rows = {}
        runs = [run_cli(model, p, args.n, args.threads) for p in PROMPTS for _ in range(args.repeats)]
        rows["zptr run"] = {"requests": len(runs),
                            "first_token_s": statistics.median(r["first_token_s"] for r in runs),
                            "first_token_max_s": max(r["first_token_s"] for r in runs),
                            "decode_tps": statistics.median(r["decode_tps"] for r in runs),
                            "aggregate_tps": None}
        server = subprocess.Popen([sys.executable, "-m", "zptr", "serve", str(model), "--port", "0",
                                   "-t", str(args.threads), "--queue", "64"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = server.stdout.readline().split()[2].rstrip("/")
            from zptr.runtime.engine import ZptrLlama

            probe = ZptrLlama(model, omega="off", n_ctx=64)
            bias = {str(t): -100 for t in range(probe.llm.n_vocab()) if probe.is_end(t)}
            probe.close()
            stream_request(url, PROMPTS[0], 8, bias)  # warm-up
            for clients in (1, 4):
                rows[f"zptr serve, {clients} client{'s' if clients > 1 else ''}"] = serve_round(
                    url, clients, args.n, bias, args.repeats)
        finally:
            server.terminate()
            server.wait(30)
    print(f"| {args.n} tokens, -t {args.threads} | requests | first token (median / max) | "
          "decode tok/s per request | aggregate tok/s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        aggregate = "" if row["aggregate_tps"] is None else f"{row['aggregate_tps']:.1f}"
        print(f"| {name} | {row['requests']} | {row['first_token_s'] * 1000:.0f} / "
              f"{row['first_token_max_s'] * 1000:.0f} ms | {row['decode_tps']:.1f} | {aggregate} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
