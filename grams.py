"""Strategic grams: which tokens are planning tokens (Sec. 2 of the paper).

A token is a *planning token* iff it lies inside an occurrence of a strategic gram (SG) in its
completion; every other token is an *execution token* (Sec. 2.1). The paper leaves the matching
rules unsaid, so here they are, chosen to be predictable:

- matching is done on the decoded text, case-insensitively, on word boundaries (a gram never matches
  inside a longer word: "so" does not match in "also"); runs of whitespace inside a gram match any
  whitespace; an apostrophe matches any apostrophe (' and the typographic ’ ‘ ʼ), so the gram
  "let's" matches "let’s" and the reverse;
- overlapping occurrences are merged into one character span ("but wait" and "wait" overlap);
- characters map to tokens through the tokenizer's offset mapping: a token is a planning token iff
  its character span overlaps a matched span, so a leading space or trailing punctuation glued to a
  token does not matter, and neighbouring tokens are not marked.

The paper's published set (Listing 1, 249 grams) ships as the `paper` preset; the built-in world's
own phrases are the `world` preset.
"""

import functools
import html
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cli import InputError
from data import problem_sources, read_text_lines

PRESET_FILES = {"paper": Path(__file__).parent / "data" / "grams" / "listing1.txt"}

ANSI_PLANNING = "\033[1;33m"  # bold yellow
ANSI_RESET = "\033[0m"
HIGHLIGHT_TAGS = {"ansi": (ANSI_PLANNING, ANSI_RESET), "plain": ("[[", "]]"),
                  "html": ("<mark>", "</mark>")}
# ASCII, right and left single quotation marks, modifier letter apostrophe
APOSTROPHES = "'\u2019\u2018\u02bc"
TO_ASCII_APOSTROPHE = str.maketrans(dict.fromkeys(APOSTROPHES, "'"))


# 8x the paper's list; one regex alternation costs time per gram at every text position
MAX_GRAMS = 2_000


def preset_grams() -> dict[str, tuple[str, ...] | None]:
    """Each preset name -> its grams: the problem sources' own (data.ProblemSource.grams, e.g.
    "world"), or None for a preset read from its file (PRESET_FILES: "paper")."""
    sources = {source.grams_preset: source.grams for source in problem_sources().values()}
    return dict.fromkeys(PRESET_FILES) | sources


def load_grams(preset_or_path: str) -> list[str]:
    """The strategic-gram list of a preset name (preset_grams) or of a file with one gram per
    line."""
    presets = preset_grams()
    if presets.get(preset_or_path) is not None:
        return list(presets[preset_or_path])
    path = PRESET_FILES.get(preset_or_path, Path(preset_or_path))
    if not path.exists():
        raise InputError(f"--grams: '{preset_or_path}' is neither a preset {tuple(presets)} "
                         "nor a file")
    try:
        grams = [line.strip().lower() for line in read_text_lines(path)]
    except InputError as error:
        raise InputError(f"--grams: {error}") from None
    grams = [g for g in grams if g]
    if not grams:
        raise InputError(f"--grams: {path} holds no grams")
    if len(grams) > MAX_GRAMS:
        raise InputError(f"--grams: {path} holds {len(grams):,} grams, over the {MAX_GRAMS:,} "
                         "this matcher takes (its time grows with every gram: "
                         "benchmarks/bench_gram_matching.py)")
    return grams


@functools.lru_cache(maxsize=16)
def _gram_pattern(grams: tuple[str, ...]) -> re.Pattern:
    """One regex that finds, at every start position, the longest gram that matches there.

    The zero-width lookahead lets matches overlap; alternatives are tried longest first. Any
    apostrophe in a gram matches any of APOSTROPHES; the text itself is never rewritten, so spans
    index the original text.
    """
    alternatives = sorted({r"\s+".join(map(_word_pattern, g.split())) for g in grams if g.split()},
                          key=len, reverse=True)
    return re.compile(r"(?<!\w)(?=((?:" + "|".join(alternatives) + r"))(?!\w))", re.IGNORECASE)


def _word_pattern(word: str) -> str:
    """Regex of one gram word: the word escaped, each apostrophe widened to the class of all
    APOSTROPHES."""
    return "".join(f"[{APOSTROPHES}]" if char in APOSTROPHES else re.escape(char) for char in word)


