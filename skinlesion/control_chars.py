"""Control characters in text that came from a file: found (to refuse a name when it is read) and escaped (where
it is printed), by one definition for the whole package.

Class codes and names come from a dataset spec, a manifest, a checkpoint or a model card; file names from the
command line or a folder. Printed raw, a carriage return or an escape sequence rewrites the terminal: a class
code "nv\\r  risk band: Below the cut-offs." made `predict` show a forged risk band line over the real one, and
ESC/OSC sequences recolour text, move the cursor or set the window title. Config overrides and sweep arguments
are refused for the same characters (a newline splits them into two arguments). So a name with one is refused
where it is read (`facts.ModelFacts.check`, `data.datasets`, `data.manifest`, `card_trust.check_card`), and
whatever still reaches a terminal goes through `printable`.
"""

from __future__ import annotations

import unicodedata

# Cc: C0 and C1 controls (NUL, TAB, LF, CR, ESC, DEL, CSI...); Zl, Zp: the Unicode line and paragraph separators.
CATEGORIES = ("Cc", "Zl", "Zp")
# The bidirectional embeddings, overrides and isolates (LRE..RLO, LRI..PDI): "mel\u202e" shows the rest of a line
# reversed, so a name can make a terminal or a page display other text than it holds ("Trojan Source"). Other
# format characters (Cf) stay: zero-width joiners belong to some scripts' spelling.
BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _control(c: str) -> bool:
    return c in BIDI or unicodedata.category(c) in CATEGORIES


def control_character(text: str) -> str | None:
    """The first control character in `text` (newline, tab, NUL, ESC, a Unicode line separator...), or None. Paths and
    names travel through log lines, shell variables and one-argument-a-line lists, where one splits them."""
    return next((c for c in text if _control(c)), None)


def printable(text: str) -> str:
    """`text` with each control character written as its Python escape (ESC as ``\\x1b``, CR as ``\\r``), so that
    a terminal shows it instead of obeying it. Everything else, accents and other scripts included, is kept."""
    if control_character(text) is None:
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if _control(c) else c for c in text)
