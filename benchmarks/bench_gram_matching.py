"""How the strategic-gram matcher's time grows with the gram list (why grams.MAX_GRAMS exists).

    python -m benchmarks.bench_gram_matching

Matches 128 completions of 150 words (a default step's batch, words drawn from planning and
arithmetic vocabulary, seed 0) against the paper's 249 grams padded with made-up three-word grams to
1,000, 2,000 and 5,000, and prints the seconds to build the pattern and to match the batch once
(grams.find_gram_spans).
"""

import random
import time

import grams

WORDS = ("the answer is so we have let me check wait first then alternatively compute add tens "
         "ones").split()


def main() -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(128)]
    paper = grams.load_grams("paper")
    for count in (len(paper), 1_000, grams.MAX_GRAMS, 5_000):
        padded = paper + [f"{rng.choice(WORDS)} zq{i} {rng.choice(WORDS)}"
                          for i in range(count - len(paper))]
        started = time.perf_counter()
        grams.find_gram_spans("", padded)  # builds and caches the pattern
        built = time.perf_counter() - started
        started = time.perf_counter()
        for text in texts:
            grams.find_gram_spans(text, padded)
        print(f"{count:>6,} grams: pattern {built:.2f} s, "
              f"128 completions matched in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
