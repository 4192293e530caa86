"""A tiny random Llama model folder: the whole stack starts in seconds.

The tokenizer is the inference tests' byte-level BPE (trained locally, nothing
downloaded); the weights are random, so the text is gibberish, but every path
the demo model takes (chat template, EOS, streaming detokenization) runs.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(folder: Path, *, seed: int = 0, context: int = 512) -> Path:
    """Write config, weights and tokenizer of a ~100k-parameter model into `folder`
    (another `seed` makes other weights, so another model's text)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.doubles.tiny_model import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
