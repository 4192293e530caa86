"""A tiny random-weight Llama model with a locally trained tokenizer, for tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in milliseconds on a
small multilingual text (so Chinese and emoji split across tokens, as with real
models), and the model is a 2-layer Llama built from a config.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference.model_loading import LoadedModel, state_digest

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time in a faraway land there lived a curious engineer.",
    "Continuous batching lets requests join and leave between decode steps.",
    "你好\uff0c世界\uff01今天天气很好。我们在北京吃饭。",
    "Emoji are fun 😀🎉🚀 and so are accents: café, naïve, über.",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :",
]
EOS_TOKEN = "<|endoftext|>"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny_model(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    hidden_size: int = 64,
    context_length: int = 512,
    tokenizer: Any | None = None,
) -> LoadedModel:
    """A random-weight Llama (GQA: 4 query heads, 2 key/value heads) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    eos = int(tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = eos
    return LoadedModel(
        name="tiny-llama",
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        dtype=dtype,
        context_length=context_length,
        eos_token_ids=frozenset({eos}),
        revision=state_digest(model),
    )
