"""Document cleaning and the heuristic quality rules (llm_jax/data/filters.py)."""

from functools import cache

import pytest

from llm_jax.config import CURATE_RULES, load_config
from llm_jax.data.filters import clean, failing_rule

PROSE = (
    "The old harbor town wakes slowly in winter. Fishing boats leave before dawn, and the bakery on the corner "
    "opens its doors while the streets are still dark. By nine o'clock the market square fills with farmers "
    "selling apples, cheese and fresh bread. Children walk to school along the sea wall, stopping to watch the "
    "gulls fight over scraps.\n\nIn the afternoon the wind usually rises, so most people stay indoors, reading "
    "or repairing nets by the fire. When the boats return at dusk, half the town gathers at the pier to hear "
    "what the sea has given them today."
)
WORDS = PROSE.split()
SENTENCES = [s.strip() + "." for s in PROSE.replace("\n\n", " ").split(".") if s.strip()]


@cache
def cfg(*overrides: str):
    """The curate config with `curate.` overrides, e.g. cfg("rules=[code]", "max_code_lines=0.5")."""
    return load_config(None, [f"curate.{o}" for o in overrides]).curate


def rule(text: str, *overrides: str) -> str | None:
    """failing_rule of the cleaned text."""
    c = cfg(*overrides)
    return failing_rule(*clean(text, c), c)


def failures(text: str, *overrides: str) -> list[str]:
    """Every rule that removes the cleaned text on its own (curate.rules set to just that rule)."""
    return [r for r in CURATE_RULES if rule(text, f"rules=[{r}]", *overrides) == r]


def test_prose_passes_every_default_rule():
    assert len(WORDS) == 100 and len(SENTENCES) == 6
    assert clean(PROSE, cfg()) == (PROSE, 0.0)
    assert failures(PROSE) == [] and rule(PROSE) is None


# ------------------------------------------------------------------------------------------------
# Each rule: a document that only it removes, and a near miss that every rule keeps.

SCRIPT = "<script>" + "var counter = 0; function tick() { counter += 1; }\n" * 40 + "</script>"
FAIL_AND_PASS = {
    "markup": (
        f"<html><head>{SCRIPT}</head><body><p>{PROSE}</p></body></html>",
        f"<html><body><p>{PROSE}</p></body></html>",
    ),
    "words": (" ".join(WORDS[:12]), " ".join(WORDS[:50])),
    "mean_word_length": (" ".join(w * 3 for w in WORDS), " ".join(w * 2 for w in WORDS)),
    "alpha_words": (
        " ".join(f"{w} {1000 + i}" if i % 3 == 0 else w for i, w in enumerate(WORDS)),
        " ".join(f"{w} {1000 + i}" if i % 5 == 0 else w for i, w in enumerate(WORDS)),
    ),
    "symbols": (
        PROSE + "\n" + " ".join(f"#{w.strip('.,')}" for w in WORDS[::8]),
        PROSE + "\n" + " ".join(f"#{w.strip('.,')}" for w in WORDS[::12]),
    ),
    "bullet_lines": (
        "\n".join(f"• {s}" for s in SENTENCES),
        "\n".join(f"- {s}" if i % 2 else s for i, s in enumerate(SENTENCES)),
    ),
    "ellipsis_lines": (
        "\n".join(s[:-1] + "..." if i % 2 else s for i, s in enumerate(SENTENCES)),
        "\n".join(s[:-1] + "…" if i == 2 else s for i, s in enumerate(SENTENCES)),
    ),
    "dup_lines": (
        "\n".join(x for s in SENTENCES for x in (s, "Read more")),
        "\n".join(x for i, s in enumerate(SENTENCES) for x in ((s, "Read more") if i < 2 else (s,))),
    ),
    "dup_ngrams": (
        "\n".join(s[:-1] + ", as the old captain told us." for s in SENTENCES),
        "\n".join(s[:-1] + ", as the old captain told us." if i < 2 else s for i, s in enumerate(SENTENCES)),
    ),
    "code": (
        "\n".join(SENTENCES[:5]) + "\nimport os\ndef main(path):\n    return os.listdir(path)\nconst x = f(path);",
        "\n".join(SENTENCES) + "\nimport os\ndef main(path):\n    print(os.listdir(path))",
    ),
}


def test_every_rule_has_a_case():
    assert list(FAIL_AND_PASS) == list(CURATE_RULES)


@pytest.mark.parametrize("name", CURATE_RULES)
def test_rule_removes_only_its_document(name):
    removed, kept = FAIL_AND_PASS[name]
    assert failures(removed) == [name]
    assert rule(removed) == name  # default rules, default order
    assert failures(kept) == [] and rule(kept) is None


