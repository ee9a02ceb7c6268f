"""Caption cleaning exactly as MAGI-1 applied it to its training captions.

MAGI-1 was trained on captions passed through the DeepFloyd-IF cleaner, so a prompt has to go through the same
rules at inference or the text encoder sees a distribution the DiT never did. The rules are web-scrape hygiene
(URLs, handles, markup, shop spam, product codes) plus normalisation (lower case, one dash, one double quote).
Their order matters and some are odd (a trailing apostrophe is cut, a bare ``.jpg`` survives one pass); they are
kept as they are because behaving like the training data beats being tidy. The released pipeline cleans every
prompt twice (the second pass catches what the first one exposes); `prepare_prompt` does that.

The rules are a fixed, ordered table of compiled patterns (module constants, no state) with a few non-regex
steps in between.
"""

from __future__ import annotations

import html
import re
import urllib.parse

from magi_train.model.text.extra import t5_dependency

Rule = tuple[re.Pattern[str], str]


def _rules(*pairs: tuple[str, str]) -> tuple[Rule, ...]:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


# Domain-looking words with a handful of top-level domains, optionally followed by a path.
_DOMAIN = r"[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"

# Stage 1, on the lower-cased raw text, before markup is parsed (a URL may contain "<" or "&").
_LINK_RULES = _rules(
    ("<person>", "person"),  # a placeholder tag in the training captions; keep the word, not the tag
    # Two passes, one per scheme spelling; the second one can catch what the first one's removal joined up.
    (r"\b((?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r"))", ""),
    (r"\b((?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r"))", ""),
)

# Stage 2, on the text content of the markup.
_SYMBOL_RULES = _rules(
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A, hexagrams, unified):
    # the contiguous blocks U+31C0..U+9FFF. Kana (U+3040..U+30FF) are not in the list and survive.
    (r"[\u31c0-\u9fff]+", ""),
    # Every dash and hyphen variant becomes one ASCII hyphen.
    (r"[\-\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
     r"\ufe31\ufe32\ufe58\ufe63\uff0d]+", "-"),
    (r"[`´«»“”¨]", '"'),  # double-quote look-alikes
    (r"[‘’]", "'"),  # single curly quotes
    (r"&quot;?", ""),  # entity remnants that the markup parser left as text
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # a trailing time-like article id
    (r"\\n", " "),  # a literal backslash-n left by escaping
    (r"#\d{1,3}\b", ""),  # "#12"
    (r"#\d{5,}\b", ""),  # "#123456"
    (r"\b\d{6,}\b", ""),  # long bare numbers
    (r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"']{2,}", '"'),  # runs of quotes
    (r"\.{2,}", " "),  # ellipses
    (r"[#®•©™&@·º½¾¿¡§~)(\][}{|\\/*]+", " "),  # decorative punctuation
    (r"\s+\.\s+", " "),  # a lone full stop
)

# "this-is-my-cute-cat" / "this_is_my_cute_cat": only when there are more than three separators, so that an
# ordinary hyphenated word keeps its hyphen.
_WORD_SEPARATOR = re.compile(r"[-_]")
_MAX_KEPT_SEPARATORS = 3

# Stage 3, after mojibake and entity repair.
_SPAM_RULES = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simages?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # longer mixed codes: j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, times sign)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),  # a space after punctuation glued to the next word
    (r"\s+", " "),
)

# Stage 4, the edges of the whole caption. No strip happens between stage 3 and here (a leading space blocks the
# first rules), exactly as in training.
_EDGE_RULES = _rules(
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # quotes around the whole caption
    (r"^['_,\-:;]", ""),  # one leading punctuation mark
    (r"['_,\-:+]$", ""),  # one trailing punctuation mark (a closing apostrophe goes too)
    (r"^\.\S+$", ""),  # a caption that is a single dotted word (".htaccess")
)


def _apply(rules: tuple[Rule, ...], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _repair(text: str) -> str:
    """Fix mojibake, then decode entities (twice: captions scraped from HTML are often double-escaped)."""
    text = t5_dependency("ftfy", "the caption cleaning (T5 prompts)").fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def clean_caption(text: str) -> str:
    """One pass of the released caption cleaner (see the module docstring)."""
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = _apply(_LINK_RULES, text)
    bs4 = t5_dependency("bs4", "the caption cleaning (T5 prompts)")  # beautifulsoup4; imported once, then cached
    text = bs4.BeautifulSoup(text, features="html.parser").text
    text = _apply(_SYMBOL_RULES, text)
    if len(_WORD_SEPARATOR.findall(text)) > _MAX_KEPT_SEPARATORS:
        text = _WORD_SEPARATOR.sub(" ", text)
    text = _repair(text)
    text = _apply(_SPAM_RULES, text)
    text = _apply(_EDGE_RULES, text)
    return text.strip()


def prepare_prompt(text: str) -> str:
    """A user prompt as the T5 encoder must see it: cleaned twice, as the released pipeline does."""
    return clean_caption(clean_caption(text))
