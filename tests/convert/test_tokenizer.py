"""llama.cpp tokenisation of the converted vocabulary matches the source tokenizers."""

from __future__ import annotations

import pytest

TEXTS = ["hello world", "what is the red car doing?", "x=1, y=22; z='333'",
         "unicode: é ü 日本 🙂", "two\n\nlines\tand tab"]


@pytest.fixture(scope="module")
def llama_vocab(clip_f32_result):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(clip_f32_result.llm_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def hf_tokenizer(llava_clip_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llava_clip_checkpoint)


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_hf(llama_vocab, hf_tokenizer, text):
    assert llama_vocab.tokenize(text.encode(), add_bos=True, special=True) == \
        hf_tokenizer(text).input_ids


def test_leading_spaces_match_sentencepiece(llama_vocab, llava_clip_checkpoint):
    """llama.cpp follows sentencepiece (always a dummy prefix), like HF legacy mode."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llava_clip_checkpoint / "tokenizer.model"))
    text = "  two  spaces"
    assert llama_vocab.tokenize(text.encode(), add_bos=False) == sp.encode(text)


def test_special_image_token(llama_vocab, hf_tokenizer):
    text = "USER: what is in this picture <image>"
    ids = llama_vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert ids == hf_tokenizer(text).input_ids
    assert ids[-1] == hf_tokenizer.convert_tokens_to_ids("<image>") == 320
    # without special parsing the marker is plain text
    assert 320 not in llama_vocab.tokenize(text.encode(), add_bos=True, special=False)


def test_detokenize_roundtrip(llama_vocab):
    text = "what is the red car doing?"
    ids = llama_vocab.tokenize(text.encode(), add_bos=False)
    assert llama_vocab.detokenize(ids).decode().strip() == text
