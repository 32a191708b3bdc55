"""Caption cleaning before tokenization: the data JSON's ``enable_text_preprocessing`` with
``text_preprocess_methods`` (MindSpeed-MM's method names)."""

from __future__ import annotations

import html
import re
from typing import Callable, Sequence


def whitespace_clean(text: str) -> str:
    """Every run of whitespace one space, the ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def basic_clean(text: str) -> str:
    """Mojibake repaired (``ftfy.fix_text``), HTML entities unescaped twice, the ends stripped."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


METHODS: dict[str, Callable[[str], str]] = {"whitespace_clean": whitespace_clean, "basic_clean": basic_clean}


def clean_caption(text: str, methods: Sequence[str]) -> str:
    """``text`` through each of ``methods`` in order."""
    for name in methods:
        text = METHODS[name](text)
    return text