def test_a_document_failing_two_rules_counts_against_the_first_listed():
    short_bullets = "•fresh bread\n•cheese\n•apples and pears"
    assert failures(short_bullets) == ["words", "bullet_lines"]
    assert rule(short_bullets, "rules=[words, bullet_lines]") == "words"
    assert rule(short_bullets, "rules=[bullet_lines, words]") == "bullet_lines"
    assert rule(short_bullets, "rules=[markup, code]") is None
    assert rule(short_bullets, "rules=[]") is None


def test_a_document_without_words_fails_words_only():
    assert rule("") == "words" and rule(" \n\t ") == "words"
    assert failures("") == ["words"]
    assert rule("", "rules=[markup, mean_word_length, alpha_words, symbols, dup_ngrams, code]") is None


# ------------------------------------------------------------------------------------------------
# Thresholds come from the config


def test_word_bounds_are_inclusive():
    assert rule(PROSE, "min_words=100") is None and rule(PROSE, "min_words=101") == "words"
    assert rule(PROSE, "max_words=100") is None and rule(PROSE, "max_words=99") == "words"


def test_thresholds_follow_overrides():
    removed, kept = FAIL_AND_PASS["code"]
    assert rule(removed, "max_code_lines=0.5") is None and rule(kept, "max_code_lines=0.1") == "code"
    assert rule(FAIL_AND_PASS["bullet_lines"][0], "max_bullet_lines=1.0") is None
    assert rule(FAIL_AND_PASS["alpha_words"][0], "min_alpha_words=0.7") is None
    assert rule(FAIL_AND_PASS["mean_word_length"][0], "max_mean_word_length=15") is None
    assert rule(PROSE, "min_mean_word_length=5") == "mean_word_length"
    assert rule(FAIL_AND_PASS["symbols"][1], "max_symbol_ratio=0.05") == "symbols"
    assert rule(FAIL_AND_PASS["ellipsis_lines"][1], "max_ellipsis_lines=0.1") == "ellipsis_lines"


def test_dup_lines_by_line_share_and_by_char_share():
    lines = SENTENCES + [SENTENCES[1]]  # one repeat of 7 lines, holding 16% of the characters
    text = "\n".join(lines)
    share = len(SENTENCES[1]) / sum(map(len, lines))
    assert 0.15 < share < 0.17
    assert rule(text, "rules=[dup_lines]") is None
    assert rule(text, "rules=[dup_lines]", "max_dup_line_chars=0.15") == "dup_lines"
    assert rule(text, "rules=[dup_lines]", "max_dup_lines=0.1") == "dup_lines"  # 1/7 of lines


def test_dup_ngrams_most_frequent_short_ngram():
    # 10 words of 2 letters; "aa bb" (case-blind) 3 times: 12 of 20 characters. "aa bb aa bb" twice: 16 of 20.
    text = "aa bb AA BB Aa Bb cc dd ee ff"
    only_top = ("rules=[dup_ngrams]", "max_dup_ngram=[1, 1, 1, 1, 1, 1]")
    assert rule(text, *only_top, "max_top_ngram=[0.65, 1, 1]") is None
    assert rule(text, *only_top, "max_top_ngram=[0.55, 1, 1]") == "dup_ngrams"
    assert rule(text, *only_top, "max_top_ngram=[1, 1, 0.85]") is None
    assert rule(text, *only_top, "max_top_ngram=[1, 1, 0.75]") == "dup_ngrams"


def test_dup_ngrams_repeated_long_ngrams_cover_characters_once():
    # "one .. six" twice: 5- and 6-grams repeat and cover 44 of 61 characters (0.72); no 7-gram repeats.
    text = "one two three four five six seven eight nine ten one two three four five six"
    only_long = ("rules=[dup_ngrams]", "max_top_ngram=[1, 1, 1]")
    assert rule(text, *only_long, "max_dup_ngram=[0.75, 0.75, 0, 0, 0, 0]") is None
    assert rule(text, *only_long, "max_dup_ngram=[0.70, 1, 1, 1, 1, 1]") == "dup_ngrams"
    assert rule(text, *only_long, "max_dup_ngram=[1, 0.70, 1, 1, 1, 1]") == "dup_ngrams"
    # 12 equal words: overlapping repeats cover each word once, so the share is 1.0, not more (while the
    # top 2-gram, counted at each of its 11 overlapping places, covers 44 / 24 of the characters)
    no_top = ("rules=[dup_ngrams]", "max_top_ngram=[1.9, 9, 9]")
    assert rule("la " * 12, *no_top, "max_dup_ngram=[1, 1, 1, 1, 1, 1]") is None
    assert rule("la " * 12, *no_top, "max_dup_ngram=[0.99, 1, 1, 1, 1, 1]") == "dup_ngrams"
    assert (
        rule("la " * 12, "rules=[dup_ngrams]", "max_top_ngram=[1.8, 9, 9]", "max_dup_ngram=[1, 1, 1, 1, 1, 1]")
        == "dup_ngrams"
    )


