"""Numbers that compare a model's next-token distributions (numpy only, no torch)."""


def log_softmax(logits):
    """log-probabilities of `logits` [n, vocab] in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits, targets) -> float:
    """exp(mean negative log-likelihood) of `targets` [n] under next-token `logits` [n, vocab]."""
    import numpy as np

    targets = np.asarray(targets)
    log_probs = log_softmax(logits)
    return float(np.exp(-log_probs[np.arange(len(targets)), targets].mean()))
