"""TF-IDF prefilter: keep the top-k training rows per query before any gradient work (docs/methods/ekfac.md §11).

Grosse et al. (arXiv 2308.03296) filter candidates lexically before computing influence; the
paper kept about 10,000 per query (unverified). The filter biases results toward lexical overlap.
Deviation: ties in the TF-IDF cosine are broken by training-row uid (determinism), not by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from curate._lazy import require
from curate.errors import param_error


def tfidf_topk(
    query_texts: Sequence[str], train_texts: Sequence[str], k: int | None = None,
    train_uids: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Per query, the indices of the ``k`` training rows with the highest TF-IDF cosine.

    Word unigrams and bigrams, sublinear tf, l2 norm, fitted on the training texts.

    Args:
        query_texts: one text per query (prompt + response).
        train_texts: one text per training row.
        k: rows kept per query (default min(N, 1000)).
        train_uids: tie-break key (default the row index).

    Returns:
        one sorted index array per query.
    """
    n = len(train_texts)
    if k is None:
        k = min(n, 1000)
    if not (isinstance(k, int) and k >= 1):
        raise param_error("tfidf_topk", "k", "an integer >= 1", k)
    k = min(k, n)
    text = require("sklearn.feature_extraction.text", "the TF-IDF prefilter")
    vec = text.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, norm="l2")
    x = vec.fit_transform(list(train_texts))
    q = vec.transform(list(query_texts))
    sims = np.asarray((q @ x.T).todense(), dtype=np.float64)
    tie = np.asarray(train_uids if train_uids is not None else np.arange(n)).astype(str)
    tie_rank = np.argsort(np.argsort(tie, kind="stable"), kind="stable")
    out = []
    for row in sims:
        order = np.lexsort((tie_rank, -row))
        out.append(np.sort(order[:k]))
    return out