def test_dup_ngrams_handles_a_long_document():
    words = [f"w{i}x{i % 7}" for i in range(100_000)]
    assert rule(" ".join(words), "rules=[dup_ngrams]") is None
    assert rule(" ".join(words[:50_000] * 2), "rules=[dup_ngrams]") == "dup_ngrams"


def test_markup_threshold():
    page = FAIL_AND_PASS["markup"][0]
    text, share = clean(page, cfg())
    assert text == PROSE and 0.6 < share < 1
    assert rule(page, f"max_markup={share + 0.01:.3f}") is None


# ------------------------------------------------------------------------------------------------
# The code rule


PYTHON = """import numpy as np
from pathlib import Path

def load(path):
    data = np.load(Path(path))
    if data.ndim != 2:
        raise ValueError(path)
    return data.mean(axis=0)

class Loader:
    pass"""
JAVASCRIPT = """const express = require('express');
let app = express();
function handler(req, res) {
  res.send({ ok: true, items: [1, 2, 3] });
}
app.get('/', handler);
app.listen(3000);"""


@pytest.mark.parametrize("snippet", [PYTHON, JAVASCRIPT])
def test_code_fires_on_code(snippet):
    assert rule(snippet, "rules=[code]") == "code"


@pytest.mark.parametrize(
    "text",
    [
        PROSE,
        "\n".join(SENTENCES),
        # hard-wrapped prose whose lines start with keywords that are English words too
        "We asked the guide to\nlet us explain the plan, as it is simple and\nclass these ideas as old; the\n"
        "import duties are high, so the parts\nfunction well in the cold (mostly), and\n"
        "public transport is free while\nprivate cars pay a toll (see the map).",
    ],
)
def test_code_does_not_fire_on_prose(text):
    assert rule(text, "rules=[code]", "max_code_lines=0") is None


# ------------------------------------------------------------------------------------------------
# Cleaning


def test_clean_strips_html():
    page = (
        "<!DOCTYPE html><html><head><title>Menu</title><style>p { color: red; }</style>"
        "<script>var x = '<p>not text</p>';</script></head><body><!-- a comment -->"
        "<p>Fish &amp; chips &lt;3</p><div>Second<br>line with <b>bold</b> &eacute;</div></body></html>"
    )
    text, share = clean(page, cfg())
    assert text == "Menu\n\nFish & chips <3\n\nSecond\nline with bold é"
    assert share == pytest.approx(1 - len(text) / len(page)) and 0.6 < share < 1
    kept, share_kept = clean(page, cfg("strip_markup=false"))
    assert kept == page and share_kept == 0.0


def test_clean_leaves_angle_brackets_in_plain_text():
    text = "If a < b and c > d, then x <= y.\nIn C++ we write vector<int> v; and 1 <b and c> 2 is text too."
    assert clean(text, cfg()) == (text, 0.0)


def test_clean_normalizes_unicode():
    text = "the \ufb01nal cafe\u0301"
    assert clean(text, cfg("normalize=NFC"))[0] == "the \ufb01nal caf\u00e9"
    assert clean(text, cfg("normalize=NFKC"))[0] == "the final caf\u00e9"
    assert clean(text, cfg("normalize=none"))[0] == text


def test_clean_removes_control_characters_and_normalizes_line_ends():
    assert clean("a\x00b\x07c\r\nd\re\x85f\tg\x1bh\x7f", cfg())[0] == "abc\nd\nef\tgh"


def test_clean_collapses_whitespace():
    text = "  one   two \t three\xa0\xa0four  \n \n\n\n\t five\tsix   \n\n"
    assert clean(text, cfg()) == ("one two three four\n\nfive\tsix", 0.0)


def test_clean_keeps_the_layout_when_asked():
    """curate.whitespace=keep: indentation (code, verse) and blank lines stay; line ends and control
    characters are still normalized."""
    text = "def f(x):\n    return x   # four spaces\r\n\n\n\n        indented\x07 verse  \n"
    assert (
        clean(text, cfg("whitespace=keep"))[0]
        == "def f(x):\n    return x   # four spaces\n\n\n\n        indented verse  \n"
    )
    assert clean(text, cfg())[0] == "def f(x):\nreturn x # four spaces\n\nindented verse"


def test_a_document_of_whitespace_is_empty_whatever_the_layout_setting():
    from llm_jax.data import curate

    for whitespace in ("keep", "collapse"):
        curate._init(cfg(f"whitespace={whitespace}", "rules=[]"), 0)
        (_, rule_hit, *_), (_, kept_rule, *_) = curate._work(["  \n\t \n", "two words"])
        assert (rule_hit, kept_rule) == ("empty", None)
