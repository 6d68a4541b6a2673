"""Numbers-to-words, a toy translation task for sequence-to-sequence examples: the digits of an
integer in, its English words out ("4213" -> "four thousand two hundred thirteen"). No files, no
download, the same bytes for the same arguments.

Layout of one sample (S source slots, T target slots):
    x = [src (S digit ids, PAD after the digits) | tgt_in (BOS, words..., PAD)]   int64 [S + T]
    y = [words..., EOS, IGNORE...]                                               int64 [T]
so x[S:] is y shifted right by one (teacher forcing) and padding in y is -100, which the
cross-entropy loss and mpipar.train.metrics.Tally both skip.
"""
from __future__ import annotations

import torch

from .common import Split

PAD, BOS, EOS = 0, 1, 2
IGNORE = -100
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = ["hundred", "thousand", "million"]
LIMIT = 10**9   # words exist for 0 .. LIMIT-1


class Vocab:
    """Token strings <-> ids; ids 0, 1, 2 are PAD, BOS, EOS in every vocabulary."""

    def __init__(self, tokens: list[str]):
        self.tokens = ["<pad>", "<bos>", "<eos>", *tokens]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, words: list[str]) -> list[int]:
        return [self.ids[w] for w in words]

    def decode(self, ids) -> list[str]:
        """Words up to the first EOS (PAD and BOS dropped)."""
        out = []
        for i in (int(v) for v in ids):
            if i == EOS:
                break
            if i > EOS:
                out.append(self.tokens[i])
        return out


SRC_VOCAB = Vocab(list("0123456789"))
TGT_VOCAB = Vocab(ONES + TENS + SCALES)


def below_thousand(n: int) -> list[str]:
    """Words of 1 <= n < 1000, American style (no 'and'), tens and units as separate tokens."""
    out = []
    if n >= 100:
        out += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        out.append(TENS[n // 10 - 2])
        n %= 10
    if n:
        out.append(ONES[n])
    return out


def to_words(n: int) -> list[str]:
    """English words of 0 <= n < 10**9 as tokens: 4213 -> four thousand two hundred thirteen."""
    if not 0 <= n < LIMIT:
        raise ValueError(f"to_words handles 0 <= n < {LIMIT}, got {n}")
    if n == 0:
        return ["zero"]
    out = []
    for scale, size in (("million", 10**6), ("thousand", 10**3)):
        if n >= size:
            out += below_thousand(n // size) + [scale]
            n %= size
    return out + (below_thousand(n) if n else [])


def lengths(max_number: int) -> tuple[int, int]:
    """(S, T): digit slots, and target slots (most words any n <= max_number can take, + EOS;
    exact when max_number is all nines, an upper bound otherwise)."""
    if not 0 < max_number < LIMIT:
        raise ValueError(f"max_number must be in 1..{LIMIT - 1}, got {max_number}")
    digits = len(str(max_number))
    groups, lead = (digits + 2) // 3, digits - 3 * ((digits - 1) // 3)
    most = {1: 1, 2: 2, 3: 4}[lead] + 5 * (groups - 1)   # 'x hundred yy z' + scale word per group
    return digits, most + 1


def encode_pairs(numbers: list[int], s_len: int, t_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, S+T] and y [N, T] (layout in the module docstring) for these numbers."""
    x = torch.full((len(numbers), s_len + t_len), PAD, dtype=torch.int64)
    y = torch.full((len(numbers), t_len), IGNORE, dtype=torch.int64)
    for i, n in enumerate(numbers):
        src = SRC_VOCAB.encode(list(str(n)))
        words = TGT_VOCAB.encode(to_words(n))
        x[i, :len(src)] = torch.tensor(src)
        x[i, s_len] = BOS
        x[i, s_len + 1:s_len + 1 + len(words)] = torch.tensor(words[:t_len - 1])
        y[i, :len(words) + 1] = torch.tensor(words + [EOS])
    return x, y


def numbers_to_words(max_number: int = 9999, test_fraction: float = 0.2,
                     split_seed: int = 0) -> tuple[Split, Split]:
    """(train, test) over the integers 0..max_number, split by a fixed permutation of
    `split_seed` (disjoint: test numbers are never seen in training)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    s_len, t_len = lengths(max_number)
    order = torch.randperm(max_number + 1, generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_test = max(1, int(round((max_number + 1) * test_fraction)))
    parts = {"test": sorted(order[:n_test]), "train": sorted(order[n_test:])}
    note = (f"numbers-to-words 0..{max_number}: digits (S={s_len}) -> English word tokens (T={t_len} "
            f"with EOS), vocab {len(SRC_VOCAB)} src / {len(TGT_VOCAB)} tgt; "
            f"{len(parts['train'])} train, {len(parts['test'])} test numbers (split seed {split_seed})")
    meta = {"src_len": s_len, "tgt_len": t_len, "src_vocab": len(SRC_VOCAB), "tgt_vocab": len(TGT_VOCAB)}
    out = []
    for name in ("train", "test"):
        x, y = encode_pairs(parts[name], s_len, t_len)
        out.append(Split(x, y, note, {**meta, "numbers": parts[name]}))
    return out[0], out[1]


LM_SRC_OFFSET = len(TGT_VOCAB)                            # digits follow the words in one vocabulary
LM_VOCAB = -(-(len(TGT_VOCAB) + len(SRC_VOCAB)) // 8) * 8   # padded: divisible by tp = 1, 2, 4, 8


def numbers_lm(max_number: int = 9999) -> tuple[Split, Split]:
    """numbers_to_words for a decoder-only language model: one vocabulary of LM_VOCAB tokens
    (the digits shifted past the words), each row [digits | BOS words...]; targets as before."""
    train, test = numbers_to_words(max_number)
    s = train.meta["src_len"]
    for split in (train, test):
        split.x = split.x.clone()
        split.x[:, :s] += LM_SRC_OFFSET
    return train, test