def _raw_matches(text: str, grams: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of the longest gram matching at each start position, in order of start."""
    return [(m.start(1), m.end(1)) for m in _gram_pattern(tuple(grams)).finditer(text)]


def find_gram_spans(text: str, grams: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of strategic-gram occurrences in `text`, overlapping occurrences merged."""
    merged: list[tuple[int, int]] = []
    for start, end in _raw_matches(text, grams):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def gram_occurrences(text: str, grams: Sequence[str]) -> list[str]:
    """The gram (lower-case, single-spaced, ASCII apostrophes) of each occurrence, skipping those
    nested in a longer one.

    "but wait" counts once as "but wait", not also as "but" and "wait"; used for semantic entropy.
    """
    occurrences, covered_until = [], -1
    for start, end in _raw_matches(text, grams):
        if end <= covered_until:
            continue
        occurrences.append(" ".join(text[start:end].lower().translate(TO_ASCII_APOSTROPHE).split()))
        covered_until = end
    return occurrences


def token_char_spans(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of `token_ids` and the character span of each token in it.

    Fast path: re-encode the text with the tokenizer's offset mapping; valid when it gives back the
    same ids (the usual case); a bare prepended "▁" token gets an empty span
    (`without_prepended_markers`). Otherwise (a sampled tokenisation that is not the canonical one)
    fall back to incremental decoding (`incremental_char_spans`). Both are linear in the number of
    tokens.
    """
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoding["input_ids"] == ids:
        return text, without_prepended_markers(tokenizer, ids,
                                               [tuple(span) for span in encoding["offset_mapping"]])
    return text, incremental_char_spans(tokenizer, ids)


def without_prepended_markers(tokenizer, ids: Sequence[int],
                              spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Offsets with an empty span for each token that is only a word-boundary marker the tokenizer
    added.

    A SentencePiece tokenizer (Llama, Mistral) prepends "▁" to the text and decoding strips it. When
    that "▁" is a token on its own, the offset mapping aligns it with the next token's first
    character ((0, 1) under "so" at (0, 2)), which would make it a planning token; it is no
    character of the text, so its span is empty, as incremental_char_spans gives it. Only a token
    overlapping the next one is decoded to check (the bytes of a split character overlap too, but
    decode to U+FFFD and keep their offsets).
    """
    return [
        (start, start) if i + 1 < len(spans) and spans[i + 1][0] < end
        and tokenizer.decode(ids[i : i + 1], skip_special_tokens=False) == "" else (start, end)
        for i, (start, end) in enumerate(spans)
    ]


def incremental_char_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Token i spans the characters that appending it adds to the decoded text.

    Decoding every prefix would be quadratic; instead each step decodes a short window that starts
    at the previous token whose text is complete (the incremental detokenisation of HF's
    TextStreamer and vLLM): added = len(decode(window + [i])) - len(decode(window)). A token that
    ends inside a multi-byte character (its decoding ends with U+FFFD) adds nothing yet; the token
    completing the character takes all of it.
    """
    spans, end = [], 0
    window_start, counted_end = 0, 0  # the text of ids[window_start:counted_end] is already counted
    for i in range(len(ids)):
        counted = tokenizer.decode(ids[window_start:counted_end], skip_special_tokens=False)
        extended = tokenizer.decode(ids[window_start : i + 1], skip_special_tokens=False)
        complete = len(extended) > len(counted) and not extended.endswith("\ufffd")
        added = len(extended) - len(counted) if complete else 0
        spans.append((end, end + added))
        end += added
        if complete:
            window_start, counted_end = counted_end, i + 1
    return spans


def overlapping_tokens(token_spans: Sequence[tuple[int, int]],
                       gram_spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token span overlaps a gram span, in one sweep over both.

    token_spans in text order (non-decreasing starts); gram_spans sorted and disjoint
    (find_gram_spans).
    """
    overlaps, g = [], 0
    for token_start, token_end in token_spans:
        # grams ending before this token
        while g < len(gram_spans) and gram_spans[g][1] <= token_start:
            g += 1
        overlaps.append(g < len(gram_spans) and gram_spans[g][0] < token_end)
    return overlaps


def planning_token_mask(tokenizer, completion_ids: Sequence[int],
                        grams: Sequence[str]) -> torch.Tensor:
    """Planning-token mask of one completion (Sec. 2.1): token t is a planning token iff it overlaps
    a gram.

    completion_ids: the generated tokens only (no padding), length L. Returns a BoolTensor [L].
    """
    text, token_spans = token_char_spans(tokenizer, completion_ids)
    return torch.tensor(overlapping_tokens(token_spans, find_gram_spans(text, grams)),
                        dtype=torch.bool)  # [L]


def batch_planning_mask(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        grams: Sequence[str]) -> torch.Tensor:
    """Planning-token mask for a right-padded batch: completion_ids [B, C], completion_mask
    [B, C] -> bool [B, C].

    The mask lives on completion_ids' device, like the rest of the batch.
    """
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool)  # [B, C]
    for row, (ids, length) in enumerate(zip(completion_ids.tolist(),
                                            completion_mask.sum(-1).int().tolist())):
        mask[row, :length] = planning_token_mask(tokenizer, ids[:length], grams)
    return mask.to(completion_ids.device)


def semantic_entropy(counts: Mapping[str, int] | Sequence[int]) -> float:
    """Semantic entropy of strategic-gram occurrences (Sec. 4): H = -sum_g p_g log p_g, p_g =
    count_g / total.

    Natural log. Zero when there are no occurrences or a single distinct gram.
    """
    values = [c for c in (counts.values() if isinstance(counts, Mapping) else counts) if c > 0]
    total = sum(values)
    # log(1/p): no -0.0
    return sum(c / total * math.log(total / c) for c in values) if total else 0.0


def batch_gram_counts(texts: Sequence[str], grams: Sequence[str]) -> Counter:
    """How often each strategic gram occurs over a batch of completions."""
    return Counter(g for text in texts for g in gram_occurrences(text, grams))


def highlight_planning(text: str, spans: Sequence[tuple[int, int]], style: str = "ansi") -> str:
    """`text` with the planning spans marked: ANSI colour for a terminal, [[ ]] for a log file or
    pipe, <mark> for HTML (text escaped)."""
    if style not in HIGHLIGHT_TAGS:
        raise ValueError(f"style must be one of {sorted(HIGHLIGHT_TAGS)}, got {style!r}")
    escape = html.escape if style == "html" else str
    open_tag, close_tag = HIGHLIGHT_TAGS[style]
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [escape(text[cursor:start]), open_tag, escape(text[start:end]), close_tag]
        cursor = end
    pieces.append(escape(text[cursor:]))
    return "".join(pieces)
