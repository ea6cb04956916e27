"""Runtime benchmark: decode and prefill tokens/s of Omega fast / exact vs bare llama-cpp-python.

One run, one process, the same q4_k_m GGUF for every path. Builds (once, in --workdir) a ZPTR
checkpoint of the bundled SmolLM2-135M with a random soul and Omega router at the given gate,
converts it with the project's converter to q4_k_m + sidecar, then measures, interleaving the
paths round by round so a busy machine slows them alike:

* bare: stock llama-cpp-python, ``Llama.generate`` greedy (no embeddings, no processor),
* off / fast / exact: ``ZptrLlama.stream`` greedy (embeddings on for fast / exact),
* fast-processor: llama-cpp-python's generator with the Omega logits processor (the path of
  create_completion and of sampling),

``-n`` tokens after a ``-p``-token prompt: prefill = time to the first token, decode = the
rest. Then greedy fast vs exact on 20 prompts x 64 tokens: equal output and the share of
certified tokens. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_runtime.py [--gate -5] [--rounds 3] [-n 128] [-p 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from zptr.convert import convert_model
from zptr.dataset import mixed_text_path
from zptr.runtime.engine import ZptrLlama
from zptr.runtime.llama import open_llama

# The sample prompts live with the tests (model_fixtures): they do not ship.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_model(workdir: Path, gate: float, base: str = "bundled") -> Path:
    """q4_k_m GGUF + sidecar of a random-head checkpoint of ``base`` (the bundled SmolLM2 or a
    synthetic model's name; cached per base and gate)."""
    import torch

    from zptr.checkpoint import save_checkpoint
    from zptr.model import ZptrModel
    from zptr.models import load_base_model, resolve_model_path

    target = workdir / f"{base}-gate{gate:g}.q4_k_m.gguf"
    if target.exists():
        return target
    torch.manual_seed(0)
    zm = ZptrModel.from_base(load_base_model(base))
    with torch.no_grad():
        zm.set_alpha(1.618)
        zm.head.omega.gate.fill_(gate)
    ckpt = save_checkpoint(workdir / f"ckpt-{base}-gate{gate:g}", zm.head,
                           base_model=str(resolve_model_path(base)[0]), architecture="llama", step=450,
                           overwrite=True)
    return convert_model(ckpt, target, "q4_k_m", progress=False, overwrite=True).model_path


def timed(generator, prompt_len: int, n_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy token generator drawn for n tokens."""
    start = time.perf_counter()
    first = None
    for count, _ in enumerate(generator, 1):
        first = first or time.perf_counter()
        if count == n_tokens:
            break
    end = time.perf_counter()
    return prompt_len / (first - start), (n_tokens - 1) / (end - first)


def token_generators(bare, engines: dict, n_gen: int) -> dict:
    """name -> (prompt -> greedy token generator). ``bare`` is stock llama-cpp-python's
    ``Llama.generate`` (the baseline); off / fast / exact are ``ZptrLlama.stream``, the engine's
    own greedy loop; ``fast-processor`` is llama-cpp-python's loop with the Omega logits
    processor (the path create_completion and sampling take)."""
    from llama_cpp import LogitsProcessorList

    def engine_stream(engine):
        return lambda prompt: engine.stream(prompt, max_tokens=n_gen, ignore_eos=True)

    def processor(engine):
        return lambda prompt: engine.llm.generate(
            prompt, temp=0.0, logits_processor=LogitsProcessorList([engine.logits_processor(1)]))

    return {"bare": lambda prompt: bare.generate(prompt, temp=0.0),
            **{mode: engine_stream(engine) for mode, engine in engines.items()},
            "fast-processor": processor(engines["fast"])}


def report_timing(paths: dict, bare, engines: dict, prompt: list[int], args) -> None:
    """Interleaved rounds of every path; prints median prefill / decode tok/s and ratios."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, create in paths.items():
            bare.reset()
            results[name].append(timed(create(prompt), len(prompt), args.n_gen))
    medians = {name: (statistics.median(r[0] for r in rows[1:]),
                      statistics.median(r[1] for r in rows[1:]))
               for name, rows in results.items()}

    print(f"prompt {len(prompt)} tokens, {args.n_gen} generated, {args.rounds} rounds (median)")
    print(f"{'path':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode / bare':>14} "
          f"{'prefill / bare':>15}")
    for name, (prefill, decode) in medians.items():
        print(f"{name:8} {prefill:14.1f} {decode:13.1f} {decode / medians['bare'][1]:14.3f} "
              f"{prefill / medians['bare'][0]:15.3f}")
    fast_stats = engines["fast"].stats
    print(f"fast certified during timing: {fast_stats.certified} / "
          f"{fast_stats.certified + fast_stats.fallback}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("zptr-bench") / "bench_runtime")
    parser.add_argument("--model", default="bundled",
                        help="base model: bundled (SmolLM2-135M) or synthetic-270m-262k (Gemma 3 270M's sizes)")
    parser.add_argument("--gate", type=float, default=-5.0, help="omega (sigma(-5) = 0.0067)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (0: equality only)")
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-p", "--n-prompt", type=int, default=256)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--equality-prompts", type=int, default=20)
    parser.add_argument("--equality-tokens", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    model = build_model(args.workdir, args.gate, args.model)
    n_ctx = args.n_prompt + args.n_gen + 16
    common = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads)
    bare = open_llama(model, **common)
    # No prefix reuse between rounds: every prefill is full.
    engines = {mode: ZptrLlama(model, omega=mode, cache_prompt=False, **common)
               for mode in ("off", "fast", "exact")}
    paths = token_generators(bare, engines, args.n_gen)
    text = mixed_text_path().read_text(encoding="utf-8") * 4
    prompt = bare.tokenize(text.encode("utf-8"), add_bos=True)[: args.n_prompt]

    print(f"model {model.name}  sigma(omega) = {engines['fast'].router.gate:.4f}")
    if args.rounds > 0:
        report_timing(paths, bare, engines, prompt, args)
    fast_stats = engines["fast"].stats
    fast_stats.reset()
    from model_fixtures import SAMPLE_PROMPTS

    prompts = (SAMPLE_PROMPTS * 2)[: args.equality_prompts]

    equal = sum(engines["fast"].generate(p, args.equality_tokens).tokens
                == engines["exact"].generate(p, args.equality_tokens).tokens for p in prompts)
    print(f"greedy fast == exact: {equal}/{len(prompts)} prompts x {args.equality_tokens} tokens; "
          f"certified {fast_stats.certified}/{fast_stats.certified + fast_stats.fallback} "
          f"({100 * fast_stats.certified_share:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
