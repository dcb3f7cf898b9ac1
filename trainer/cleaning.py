"""Text cleaning steps of `spec.dataset.cleaning`, applied to the text-like columns of one split.

The steps run in a fixed order: strip URLs, strip HTML, normalize white space, drop empty rows, drop
duplicate rows. Each step reports how many rows it removed (and, for the steps that only rewrite text,
how many rows it changed), so a user can see where their data went. The work is vectorized with pandas
`.str` operations; only HTML entity unescaping runs per row, and only on rows that contain an `&`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

import pandas as pd

from finetune.spec import Cleaning

# Stops at quotes and angle brackets so a link inside an HTML attribute does not swallow the tag.
URL_RE = r"(?:https?://|www\.)[^\s<>\"']+"
# Script and style bodies are code, not text: drop them with their tags before the generic tag rule.
SCRIPT_RE = r"(?is)<(script|style)\b[^>]*>.*?</\1\s*>"
TAG_RE = r"<[^>]*>"
WHITESPACE_RE = r"\s+"

STEPS = ("strip_urls", "strip_html", "normalize_whitespace", "drop_empty", "drop_duplicates")


def strip_urls(s: pd.Series) -> pd.Series:
    return s.str.replace(URL_RE, "", regex=True)


def strip_html(s: pd.Series) -> pd.Series:
    # A tag becomes a space so "a<br>b" stays two words; normalize_whitespace tidies up afterwards.
    out = s.str.replace(SCRIPT_RE, " ", regex=True).str.replace(TAG_RE, " ", regex=True)
    has_entity = out.str.contains("&", regex=False)
    if has_entity.any():
        out = out.copy()
        out[has_entity] = out[has_entity].map(html.unescape)
    return out


def normalize_whitespace(s: pd.Series) -> pd.Series:
    return s.str.replace(WHITESPACE_RE, " ", regex=True).str.strip()


REWRITES: dict[str, Callable[[pd.Series], pd.Series]] = {
    "strip_urls": strip_urls,
    "strip_html": strip_html,
    "normalize_whitespace": normalize_whitespace,
}


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip() == ""
    if value is None:
        return True
    try:
        return len(value) == 0
    except TypeError:
        return False


def _hashable(value: Any) -> Any:
    """Lists of chat turns are not hashable; their JSON text is, and equal turns give equal text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return json.dumps(value, sort_keys=True, default=str)


def clean(
    frame: pd.DataFrame,
    cleaning: Cleaning,
    text_columns: list[str],
    key_columns: list[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """Run the enabled cleaning steps in order.

    `text_columns` are rewritten and checked for emptiness; `key_columns` (default: the text columns)
    decide which rows are duplicates, e.g. text and label. A column holding lists (chat turns) counts
    as empty when the list is. Returns the cleaned frame (index reset) and two dicts keyed by the
    enabled step names: rows removed per step, and rows whose text a rewriting step changed.
    """
    key_columns = key_columns if key_columns is not None else text_columns
    out = frame.copy()
    removed: dict[str, int] = {}
    changed: dict[str, int] = {}
    for step, rewrite in REWRITES.items():
        if not getattr(cleaning, step):
            continue
        touched = pd.Series(False, index=out.index)
        for col in text_columns:
            if not _is_text_column(out[col]):
                continue
            new = rewrite(out[col])
            touched |= new != out[col]
            out[col] = new
        removed[step] = 0
        changed[step] = int(touched.sum())
    if cleaning.drop_empty:
        empty = pd.Series(False, index=out.index)
        for col in text_columns:
            empty |= out[col].map(_is_empty).astype(bool)
        removed["drop_empty"] = int(empty.sum())
        out = out[~empty]
    if cleaning.drop_duplicates and key_columns:
        keys = pd.DataFrame({c: out[c].map(_hashable) for c in key_columns}, index=out.index)
        dup = keys.duplicated(keep="first")
        removed["drop_duplicates"] = int(dup.sum())
        out = out[~dup]
    return out.reset_index(drop=True), removed, changed


def _is_text_column(s: pd.Series) -> bool:
    """Rewrites apply to string columns only (a messages column holds lists)."""
    return bool(pd.api.types.is_string_dtype(s))
