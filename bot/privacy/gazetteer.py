"""Name lists and word frequencies that tell a person's name from an ordinary word in chat text.

The lists ship inside PyPI packages, so nothing is fetched at run time:
- ``names``: US census first names (male, female) and 88,799 surnames,
- ``gender-guesser``: about 45,000 first names from many countries (Jörg Michael's ``nam_dict``),
- ``wordfreq``: how common a word is in English (Zipf scale: 7 = "the", 3 = once per 10^6 words).

A token that is on a name list but is also a very common word ("will", "mark", "may") is only a name
with more evidence (capital letter, a cue such as "ask", spaCy's tagger), which is what ``names.py`` decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

from core.errors import PrivacyError


@dataclass(frozen=True)
class Gazetteer:
    first_names: frozenset[str]
    census_first_names: frozenset[str]
    last_names: frozenset[str]
    word_frequency: dict[str, float]

    def zipf(self, word: str) -> float:
        """Zipf frequency of the lower-cased word in English; 0 for a word never seen."""
        frequency = self.word_frequency.get(word.lower(), 0.0)
        return math.log10(frequency) + 9.0 if frequency > 0 else 0.0

    def is_first_name(self, word: str) -> bool:
        return word.lower() in self.first_names

    def is_census_first_name(self, word: str) -> bool:
        return word.lower() in self.census_first_names

    def is_last_name(self, word: str) -> bool:
        return word.lower() in self.last_names


def _census(file_name: str) -> set[str]:
    text = resources.files("names").joinpath(file_name).read_text(encoding="ascii")
    return {line.split()[0].lower() for line in text.splitlines() if line.strip()}


def _nam_dict() -> set[str]:
    # Fixed-width file: gender in columns 0-2, the name in 3-29; "+" joins parts of a compound name.
    raw = resources.files("gender_guesser").joinpath("data/nam_dict.txt").read_bytes()
    names = set()
    for line in raw.decode("iso-8859-1").splitlines():
        if line.startswith("#") or len(line) < 30:
            continue
        name = line[3:29].strip()
        if name and "+" not in name and " " not in name and name.isalpha():
            names.add(name.lower())
    return names


@cache
def load_gazetteer() -> Gazetteer:
    """Load once per process (about half a second)."""
    try:
        import wordfreq

        census_first = _census("dist.male.first") | _census("dist.female.first")
        first = census_first | _nam_dict()
        last = _census("dist.all.last")
        frequency = wordfreq.get_frequency_dict("en", wordlist="large")
    except (ImportError, OSError) as err:
        raise PrivacyError(f"name lists could not be loaded: {err}") from err
    first = {name for name in first if len(name) >= 2}
    last = {name for name in last if len(name) >= 2}
    return Gazetteer(frozenset(first), frozenset(census_first), frozenset(last), frequency)
