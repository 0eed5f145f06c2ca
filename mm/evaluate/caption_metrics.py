"""Caption metrics with coco-caption (pycocoevalcap) semantics: corpus BLEU-1..4 and CIDEr-D.

Both follow coco-caption's ``bleu_scorer.py`` / ``cider_scorer.py`` exactly, including their quirks:
BLEU's brevity penalty uses, per hypothesis, the reference length closest to the hypothesis length (ties: the
shorter), summed over the corpus; CIDEr-D uses tf-idf over the references of the evaluated set
(idf = log(#images) - log(max(1, df))), a Gaussian length penalty (sigma 6) whose "length" is the number of
bigrams (as in coco-caption), clipped hypothesis weights, a mean over n = 1..4 and references, times 10.

Text is tokenised like coco-caption's PTBTokenizer (lower case, clitics split off, punctuation dropped) but in
Python, so no Java is needed. pycocoevalcap itself is not a dependency (~100 MB of jars for two pure-Python
scorers); tests check these functions against values it produces.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# Tokens PTBTokenizer emits that coco-caption removes.
_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}"}
_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|[a-z0-9]+(?:[.,][0-9]+)*(?:-[a-z0-9]+)*|\S", re.I)


def ptb_tokenize(text: str) -> str:
    """Lower-cased, PTB-style tokens joined by spaces, punctuation removed (``"A dog's toy."`` -> ``a dog 's toy``)."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)  # don't -> do n't
    return " ".join(t for t in _TOKEN.findall(text) if t not in _PUNCTUATION)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(hypotheses: list[str], references: list[list[str]], n: int = 4, tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..n (coco-caption ``Bleu(4)``): one hypothesis and >= 1 references per item."""
    _check(hypotheses, references)
    small, tiny = 1e-9, 1e-15  # as coco-caption names them
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for hyp, refs in zip(hypotheses, references):
        hyp_words = (ptb_tokenize(hyp) if tokenize else hyp).split()
        max_counts: dict[tuple, int] = {}
        ref_lengths = []
        for ref in refs:
            words = (ptb_tokenize(ref) if tokenize else ref).split()
            ref_lengths.append(len(words))
            for gram, count in _ngrams(words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        testlen += len(hyp_words)
        reflen += min((abs(length - len(hyp_words)), length) for length in ref_lengths)[1]  # closest, ties shorter
        for k in range(n):
            guess[k] += max(0, len(hyp_words) - k)
        for gram, count in _ngrams(hyp_words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(
    hypotheses: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0, tokenize: bool = True
) -> tuple[float, list[float]]:
    """CIDEr-D as coco-caption's ``Cider`` computes it: ``(corpus score, per-item scores)``."""
    _check(hypotheses, references)
    prep = (lambda s: ptb_tokenize(s).split()) if tokenize else (lambda s: s.split())
    tests = [_ngrams(prep(h), n) for h in hypotheses]
    crefs = [[_ngrams(prep(r), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in crefs:
        df.update({gram for ref in refs for gram in ref})
    ref_len = math.log(float(len(crefs)))

    def vectorise(counts: Counter):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (ref_len - math.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # coco-caption counts bigrams as the length
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(tests, crefs):
        vec, norm, length = vectorise(test)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vectorise(ref)
            penalty = math.e ** (-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, vec_ref[k][g]) * vec_ref[k][g] for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def _check(hypotheses, references) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need one hypothesis per reference list ({len(hypotheses)} vs {len(references)}), >= 1")
    if any(not refs for refs in references):
        raise ValueError("every item needs at least one reference")
