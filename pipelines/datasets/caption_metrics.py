"""COCO caption metrics: BLEU-1..4 and CIDEr-D, as the COCO caption evaluation server computes them.

pycocoevalcap is the COCO team's own code (coco-caption on PyPI): its PTB tokenizer (Stanford
CoreNLP, run on Java) lower-cases and strips punctuation the standard way, `Bleu(4)` is corpus
BLEU with the closest reference length, and its `Cider` is CIDEr-D (Gaussian length penalty with
sigma 6, clipped n-gram counts, document frequencies from the references being scored). Scores
are returned as fractions (BLEU 0..1, CIDEr-D 0..10); papers print them x100.
"""

from __future__ import annotations

import contextlib
import io


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """references: image id -> its reference captions; hypotheses: image id -> one generated caption
    (an empty string is allowed and simply scores nothing). Every id needs both."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(hypotheses):
        raise ValueError(
            f"{len(set(references) ^ set(hypotheses))} image ids have a reference or a hypothesis, not both"
        )
    if not references:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images without reference captions: {empty[:5]}")
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        gts = tok.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        res = tok.tokenize({k: [{"caption": h}] for k, h in hypotheses.items()})
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "CIDEr-D": float(cider)}
