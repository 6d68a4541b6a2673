"""Shakespeare's works as a character-level language-modelling corpus, split by WORK: validation is
whole plays never seen in training (not the tail of one long text), so its loss measures how the
model writes a play it has not read.

Files: `<dir>/texts/<work>_gut.txt`, one Project Gutenberg plain text per work, as in
shared/data/shakespeare (37 plays, the sonnets, 4 poems; CC BY 2.5, the works public domain).
`<dir>` is --data-dir, else $MPIPAR_DATA/shakespeare, else the 5 plays shipped in
examples/data/shakespeare. The vocabulary is every character of the folder's works, in code-point
order. Validation: the works of HELD_OUT found there (the whole corpus: all four, 8.8% of its
characters; the shipped plays: Macbeth); training: all the others.

Samples: x = characters [i, i + T), y = [i + 1, i + T + 1). Training holds every start i (nanoGPT
draws random starts; here each epoch is a permutation of them), as views of one tensor, not
copies; validation holds `val_windows` non-overlapping windows spread evenly over the held-out works.
"""
from __future__ import annotations

import numpy as np
import torch

from .cache import cached
from .common import Split, data_dir_for, fail

DATASET = "shakespeare"
SUFFIX = "_gut.txt"
HELD_OUT = ("macbeth", "twelfth_night", "richard_ii", "tempest")   # a tragedy, a comedy, a history, a romance


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharVocab:
    """Characters <-> ids (ids in code-point order)."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.points = codepoints(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of `text`; a character outside the vocabulary is a ValueError naming it."""
        cp = codepoints(text)
        ids = np.searchsorted(self.points, cp).clip(max=len(self.points) - 1)
        unknown = self.points[ids] != cp
        if unknown.any():
            raise ValueError(f"character {chr(int(cp[unknown][0]))!r} is not in the corpus's vocabulary")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        return self.points[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")


def split_works(names) -> tuple[list[str], list[str]]:
    """(training works, validation works): the HELD_OUT works among `names` are validation."""
    return [n for n in names if n not in HELD_OUT], [n for n in names if n in HELD_OUT]


def read_works(data_dir=None) -> dict[str, str]:
    """{work: text} of every <work>_gut.txt under <dir>/texts, in name order."""
    texts = data_dir_for(DATASET, data_dir) / "texts"
    files = sorted(texts.glob(f"*{SUFFIX}")) if texts.is_dir() else []
    if not files:
        raise fail(DATASET, f"no works (texts/*{SUFFIX}) in {texts.parent}",
                   f"pass --data-dir pointing at a folder with texts/*{SUFFIX} (shared/data/shakespeare)")
    works = {}
    for f in files:
        try:
            works[f.name.removesuffix(SUFFIX)] = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise fail(DATASET, f"{f} is not UTF-8 text ({e.reason} at byte {e.start})",
                       "restore the original Project Gutenberg text") from None
    return works


def windows(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of `block` ids and its next-character targets, as views of `ids` [n - block, block]."""
    n = len(ids) - block
    return ids.as_strided((n, block), (1, 1)), ids[1:].as_strided((n, block), (1, 1))


TAIL = 0.1   # val_split="tail": the last 10% of every work (nanoGPT's split of one text, per work)


def load_shakespeare(block_size: int = 64, data_dir=None, val_windows: int = 1024,
                     val_split: str = "works") -> tuple[Split, Split]:
    """(train, validation) Splits of int64 [N, block_size] (x, y); meta: vocab (CharVocab), the works
    of each split, block_size. val_windows=0: every non-overlapping window of the validation text.
    val_split "works": the HELD_OUT works; "tail": the last 10% of every work, whose first 90%
    trains (the same plays on both sides, as nanoGPT's split of tinyshakespeare -- an easier test).
    Loaded once per process for the same arguments."""
    if val_split not in ("works", "tail"):
        raise fail(DATASET, f"validation split {val_split!r}", "use 'works' (held-out works) or 'tail'")
    key = (DATASET, str(data_dir_for(DATASET, data_dir)), block_size, val_windows, val_split)
    return cached(key, lambda: _load(block_size, data_dir, val_windows, val_split))


def _load(block: int, data_dir, val_windows: int, val_split: str = "works") -> tuple[Split, Split]:
    works = read_works(data_dir)
    train_works, val_works = split_works(works)
    where = data_dir_for(DATASET, data_dir) / "texts"
    vocab = CharVocab("".join(works.values()))
    if val_split == "tail":
        cut = {w: len(t) - int(len(t) * TAIL) for w, t in works.items()}
        train_ids = vocab.encode("".join(t[:cut[w]] for w, t in works.items()))
        val_ids = vocab.encode("".join(t[cut[w]:] for w, t in works.items()))
        train_works, val_works = list(works), [f"the last {TAIL:.0%} of each of the {len(works)} works"]
    elif not val_works or not train_works:
        raise fail(DATASET, f"{where} holds {len(train_works)} training and {len(val_works)} validation works "
                            f"(validation: {', '.join(HELD_OUT)})", "give it some of those and some others")
    else:
        train_ids = vocab.encode("".join(works[w] for w in train_works))
        val_ids = vocab.encode("".join(works[w] for w in val_works))
    whole = (len(val_ids) - 1) // block
    if len(train_ids) <= block or whole < 1:
        raise fail(DATASET, f"{where}: too little text for windows of {block} characters", "lower --block-size")
    n_val = min(val_windows, whole) if val_windows > 0 else whole
    starts = torch.linspace(0, whole - 1, n_val).round().long().unique() * block
    pick = starts[:, None] + torch.arange(block)
    x, y = windows(train_ids, block)
    held = f"{len(val_works)} held-out works ({', '.join(val_works)})" if val_split == "works" else val_works[0]
    meta = {"vocab": vocab, "block_size": block, "train_works": train_works, "val_works": val_works}
    note = (f"Shakespeare, character level (Project Gutenberg texts; vocabulary {len(vocab)} characters): "
            f"training {len(train_works)} works, {len(train_ids):,} characters (every window of {block}); "
            f"validation {held}, {len(pick)} windows of {block} spread over their {len(val_ids):,} characters")
    return Split(x, y, note, meta), Split(val_ids[pick], val_ids[pick + 1], note, meta)
