"""Loading the tokenizer the same way for data and model, so the pad token always agrees."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mbti_lightning import demo


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer that pads on the right and has a pad token.

    Sequence classification pools the rightmost non-pad token, so padding goes on the right. A
    tokenizer without a pad token reuses its eos token (as Phi-3 does), else its unk token, else
    gets a new ``<pad>`` token, in which case the model grows its embeddings to ``len(tokenizer)``.
    """
    tokenizer = AutoTokenizer.from_pretrained(demo.resolve(name_or_path))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
