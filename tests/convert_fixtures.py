"""Builders for converter tests: a SentencePiece tokenizer, tiny HF models, soul checkpoints with
a real (non-zero) LoRA adapter, and the references that llama.cpp output is compared against."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zptr.checkpoint import build_head, load_checkpoint, save_checkpoint
from zptr.config import ZptrConfig
from zptr.model import ZptrModel
from zptr.testing import save_tiny_model

MIXED_TEXT = (Path(__file__).parent / "data" / "mixed_text.txt").read_text(encoding="utf-8")
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi3": ["qkv_proj", "o_proj"]}
GOLDEN_ALPHA = 1.618


def sentencepiece_tokenizer(directory: Path, vocab_size: int = 480):
    """Train a small byte-fallback SentencePiece BPE model on the mixed text; wrap it for transformers."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for line in MIXED_TEXT.splitlines() if line.strip()] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "sp"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (directory / "sp.model").rename(directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    return AutoTokenizer.from_pretrained(str(directory))


def save_tiny_with_tokenizer(arch: str, directory: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny model whose vocabulary is the SentencePiece tokenizer's (tokenizer.model kept)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    save_tiny_model(arch, directory, tokenizer=tokenizer, **overrides)
    (Path(directory) / "tokenizer.model").write_bytes((Path(tokenizer_dir) / "tokenizer.model").read_bytes())
    return Path(directory)


def make_checkpoint(base_dir: Path, out_dir: Path, arch: str, rotation: str = "so8", omega: bool = True,
                    seed: int = 0, lora_alpha: int = 8, **lora_options) -> Path:
    """A checkpoint whose every part matters: alpha = 1.618, a far-from-identity rotation, a LoRA
    adapter with random non-zero B, and (optionally) an Omega router with a large gate.
    ``lora_options`` go to PEFT's LoraConfig (use_rslora, rank_pattern, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                      init_lora_weights=False, **lora_options)
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():  # PEFT's random init of B is tiny; scale it so the merge moves logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    config = ZptrConfig(hidden_size=base.config.hidden_size, rotation=rotation)
    config.omega.enabled = omega
    zm = ZptrModel(peft_model, config)
    with torch.no_grad():
        zm.set_alpha(GOLDEN_ALPHA)
        rot = zm.head.soul.rotation
        if rotation == "so8":
            rot.generator.normal_(0, 0.5)
        if zm.head.omega is not None:
            zm.head.omega.gate.fill_(0.0)
    return save_checkpoint(out_dir, zm.head, base_model=str(base_dir), architecture=arch, step=450,
                           adapter_writer=peft_model.save_pretrained)


def reference_model(checkpoint_dir: Optional[Path], base_dir: Path, merge: bool = True,
                    soul: bool = True) -> torch.nn.Module:
    """PyTorch ground truth, built independently of the converter: PEFT's own merge_and_unload,
    then the ZPTR head with Omega off (the hook applies the soul before the untouched lm_head).
    ``merge=False`` / ``soul=False`` build what a converter skipping that step would match."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = base
    if checkpoint_dir is not None and merge:
        merged = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
    if checkpoint_dir is None or not soul:
        return merged.eval()
    ckpt = load_checkpoint(checkpoint_dir)
    config = ZptrConfig.from_dict(ckpt.config.to_dict())
    config.omega.enabled = False
    zm = ZptrModel(merged, config)
    zm.head.load_state_dict(build_head(ckpt).state_dict(), strict=False)
    return zm.eval()


@torch.no_grad()
def torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_logits(gguf_path: Path, ids: list[int], f32_cache: bool = True) -> np.ndarray:
    from runtime.llama import open_llama

    kwargs = dict(type_k=0, type_v=0) if f32_cache else {}
    llm = open_llama(Path(gguf_path), logits_all=True, n_ctx=len(ids) + 8, n_batch=len(ids) + 8,
                     n_ubatch=len(ids) + 8, n_threads=2, **kwargs)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return scores


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Mean KL(reference || candidate) per position in float64, top-1 agreement (also over the
    positions that are not near-ties: reference top-2 margin >= 0.01, SPEC §7), max |diff|."""
    from runtime.bench import quality

    mean_kl, top1 = quality(reference, candidate)
    agree = reference.argmax(-1) == candidate.argmax(-1)
    top2 = np.sort(reference, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= 0.01
    return {"mean_kl": mean_kl, "top1": top1, "top1_non_tie": float(agree[clear].mean()),
            "max_abs": float(np.abs(reference - candidate).max()), "n": int(reference.shape[0])}


def make_seed_checkpoint(base_dir: Path, out_dir: Path, arch: str, seed: int = 1) -> Path:
    """A seed-format directory: the PEFT adapter plus ``soul.pt`` with a dense orthogonal rotation."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch],
                                                 init_lora_weights=False))
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    hidden = base.config.hidden_size
    rotation = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(hidden, hidden, bias=False))
    torch.save({"alpha": torch.tensor(GOLDEN_ALPHA), "so8_rotation": rotation.state_dict(), "step": 300},
               out_dir / "soul.pt")
    return out_dir


def runtime_soul_logits(gguf_path: Path, ids: list[int], checkpoint_dir: Path) -> np.ndarray:
    """The unfolded alternative: h_t from llama.cpp on a GGUF without the soul, then the soul and
    the GGUF's own (dequantised) output matrix applied in float64: W (h + sigmoid(alpha) R h)."""
    from runtime.llama import POOLING_NONE, HiddenLlama, open_llama, output_matrix
    from zptr.head import dense_rotation

    n = len(ids) + 8
    llm = open_llama(Path(gguf_path), llama_class=HiddenLlama, embedding=True, pooling_type=POOLING_NONE,
                     logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, type_k=0, type_v=0, n_threads=2)
    hidden, _ = llm.decode_all(ids)
    llm.close()
    ckpt = load_checkpoint(checkpoint_dir)
    rotation = dense_rotation(ckpt.rotation).double().numpy()
    h = hidden.astype(np.float64)
    return (h + ckpt.gate * h @ rotation.T) @ output_matrix(Path(gguf_path)).astype(np.float64).T
