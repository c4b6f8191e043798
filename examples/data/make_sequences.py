"""Writes the synthetic sequence data sets of the examples (deterministic, offline):

    python examples/data/make_sequences.py      # rewrites reviews.npz and text.npz here

reviews.npz (examples/sentiment_lstm.dln): "movie reviews" of 20..200 tokens, padded with
0 to 200. Tokens 2..11 are positive words, 12..21 negative ones, 22..999 neutral filler.
A review holds about one word of its sentiment in 10 (at least 2, and sometimes one of the
other sentiment) at random places; `label` is 1 for positive, 0 for negative. `tokens` int32 [N, 200], `label` [N].

text.npz (examples/char_lm.dln): a text of short sentences from a small grammar ("the old
cat sees a red ball."), as character codes 1..K (0 is unused), cut into consecutive
windows of `steps` characters: `x` [N, steps] holds window i, `y` its characters shifted
by one (the next character at each step). Window i+1 continues window i: a model that
carries its state between batches reads the text as one stream.

The tests call these functions with small sizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = np.arange(2, 12)
NEGATIVE = np.arange(12, 22)
VOCAB = 1000
ALPHABET = " .abcdefghijklmnopqrstuvwxyz"  # character k of the text is code k + 1


def reviews(n: int = 1000, steps: int = 200, min_len: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, steps), np.int32)
    label = rng.integers(0, 2, n).astype(np.int32)
    for i in range(n):
        length = int(rng.integers(min(min_len, steps), steps + 1))
        row = rng.integers(22, VOCAB, length)
        # about one word of its sentiment in 10 (at least 2), at random places
        words = rng.choice(POSITIVE if label[i] else NEGATIVE, max(2, length // 10 + int(rng.integers(0, 2))))
        if rng.random() < 0.3:  # one word of the other sentiment
            words = np.append(words, rng.choice(NEGATIVE if label[i] else POSITIVE))
        row[rng.choice(length, min(len(words), length), replace=False)] = words[:length]
        tokens[i, :length] = row
    return tokens, label


_GRAMMAR = {
    "det": ["the", "a", "my", "one"],
    "adj": ["old", "red", "small", "quiet", "happy", "big"],
    "noun": ["cat", "dog", "bird", "fish", "ball", "tree", "house", "girl", "boy"],
    "verb": ["sees", "likes", "finds", "eats", "wants", "has"],
}


def text(chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)

    def pick(kind):
        words = _GRAMMAR[kind]
        return words[int(rng.integers(len(words)))]

    out, size = [], 0
    while size < chars:
        phrase = [pick("det")] + ([pick("adj")] if rng.random() < 0.5 else []) + [pick("noun")]
        other = [pick("det")] + ([pick("adj")] if rng.random() < 0.5 else []) + [pick("noun")]
        sentence = " ".join(phrase + [pick("verb")] + other) + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:chars]


def char_windows(n: int = 1000, steps: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    codes = np.array([ALPHABET.index(c) + 1 for c in text(n * steps + 1, seed)], np.int32)
    return codes[:-1].reshape(n, steps), codes[1:].reshape(n, steps)


def main() -> None:
    here = Path(__file__).parent
    tokens, label = reviews()
    np.savez_compressed(here / "reviews.npz", tokens=tokens, label=label)
    x, y = char_windows()
    np.savez_compressed(here / "text.npz", x=x, y=y)
    for name in ("reviews.npz", "text.npz"):
        print(f"wrote {here / name} ({(here / name).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
