"""Time the planning mask (grams.planning_token_mask) on long completions, canonical and not.

    python -m benchmarks.bench_planning_mask --tokenizer PATH --grams paper \
        --tokens 1024 2048 4096 8192

A completion of N tokens is the canonical encoding of random words from a planning-heavy vocabulary;
its non-canonical twin spells two frequent words letter by letter (as sampling can), which sends the
mask down the incremental-decoding fallback. Both should grow linearly with N.
"""

import argparse
import random
import sys
import time

from transformers import AutoTokenizer

import grams as grams_lib
from cli import InputError

WORDS = ("let me check the sum wait but we get 12 + 30 = 42 so the answer is alternatively "
         "consider the case where x = 3 then").split()
SPELLED = ("check", "answer")  # words whose tokens are replaced by one token per letter


def completions(tokenizer, length: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A canonical token sequence of `length` tokens and a non-canonical one of the same length."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(length))
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    spelled = []
    for token_id in canonical:
        piece = tokenizer.decode([token_id])
        spell = piece.strip() in SPELLED
        spelled += ([i for ch in piece
                     for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
                    if spell else [token_id])
    return canonical, spelled[:length]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True,
                        help="HF tokenizer folder or id (a real BPE, e.g. SmolLM2's)")
    parser.add_argument("--grams", default="paper", help="strategic grams: preset or file")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="completion lengths")
    args = parser.parse_args(argv)
    try:
        grams = grams_lib.load_grams(args.grams)
    except InputError as error:
        sys.exit(f"error: {error}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for length in args.tokens:
        canonical, spelled = completions(tokenizer, length)
        seconds = []
        for ids in (canonical, spelled):
            started = time.perf_counter()
            grams_lib.planning_token_mask(tokenizer, ids, grams)
            seconds.append(time.perf_counter() - started)
        fallback = spelled != tokenizer(tokenizer.decode(spelled),
                                        add_special_tokens=False)["input_ids"]
        print(f"{length:6d} tokens: canonical {seconds[0]:7.3f} s, "
              f"non-canonical {seconds[1]:7.3f} s (fallback taken: {fallback})")


if __name__ == "__main__":
    main(sys.argv[1:])
