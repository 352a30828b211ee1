"""A tiny random-weight llama model for llama.cpp's server, written at test time.

No model file is downloaded or shipped: :func:`write_tiny_llama` writes a 0.5 MB GGUF
(2 layers, embedding 64, a SentencePiece-style vocabulary of 393 tokens with all 256 byte
tokens, a ChatML chat template) with the ``gguf`` package in well under a second. Its
answers are random text, but llama.cpp loads, tokenizes, templates and generates with it
exactly as with a real model, which is what the contract checks need.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported when a model is written, not at collection
    import numpy as np

__all__ = ["CHATML_TEMPLATE", "CONTEXT_LENGTH", "Shape", "vocabulary", "write_tiny_llama"]

#: The model's trained context; the server runs with ``n_ctx`` of its own (see servers.py).
CONTEXT_LENGTH = 512
_HEADS = 4


@dataclass(frozen=True)
class Shape:
    """The model's size: the default is tiny (0.5 MB, about 10,000 tokens a second here);
    a larger one generates slowly enough for a kill to find a call in flight."""

    embed: int = 64
    layers: int = 2
    feed_forward: int = 128

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = ("the", "a", "and", "to", "of", "in", "is", "it", "you", "that", "he", "was",
          "for", "on", "are", "with", "as", "I", "his", "they", "be", "at", "one", "have",
          "this", "from", "or", "had", "by", "hot", "word", "but", "what", "some", "we",
          "can", "out", "other", "were", "all", "there", "when", "up", "use", "your",
          "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will",
          "way", "about", "many", "then", "them", "write", "would", "like", "so", "these",
          "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more",
          "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people",
          "my", "over", "know", "water", "than", "call", "first", "who", "may", "down",
          "side", "been", "now", "find", "hello", "Hutch", "queue", "broker", "model")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: ``<unk> <s> </s>``, the two ChatML markers, the
    256 byte tokens (so any text can be tokenized), then ``▁`` words and characters."""
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]  # unknown, then control tokens
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    pieces = ["▁", *(f"▁{word}" for word in _WORDS),
              *string.ascii_lowercase]
    tokens = specials + byte_tokens + pieces
    types += [6] * len(byte_tokens) + [1] * len(pieces)
    # SentencePiece scores: higher merges first; specials and bytes score 0.
    scores = [0.0] * (len(specials) + len(byte_tokens)) + [
        -float(rank) for rank in range(len(pieces))]
    return tokens, scores, types


def _tensors(shape: Shape, vocab_size: int, rng: np.random.Generator
             ) -> dict[str, np.ndarray]:
    """Random weights in numpy's (rows, columns) order, which gguf reverses to ggml's."""
    import numpy as np

    embed, ff = shape.embed, shape.feed_forward

    def weight(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(embed, dtype=np.float32)

    tensors = {"token_embd.weight": weight(vocab_size, embed), "output_norm.weight": norm(),
               "output.weight": weight(vocab_size, embed)}
    for layer in range(shape.layers):
        block = f"blk.{layer}"
        tensors |= {f"{block}.attn_norm.weight": norm(), f"{block}.ffn_norm.weight": norm(),
                    f"{block}.ffn_gate.weight": weight(ff, embed),
                    f"{block}.ffn_up.weight": weight(ff, embed),
                    f"{block}.ffn_down.weight": weight(embed, ff)}
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{block}.{name}.weight"] = weight(embed, embed)
    return tensors


def write_tiny_llama(path: Path, shape: Shape = Shape(), *, seed: int = 0) -> Path:
    """Write the model to ``path`` and return it."""
    import gguf  # the `real-llamacpp` extra
    import numpy as np

    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("hutch-tiny-llama")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(shape.embed)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_HEADS)
    writer.add_rope_dimension_count(shape.embed // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, tensor in _tensors(shape, len(tokens), np.random.default_rng(seed)).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
