"""``zptr run MODEL.gguf -p PROMPT -n 128 [--omega auto|off|exact|fast] [--origin TEXT]``.

Prints the generated text; ``--show-routes`` colours each token by its Omega route and ends
with a route histogram and the fast mode's certified / fallback counts; ``-i`` chats.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from ..config import CLUSTERS
from ..runtime.engine import OMEGA_MODES, Generation, ZptrLlama, collect

# ANSI colours per route (BOUNDARY, DEPTH, PHASE, BASE); BASE stays uncoloured.
ROUTE_COLOURS = {"BOUNDARY": "\033[31m", "DEPTH": "\033[34m", "PHASE": "\033[32m", "BASE": ""}
RESET = "\033[0m"
ROUTE_TAGS = {"BOUNDARY": "BND", "DEPTH": "DEP", "PHASE": "PHA", "BASE": "BAS"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("-p", "--prompt", default=None, help="prompt text")
    parser.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    parser.add_argument("-i", "--interactive", action="store_true", help="interactive chat")
    parser.add_argument("--omega", choices=OMEGA_MODES, default="auto",
                        help="Omega routing: auto (fast when a sidecar pairs), off, exact, fast")
    parser.add_argument("--sidecar", default=None, help="Omega sidecar (default: X.omega.gguf)")
    parser.add_argument("--origin", default=None, help="origin text (user's own text / persona)")
    parser.add_argument("--show-routes", action="store_true",
                        help="colour tokens by route, print a route histogram")
    parser.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-p", type=float, default=0.05)
    parser.add_argument("--repeat-penalty", type=float, default=1.0)
    parser.add_argument("-s", "--seed", type=int, default=None)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    parser.add_argument("--no-color", action="store_true", help="route tags as [BND] [DEP] [PHA] [BAS] before each token")


def _render(piece: str, route: Optional[int], args: argparse.Namespace) -> str:
    if not args.show_routes or route is None:
        return piece
    name = CLUSTERS[route]
    if args.no_color:
        return f"[{ROUTE_TAGS[name]}]{piece}"
    colour = ROUTE_COLOURS[name]
    return f"{colour}{piece}{RESET}" if colour else piece


def _emit(llm: ZptrLlama, prompt, args: argparse.Namespace, out: TextIO) -> Generation:
    sampling = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty, seed=args.seed)
    tokens = llm.tokenize(prompt) if isinstance(prompt, str) else prompt

    def echoed():
        for token, piece, route in llm.stream(tokens, args.n_predict, **sampling):
            out.write(_render(piece, route, args))
            out.flush()
            yield token, piece, route

    return collect(tokens, echoed())


def _summary(llm: ZptrLlama, result: Generation, args: argparse.Namespace, err: TextIO) -> None:
    if llm.omega_on:
        histogram = "  ".join(f"{name} {count}" for name, count in result.route_histogram().items())
        err.write(f"routes: {histogram}\n")
        stats = llm.stats
        if llm.mode == "fast":
            err.write(f"omega fast: {stats.certified} certified, {stats.fallback} fallback "
                      f"({100 * stats.certified_share:.1f} % certified)\n")
        if not args.no_color:
            legend = " ".join(f"{ROUTE_COLOURS[n]}{n}{RESET}" for n in CLUSTERS)
            err.write(f"legend: {legend}\n")
    err.write(f"{len(result.tokens)} tokens, prefill {result.prefill_s * 1000:.0f} ms, "
              f"decode {result.decode_tps:.1f} tok/s\n")


def _chat(llm: ZptrLlama, args: argparse.Namespace) -> None:
    """A minimal chat loop over the model's chat template (llama-cpp-python's formatter)."""
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        messages.append({"role": "user", "content": line})
        prompt = _chat_prompt(llm, messages)
        result = _emit(llm, prompt, args, sys.stdout)
        print()
        if args.show_routes:
            _summary(llm, result, args, sys.stderr)
        messages.append({"role": "assistant", "content": result.text})


def _chat_prompt(llm: ZptrLlama, messages: list[dict]) -> list[int]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.llm.metadata.get("tokenizer.chat_template")
    if not template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return llm.tokenize(text)
    eos = llm.llm.detokenize([llm.llm.token_eos()]).decode("utf-8", "replace")
    bos = llm.llm.detokenize([llm.llm.token_bos()]).decode("utf-8", "replace")
    formatted = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages)
    return llm.tokenize(formatted.prompt)


def main(args: argparse.Namespace) -> int:
    if args.prompt is None and not args.interactive:
        print("zptr run: give a prompt with -p, or -i for a chat", file=sys.stderr)
        return 2
    llama_kwargs = {"n_threads": args.threads, "n_gpu_layers": args.n_gpu_layers}
    llm = ZptrLlama(args.model, omega=args.omega, sidecar=args.sidecar, origin=args.origin,
                    n_ctx=args.ctx_size, **llama_kwargs)
    try:
        if args.interactive:
            _chat(llm, args)
            return 0
        result = _emit(llm, args.prompt, args, sys.stdout)
        print()
        if args.show_routes:
            _summary(llm, result, args, sys.stderr)
    finally:
        llm.close()
    return 0
