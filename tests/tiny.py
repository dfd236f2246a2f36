"""A tiny Llama and tokenizer built offline in well under a second.

The tokenizer is a byte-level BPE trained on the synthetic task text, so every
prompt round-trips; the model is a 2-layer Llama with the same module names
(q_proj, v_proj, ...) as SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedllm_flwr.data.prompts import format_prompt
from fedllm_flwr.data.synthetic import TASKS, generate

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [format_prompt(r["instruction"]) + r["output"] for r in generate(sorted(TASKS), 20, seed=0)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(folder: Path, layers: int = 2) -> Path:
    """Write a tiny model + tokenizer folder loadable with `from_pretrained`."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
