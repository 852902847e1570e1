"""Caption tokenisation with Hugging Face ``tokenizers``: lower-cased, accents stripped, split on whitespace and
punctuation, and a word vocabulary of the ``vocab_size - 2`` most frequent training words (the convention of the
image-text retrieval literature, e.g. VSE++ and SCAN; rarer words map to ``[UNK]``).

The vocabulary is counted here and ordered by (count descending, word): ``tokenizers``' own trainers break ties
between equally frequent merges or words in hash order, so two trainings on the same captions can number tokens
differently, and a run re-evaluated on another machine would read different ids. With a fixed order the same
captions always give the same ids.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

PAD, UNK = "[PAD]", "[UNK]"


def _pipeline():
    from tokenizers import normalizers, pre_tokenizers

    return (normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]),
            pre_tokenizers.Whitespace())


def caption_tokenizer(captions: Sequence[str], vocab_size: int):
    """A word-level tokenizer of the training ``captions`` (id 0 padding, 1 unknown, then words by frequency)."""
    from tokenizers import Tokenizer, decoders, models

    if vocab_size < 3:
        raise ValueError(f"task_options.vocab_size must be at least 3, got {vocab_size}")
    normalizer, pre = _pipeline()
    counts = Counter(word for text in captions
                     for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens([PAD])  # already id 0: marked special, so decoding skips padding
    return tok


def encode(tokenizer, texts: Sequence[str], context_length: int) -> Tensor:
    """``(N, context_length)`` int64 ids, padded with 0 and truncated at ``context_length`` tokens."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        ids = enc.ids[:context_length]
        if not ids:
            raise ValueError(f"caption {texts[i]!r} has no tokens")
        out[i, :len(ids)] = torch.tensor(ids)
    return out
