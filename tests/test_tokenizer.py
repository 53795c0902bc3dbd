"""Tokenizers, the incremental detokenizer, and the chat template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    apply_chat_template,
    load_tokenizer,
)

TEXTS = ["hello, world", "naïve café — 東京", "emoji 🦙🚀 and ZWJ 👩‍💻", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_token_id]) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_byte_decode_replaces_invalid_utf8():
    assert ByteTokenizer().decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


def _feed_one_by_one(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    return deltas


@given(st.text(max_size=40))
def test_incremental_detokenizer_never_splits_a_character(text):
    tok = ByteTokenizer()
    deltas = _feed_one_by_one(IncrementalDetokenizer(tok), tok.encode(text, add_bos=False))
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


def test_incremental_detokenizer_holds_back_partial_emoji():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("hi "))
    ids = tok.encode("a🦙b", add_bos=False)  # a, 4 bytes of llama, b
    assert [detok.add([i]) for i in ids] == ["a", "", "", "", "🦙", "b"]
    assert detok.text == "a🦙b" and detok.token_ids == ids


def test_incremental_detokenizer_output_ignores_a_character_the_prompt_left_open():
    """Deltas always add up to decode(output ids), even when the prompt ends mid-character."""
    tok = ByteTokenizer()
    llama = list("🦙".encode())
    output = llama[2:] + [0x21]
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("hi ") + llama[:2])
    assert "".join(_feed_one_by_one(detok, output)) == tok.decode(output) == "\ufffd\ufffd!"


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_incremental_detokenizer_adds_up_to_decode_of_any_bytes(prompt, output):
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, prompt_ids=list(prompt))
    assert "".join(_feed_one_by_one(detok, list(output))) == tok.decode(list(output))


def test_incremental_detokenizer_update_and_flush_of_incomplete_tail():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("é", add_bos=False) + [0xF0, 0x9F]  # é, then half an emoji
    assert detok.update(ids[:1]) == ""
    assert detok.update(ids[:2]) == "é"
    assert detok.update(ids + [tok.eos_token_id]) == ""  # EOS renders as nothing
    assert detok.flush() == "\ufffd"
    with pytest.raises(ValueError, match="shrank"):
        detok.update(ids[:1])


def test_chat_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert apply_chat_template(messages[:1], add_generation_prompt=False).endswith("<|im_end|>\n")


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must not be empty"),
        ("hello", "list"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role 'wizard'"),
        ([{"content": "x"}], r"messages\[0\]\.role None"),
        ([{"role": "user"}], r"messages\[0\] has no content"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}], r"messages\[1\]\.content\[0\].*only 'text'"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], r"text must be a string"),
        (["hi"], r"messages\[0\] must be an object"),
    ],
)
def test_chat_template_rejects_bad_messages(messages, message):
    with pytest.raises(ValueError, match=message):
        apply_chat_template(messages)


@pytest.fixture(scope="module")
def bpe_tokenizer_file(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world", "the llama says hello", "café 東京 🦙"] * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trip(bpe_tokenizer_file, text):
    tok = HFTokenizer.from_file(bpe_tokenizer_file, eos_token="</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids + [tok.eos_token_id]) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    deltas = _feed_one_by_one(IncrementalDetokenizer(tok), ids[1:])
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_hf_tokenizer_special_tokens_and_config(bpe_tokenizer_file, tmp_path):
    tok = load_tokenizer(str(bpe_tokenizer_file))
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 1  # found by its usual name
    chat = apply_chat_template([{"role": "user", "content": "hello"}])
    ids = tok.encode(chat, add_bos=False)
    assert ids[0] == 2 and 3 in ids  # <|im_start|>, <|im_end|> are single tokens
    shutil.copy(bpe_tokenizer_file, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert HFTokenizer.from_file(tmp_path).eos_token_id == 3  # a directory, with its config
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        HFTokenizer.from_file(bpe_tokenizer_file, eos_token="<nope>")


def test_load_tokenizer_defaults_to_bytes():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer.json")


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, protocol.tokenizer; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
