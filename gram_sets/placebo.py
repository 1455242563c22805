"""Placebo grams: the paper's "placebo HICRA" control (Sec. 5), --algo placebo's gram set.

HICRA on a set of n-grams that carry no strategy: drawn from the same corpus, as many as the
strategic grams and with the same lengths in words. An n-gram here is a run of whitespace-separated
words (numbers and operators included: in the built-in world the non-strategic text is arithmetic)
that crosses no punctuation, taken from the corpus text left after cutting out every strategic-gram
occurrence; any n-gram that contains a strategic gram or lies inside one is rejected as well. A draw
picks n-grams in proportion to their document frequency (like picking a random place in the corpus),
without replacement.
"""

import random
import re
from collections import Counter
from collections.abc import Sequence

from cli import InputError
from data import source_of
from gram_sets.extraction import contains_gram
from grams import find_gram_spans

# reference solutions of a generated data set the placebo n-grams are drawn from
PLACEBO_CORPUS_SIZE = 2000
PLACEBO_BREAK = re.compile(r"[.,:;!?(){}\[\]\\\"]")  # placebo n-grams never cross these characters


def non_strategic_ngram_df(texts: Sequence[str], strategic_grams: Sequence[str],
                           lengths: Sequence[int]) -> Counter:
    """Document frequency of each lower-case n-gram (n in `lengths`) of the texts outside
    strategic-gram occurrences."""
    df: Counter = Counter()
    for text in texts:
        pieces, cursor = [], 0
        for start, end in find_gram_spans(text, strategic_grams):
            pieces.append(text[cursor:start])
            cursor = end
        pieces.append(text[cursor:])
        seen = set()
        for piece in pieces:
            for segment in PLACEBO_BREAK.split(piece.lower()):
                words = segment.split()
                for n in lengths:
                    seen.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        df.update(seen)
    return df


def placebo_grams(corpus_texts: Sequence[str], strategic_grams: Sequence[str],
                  seed: int) -> list[str]:
    """A seeded placebo gram set: for each length n (in words) of the strategic grams, as many
    non-strategic n-grams of the corpus as there are strategic grams of length n, drawn in
    proportion to document frequency without replacement (Efraimidis-Spirakis keys u^(1/df)).
    Sorted; raises ValueError when the corpus has too few n-grams of some length.
    """
    strategic = sorted({" ".join(g.lower().split()) for g in strategic_grams if g.split()})
    wanted = Counter(len(g.split()) for g in strategic)
    df = non_strategic_ngram_df(corpus_texts, strategic, sorted(wanted))
    rng = random.Random(seed)
    chosen = []
    for n, count in sorted(wanted.items()):
        candidates = sorted(g for g in df if len(g.split()) == n)
        keyed = sorted(candidates, key=lambda g: rng.random() ** (1.0 / df[g]), reverse=True)
        picked = [g for g in keyed
                  if not any(contains_gram(g, s) or contains_gram(s, g) for s in strategic)][:count]
        if len(picked) < count:
            raise ValueError(f"placebo grams: the corpus has {len(picked)} non-strategic {n}-word "
                             f"n-grams, {count} needed")
        chosen += picked
    return sorted(chosen)


def placebo_corpus(data: str, train_problems: Sequence) -> list[str]:
    """The texts placebo n-grams are drawn from: for a generated data set its source's reference
    solutions (ProblemSource.reference_texts, seed 0); otherwise the training problems' `solution`
    field."""
    source = source_of(data)
    if source is not None:
        return source.reference_texts(PLACEBO_CORPUS_SIZE, 0)
    texts = [p.meta["solution"] for p in train_problems if isinstance(p.meta.get("solution"), str)]
    if not texts:
        raise InputError(f"--algo placebo: {data} has no 'solution' field to draw placebo n-grams "
                         "from")
    return texts


def placebo_grams_for(data: str, train_problems: Sequence, strategic_grams: Sequence[str],
                      seed: int) -> list[str]:
    """placebo_grams of a run's training data (placebo_corpus), seeded by --seed; InputError when
    too few."""
    try:
        return placebo_grams(placebo_corpus(data, train_problems), strategic_grams, seed)
    except ValueError as error:
        raise InputError(f"--algo placebo: {error}") from None


