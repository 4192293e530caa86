"""Tiny random-weight models of each family, built from configs (nothing downloaded).

Every model shares the tests' tokenizer, has 2 layers and hidden size 64, and runs
in float32 for token-exact comparisons. In fast-path families, weights transformers
initialises to constants (norm scales of one, zero biases) are randomised too, so a
runner that skipped a norm or a bias would produce different tokens. Output heads
are untied unless a family's test says otherwise: a tied head on a tiny random
model mostly repeats the last token, which would make weak references.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference.model_loading import LoadedModel

CONTEXT = 512
_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": CONTEXT,
    "tie_word_embeddings": False,
}
# family -> (transformers config class name, config fields beyond _COMMON)
FAST_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 256, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {}),  # bias on q, k and v
    "qwen3": (
        "Qwen3Config",
        {
            "head_dim": 32,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.75}),  # fused projections
}
GENERIC_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": CONTEXT,
            "tie_word_embeddings": False,
        },
    ),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": False,
        },
    ),
    # Phi-3 128k / Phi-3.5: "longrope" picks its frequencies by sequence length (long
    # past 32 positions here), which the fast path does not model.
    "phi3_longrope": (
        "Phi3Config",
        {
            **_COMMON,
            "original_max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + i / 8 for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)],
                "original_max_position_embeddings": 32,
            },
        },
    ),
    # Gemma 3: sliding-window layers (window 16) between global ones, q/k norms,
    # soft-capped attention: its transformers cache is not plain keys and values.
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            **_COMMON,
            "head_dim": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": False,
        },
    ),
}


def _randomise_constants(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def build_family(family: str, tokenizer: Any, *, seed: int = 0) -> LoadedModel:
    """A float32 random-weight model of `family` (a key of FAST_ or GENERIC_FAMILIES)."""
    import transformers

    class_name, fields = {**FAST_FAMILIES, **GENERIC_FAMILIES}[family]
    eos = int(tokenizer.eos_token_id)
    base = {} if family in GENERIC_FAMILIES else dict(_COMMON)
    config = getattr(transformers, class_name)(
        **(base | fields),
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    model: Any = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model = model.to(torch.float32).eval()
    if family in FAST_FAMILIES:  # the generic path runs transformers' own code anyway
        _randomise_constants(model, seed)
    model.generation_config.pad_token_id = eos
    return LoadedModel(
        name=f"tiny-{family}",
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=CONTEXT,
        eos_token_ids=frozenset({eos}),
    )
