"""IFEval's sentence splitter, provisioned offline from the `punkt` package, behaves like NLTK's punkt_tab."""

from __future__ import annotations

import pytest

from mainlib.nltk_data import PUNKT_FILES, ensure_punkt, provision_punkt

# NLTK's English Punkt splits (abbreviations, decimals, money, quotes; "e.g." is not in its abbreviation list)
EXPECTED = {
    "Dr. Watson met Mr. Holmes at 221B Baker St. in London. They talked for 2.5 hours.": [
        "Dr. Watson met Mr. Holmes at 221B Baker St. in London.",
        "They talked for 2.5 hours.",
    ],
    "Hello! How are you?": ["Hello!", "How are you?"],
    "It costs $3.50. That is cheap.": ["It costs $3.50.", "That is cheap."],
    "The meeting is at 3 p.m. on Friday. Bring the Q3 report, e.g. the sales figures.": [
        "The meeting is at 3 p.m. on Friday.",
        "Bring the Q3 report, e.g.",
        "the sales figures.",
    ],
    "Mrs. Jones arrived on Jan. 5. She left on Feb. 9, 2020.": [
        "Mrs. Jones arrived on Jan. 5.",
        "She left on Feb. 9, 2020.",
    ],
    'He said "Stop." Then he left.': ['He said "Stop."', "Then he left."],
}


@pytest.fixture()
def punkt(tmp_path, monkeypatch):
    monkeypatch.setenv("MAINLIB_CACHE", str(tmp_path))
    return ensure_punkt()


def test_sentence_splits_match_nltk(punkt) -> None:
    from nltk.tokenize import sent_tokenize

    for text, sentences in EXPECTED.items():
        assert sent_tokenize(text) == sentences


def test_parameters_round_trip(punkt) -> None:
    import nltk
    from punkt.data import english

    params = nltk.data.load("nltk:tokenizers/punkt/english.pickle")._params  # what IFEval loads
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.collocations == set(english.COLLOCATIONS)
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)


def test_ifeval_imports_without_network(punkt) -> None:
    from lm_eval.tasks.ifeval import instructions_util

    assert instructions_util.count_sentences("One. Two! Three?") == 3


def test_provisioning_is_idempotent_and_complete(tmp_path) -> None:
    root = provision_punkt(tmp_path)
    english = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == sorted(PUNKT_FILES)
    stamp = (english / "abbrev_types.txt").stat().st_mtime_ns
    provision_punkt(tmp_path)
    assert (english / "abbrev_types.txt").stat().st_mtime_ns == stamp
    (english / "ortho_context.tab").unlink()  # a damaged folder is rewritten
    provision_punkt(tmp_path)
    assert (english / "ortho_context.tab").stat().st_size > 100_000
