"""Text cells made safe for spreadsheets and TSV: the one way every export writes text.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and a
leading tab or carriage return can hide one), so a reviewer's comment ``=HYPERLINK("http://…")``
written verbatim into a CSV becomes a live link or worse (CSV injection). OWASP's advice: prefix
such a cell with an apostrophe ``'``, which spreadsheets show as text. Tabs, carriage returns and
newlines inside a text would also break a TSV row (EcoTaxa reads one object per line), so every run
of them becomes one space.

Numbers are never touched: ints, floats and numpy numbers pass through as numbers, and so does a
string that is just a decimal number (``"-43.5"``, ``"+2"``, ``"1e-3"``): a spreadsheet reads it as
that number, not as a formula, and a latitude carried through as text stays a latitude.
"""
from __future__ import annotations

import re
from typing import Any

import pandas as pd

#: First characters that make a spreadsheet read a cell as a formula (OWASP CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_BREAKS = re.compile(r"[\t\r\n]+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def safe_text(value: Any) -> Any:
    """``value`` made safe for a spreadsheet / TSV cell when it is text; anything else unchanged.

    Text starting with one of :data:`FORMULA_START` gets a leading ``'`` (unless it is a plain
    decimal number such as ``-43.5``); then every run of tabs, carriage returns and newlines becomes
    one space. ``safe_text("=1+1")`` is ``"'=1+1"``; ``safe_text("a\\tb\\nc")`` is ``"a b c"``;
    ``safe_text(-43.5)`` is ``-43.5``.
    """
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_START) and not _NUMBER.fullmatch(value):
        value = "'" + value
    return _BREAKS.sub(" ", value)


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with :func:`safe_text` applied to every text (object / string) column;
    numeric, boolean and datetime columns are left as they are, and so are the non-text items
    (numbers, None, NaN) inside a text column."""
    out = df.copy()
    for i in range(out.shape[1]):  # by position: duplicate column names are allowed
        col = out.iloc[:, i]
        if pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col):
            out.isetitem(i, col.map(safe_text, na_action="ignore"))
    return out
