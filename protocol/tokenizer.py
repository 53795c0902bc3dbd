"""Tokenizers shared by balancer and replica, a streaming detokenizer, and the chat template.

Torch-free: the balancer imports this to tokenize prompts for prefix hashing, and its token ids
must be exactly the replica's.

- `ByteTokenizer`: ids 0..255 are UTF-8 bytes, 256 = BOS, 257 = EOS; the tiny preset's vocabulary.
- `HFTokenizer`: a HF `tokenizer.json` through the `tokenizers` package.
- `IncrementalDetokenizer`: text deltas from a growing token list that never split a character.
- `apply_chat_template`: a built-in ChatML-style template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine and the balancer need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. decode() skips special ids and replaces invalid UTF-8 with U+FFFD."""

    BOS = 256
    EOS = 257

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 258:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 258, got {vocab_size}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return self.BOS

    @property
    def eos_token_id(self) -> int:
        return self.EOS

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self._vocab_size})"


# Names HF tokenizers commonly give their end-of-sequence token, tried in order when none is given.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<eos>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class HFTokenizer:
    """A `tokenizers.Tokenizer` with explicit BOS/EOS handling.

    encode() never runs the tokenizer's post-processor (which may or may not add a BOS); it
    prepends `bos_token_id` itself when asked, so both cases behave the same.
    """

    def __init__(self, tokenizer: Any, eos_token: str | None = None, bos_token: str | None = None) -> None:
        self._tok = tokenizer
        self._eos = self._resolve(eos_token, _EOS_CANDIDATES, "eos_token")
        self._bos = self._resolve(bos_token, _BOS_CANDIDATES, "bos_token")

    def _resolve(self, token: str | None, candidates: Iterable[str], what: str) -> int | None:
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
            return tid
        for cand in candidates:
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                return tid
        return None

    @classmethod
    def from_file(
        cls, path: str | Path, eos_token: str | None = None, bos_token: str | None = None
    ) -> HFTokenizer:
        """Load `tokenizer.json` (or a directory holding one). EOS/BOS come from the arguments,
        else from a `tokenizer_config.json` beside it, else from common token names."""
        from tokenizers import Tokenizer as _Tokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer file at {p}")
        side = _read_tokenizer_config(p.parent / "tokenizer_config.json")
        return cls(
            _Tokenizer.from_file(str(p)),
            eos_token=eos_token if eos_token is not None else side.get("eos_token"),
            bos_token=bos_token if bos_token is not None else side.get("bos_token"),
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_bos and self._bos is not None else list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos})"


def _read_tokenizer_config(path: Path) -> dict[str, str]:
    """eos_token / bos_token from a HF tokenizer_config.json, if present (string or AddedToken dict)."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = {}
    for key in ("eos_token", "bos_token"):
        value = raw.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_tokenizer(spec: str | None) -> Tokenizer:
    """None or "byte" -> ByteTokenizer; anything else is a path to tokenizer.json or its directory."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec)


# vLLM starts detokenizing with this many prompt tokens of context, so that tokenizers which
# render a token differently at the start of a text (SentencePiece's leading space) stay right
# (vllm/transformers_utils/detokenizer_utils.py, INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of generated tokens into text deltas.

    A delta is released only when the decoded text does not end in U+FFFD, i.e. when no
    multi-byte character is still incomplete; held-back bytes come out with a later token or at
    `flush()`. Each step decodes only the tokens since the last released delta plus a little
    context (vLLM's prefix_offset / read_offset scheme), so the cost per token is O(1).

    `prompt_ids` only gives context (the last few prompt tokens); it never adds to the output,
    so a character left open at the end of the prompt is not completed by the output's bytes.
    The concatenation of all deltas and the final flush equals `tokenizer.decode(output ids)`
    for the tokenizers here (byte-level BPE and the byte tokenizer); a U+FFFD that is in the
    text itself is released at the next token or at flush.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        # Context that ends inside a character would merge with the output's first bytes and
        # break "deltas add up to decode(output ids)": such a prompt gets no context.
        if context and tokenizer.decode(context).endswith("\ufffd"):
            context = []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = len(context)  # everything before this has been released
        self._text: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens seen so far (without prompt context)."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._text)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append newly generated tokens; return the text they complete (possibly "")."""
        self._ids.extend(new_ids)
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text.append(delta)
        return delta

    def update(self, all_ids: Sequence[int]) -> str:
        """Like add(), given the whole generated list so far (it must extend the last one)."""
        seen = len(self._ids) - self._num_context
        if len(all_ids) < seen:
            raise ValueError(f"token list shrank from {seen} to {len(all_ids)}")
        return self.add(all_ids[seen:])

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character becomes U+FFFD)."""
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._text.append(delta)
        return delta


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _content_text(content: Any, index: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""  # an assistant turn that only carried tool calls
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"messages[{index}].content[{j}] must be an object, got {type(part).__name__}")
            if part.get("type") != "text":
                raise ValueError(
                    f"messages[{index}].content[{j}] has type {part.get('type')!r}; only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"messages[{index}].content[{j}].text must be a string")
            parts.append(text)
        return "".join(parts)
    raise ValueError(
        f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
    )


def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render chat messages in ChatML style:

        <|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n

    Content is a string or a list of {"type": "text", "text": ...} parts (joined without a
    separator). Raises ValueError naming the offending message on a bad role or content.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {role, content} objects")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role {role!r} is not one of {sorted(CHAT_ROLES)}")
        if "content" not in msg and role != "assistant":
            raise ValueError(f"messages[{i}] has no content")
        text = _content_text(msg.get("content"), i, role)
        out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
