"""Tokenizer from a checkpoint's ``tokenizer.json`` (the ``tokenizers`` library) with its chat template."""

from __future__ import annotations

import json
import os
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable."""


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


class Tokenizer:
    """Encode, decode and chat-format text the way the checkpoint's Hugging Face tokenizer does."""

    def __init__(self, backend: _HFTokenizer, special: dict[str, Any] | None = None) -> None:
        self.backend = backend
        special = special or {}
        self.chat_template: str | None = special.get("chat_template")
        self.bos_token = _token_text(special.get("bos_token"))
        self.eos_token = _token_text(special.get("eos_token"))
        self.pad_token = _token_text(special.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        self._special = special

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, model_dir: str) -> Tokenizer:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(
                f"no tokenizer.json in {model_dir!r}; raylane reads fast-tokenizer files only "
                "(pass prompt_token_ids to skip tokenization)"
            )
        special: dict[str, Any] = {}
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                special = json.load(f)
        template_path = os.path.join(model_dir, "chat_template.jinja")
        if "chat_template" not in special and os.path.isfile(template_path):
            with open(template_path) as f:
                special["chat_template"] = f.read()
        return cls(_HFTokenizer.from_file(path), special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` (``{"role", "content"}``) into the prompt text the model was trained on."""
        if not self.chat_template:
            raise TokenizerError(
                "this tokenizer has no chat_template; send a plain prompt instead of messages"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TokenizerError(
                    f"message {i} must be an object with 'role' and 'content', got {message!r}"
                )

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template rejected the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def save(self, model_dir: str) -> None:
        os.makedirs(model_dir, exist_ok=True)
        self.backend.save(os.path.join(model_dir, "tokenizer.json"))
        config = {
            **self._special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        }
        with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table used by byte-level tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_tiny_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: token id == byte value (one token per ASCII character), plus ChatML specials.

    Ids 0-255 are bytes, 256 is ``<|endoftext|>`` (EOS and padding), 257/258 open and close chat turns.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    special = {
        "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
    }
    return Tokenizer(backend, special)
