"""The prompt cleaning Wan applies before tokenizing: Wan2.1's ``wan/modules/tokenizers.py``
``HuggingfaceTokenizer(..., clean='whitespace')`` (and diffusers' Wan pipelines, ``prompt_clean``)."""

from __future__ import annotations

import html


def clean_prompt(text: str) -> str:
    """Mojibake and width repaired (``ftfy.fix_text``: full-width punctuation becomes ASCII), HTML entities
    unescaped twice, every run of whitespace one space, the ends stripped."""
    import ftfy
    import regex  # Wan's \\s: Unicode White_Space (the standard library's also counts \\x1c-\\x1f)

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()
