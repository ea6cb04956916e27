"""``zptr run MODEL.gguf -p PROMPT``: generate on llama.cpp with Omega routing (flags as llama-cli).

With a chat template in the GGUF, ``-p`` is the user's message in one chat turn (as llama-cli's
conversation mode) and ``--system`` sets a system prompt; ``--raw`` continues the text as it is.
``--show-routes`` colours each token by its Omega route and ends with a route histogram and the
fast mode's certified / fallback counts; ``-i`` chats.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from ..choices import FinishReason, OmegaMode
from ..config import CLUSTERS
from ..errors import ConfigError
from ..runtime.engine import Generation, ZptrLlama
from ..runtime.sampling import SamplingSettings
from .args import add_engine_arguments, engine_options

# ANSI colours per route (BOUNDARY, DEPTH, PHASE, BASE); BASE stays uncoloured.
ROUTE_COLOURS = {"BOUNDARY": "\033[31m", "DEPTH": "\033[34m", "PHASE": "\033[32m", "BASE": ""}
RESET = "\033[0m"
ROUTE_TAGS = {"BOUNDARY": "BND", "DEPTH": "DEP", "PHASE": "PHA", "BASE": "BAS"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("-p", "--prompt", default=None,
                        help="the user's message (a chat turn when the GGUF has a chat template; "
                             "the text to continue with --raw)")
    parser.add_argument("--raw", action="store_true", help="plain completion of -p, no chat template")
    parser.add_argument("--system", default=None, help="system prompt of the chat")
    parser.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("-i", "--interactive", action="store_true", help="interactive chat")
    parser.add_argument("--show-routes", action="store_true",
                        help="colour tokens by route, print a route histogram")
    parser.add_argument("--no-color", action="store_true",
                        help="with --show-routes: tags [BND] [DEP] [PHA] [BAS] instead of colours")
    parser.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy; default 0)")
    parser.add_argument("--top-k", type=int, default=40, help="(default 40; 0: no limit)")
    parser.add_argument("--top-p", type=float, default=0.95, help="(default 0.95)")
    parser.add_argument("--min-p", type=float, default=0.05, help="(default 0.05)")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="(default 1.0: none)")
    parser.add_argument("-s", "--seed", type=int, default=None)
    add_engine_arguments(parser, omega_help="Omega routing: auto (fast when a sidecar pairs), off, exact, fast",
                         origin_help="origin text (user's own text / persona)")


def _render(piece: str, route: Optional[int], args: argparse.Namespace) -> str:
    if not args.show_routes or route is None:
        return piece
    name = CLUSTERS[route]
    if args.no_color:
        return f"[{ROUTE_TAGS[name]}]{piece}"
    colour = ROUTE_COLOURS[name]
    return f"{colour}{piece}{RESET}" if colour else piece


def _emit(llm: ZptrLlama, tokens: list[int], settings: SamplingSettings, args: argparse.Namespace,
          out: TextIO) -> Generation:
    request = llm.start(tokens, settings)
    for token in llm.run(request):
        out.write(_render(token.piece, token.route, args))
        out.flush()
    out.write(request.tail)  # what was held back to the end (an unfinished character)
    return request.result()


def _notices(llm: ZptrLlama, result: Generation, err: TextIO) -> None:
    if not result.tokens and result.finish_reason == FinishReason.STOP:
        err.write("zptr run: the model ended its answer at once (its first token ends the turn)\n")
    if result.finish_reason == FinishReason.CONTEXT:
        err.write(f"zptr run: generation stopped at the end of the context ({llm.n_ctx} tokens; "
                  "raise -c/--ctx-size)\n")


def _summary(llm: ZptrLlama, result: Generation, args: argparse.Namespace, err: TextIO) -> None:
    if llm.omega_on:
        histogram = "  ".join(f"{name} {count}" for name, count in result.route_histogram().items())
        err.write(f"routes: {histogram}\n")
        stats = llm.stats
        if llm.mode == OmegaMode.FAST:
            err.write(f"omega fast: {stats.certified} certified, {stats.fallback} fallback "
                      f"({100 * stats.certified_share:.1f} % certified)\n")
        if not args.no_color:
            legend = " ".join(f"{ROUTE_COLOURS[n]}{n}{RESET}" for n in CLUSTERS)
            err.write(f"legend: {legend}\n")
    err.write(f"{len(result.tokens)} tokens, prefill {result.prefill_s * 1000:.0f} ms, "
              f"decode {result.decode_tps:.1f} tok/s\n")


def _messages(args: argparse.Namespace, turns: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + turns


def _chat(llm: ZptrLlama, settings: SamplingSettings, args: argparse.Namespace) -> None:
    """A chat loop over the model's chat template."""
    turns: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            print("zptr run: that line is not valid UTF-8; type it again", file=sys.stderr)
            continue
        turns.append({"role": "user", "content": line})
        result = _emit(llm, llm.chat_tokens(_messages(args, turns)), settings, args, sys.stdout)
        print()
        _notices(llm, result, sys.stderr)
        if args.show_routes:
            _summary(llm, result, args, sys.stderr)
        turns.append({"role": "assistant", "content": result.text})


def main(args: argparse.Namespace) -> int:
    if args.prompt is None and not args.interactive:
        raise ConfigError("give a prompt with -p, or -i for a chat")
    if args.prompt == "" and not args.interactive:
        raise ConfigError("the prompt (-p) is empty")
    settings = SamplingSettings(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                seed=args.seed)
    llm = ZptrLlama(args.model, **engine_options(args))
    try:
        if args.interactive:
            if not llm.chat_template:
                raise ConfigError(f"{args.model} carries no chat template: -i needs one (use -p with --raw)")
            _chat(llm, settings, args)
            return 0
        chat = llm.chat_template is not None and not args.raw
        if args.system and not chat:
            raise ConfigError("--system needs a chat (a GGUF with a chat template, without --raw)")
        tokens = (llm.chat_tokens(_messages(args, [{"role": "user", "content": args.prompt}])) if chat
                  else llm.tokenize(args.prompt))
        result = _emit(llm, tokens, settings, args, sys.stdout)
        print()
        _notices(llm, result, sys.stderr)
        if args.show_routes:
            _summary(llm, result, args, sys.stderr)
    finally:
        llm.close()
    return 0
