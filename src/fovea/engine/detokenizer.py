"""Token ids -> text, one token at a time, without re-decoding the whole answer at every step."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """The text of a growing token sequence. With a fast (``tokenizers``) tokenizer each token costs one
    ``DecodeStream.step``: bytes of a character split over tokens are held until the character is whole. Other
    tokenizers fall back to decoding the whole sequence (the same text, at quadratic cost)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._ids: list[int] = []
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append ``token``; returns the text it completed (may be empty while a character is incomplete)."""
        if self._backend is not None:
            piece = self._stream.step(self._backend, token) or ""
            self.text += piece
            return piece
        self._ids.append(token)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        piece = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return piece
