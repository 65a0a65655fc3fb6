"""The language-model demo's text: the Python standard library's own source, a BPE tokenizer trained
on it here, and windows of tokens written as token data (`input_ids` (N, L), `attention_mask`).

    files       the top-level `.py` files of `sysconfig.get_paths()["stdlib"]` (present wherever Python
                is; never downloaded), in a fixed pseudo-random order (crc32 of the file name, so the
                order depends on no directory listing), taken until `max_bytes` of text
    split       by file: each file goes to the side that keeps validation's share of the bytes so far
                nearest `validation_fraction` (a file's text never lands on both sides, so
                validation measures generalisation to unseen modules)
    tokenizer   byte-level BPE (`tokenizers`), trained on the train split only: every byte is in the
                alphabet, so no text is ever unknown; one special token, <|endoftext|>, ends each file
    windows     each split's files, tokenised and joined (file, <|endoftext|>, file, ...), cut into
                rows of `window` tokens; the last partial row is padded (attention_mask 0)

The same Python gives the same corpus, tokenizer and windows on every run and machine.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtkd.pipeline.errors import BadInputError

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class CorpusConfig:
    max_bytes: int = 1_600_000  # text used, both splits together
    validation_fraction: float = 0.1  # of the bytes
    vocab_size: int = 2048
    window: int = 128  # tokens per row

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise BadInputError(f"corpus max_bytes must be > 0, got {self.max_bytes}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise BadInputError(f"corpus validation_fraction must lie in (0, 1), got {self.validation_fraction}")
        if self.vocab_size < 257:
            raise BadInputError(f"corpus vocab_size must be > 256 (the byte alphabet plus merges), got {self.vocab_size}")
        if self.window < 2:
            raise BadInputError(f"corpus window must be >= 2 tokens (a label needs a next token), got {self.window}")


@dataclass(frozen=True)
class Corpus:
    """What `build_corpus` wrote: the tokenizer, the two token-data files, and their sizes."""

    tokenizer: Path
    train: Path
    validation: Path
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    train_bytes: int
    validation_bytes: int
    train_tokens: int  # real tokens (padding excluded), end-of-text tokens included
    validation_tokens: int
    vocab_size: int  # as trained (at most the configured size)

    @property
    def text_bytes_per_token(self) -> float:
        return self.train_bytes / self.train_tokens


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The top-level `.py` files of the standard library, in the corpus order (crc32 of the name)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = [p for p in root.glob("*.py") if p.is_file()]
    if not files:
        raise BadInputError(f"no .py files in the standard library folder {str(root)!r}")
    return sorted(files, key=lambda p: (zlib.crc32(p.name.encode()), p.name))


def split_files(files: list[Path], config: CorpusConfig) -> tuple[list[Path], list[Path]]:
    """(train, validation): files in order until max_bytes; each goes to the side that keeps
    validation's share of the bytes so far nearest validation_fraction."""
    train, validation, total, held_out = [], [], 0, 0
    for path in files:
        if total >= config.max_bytes:
            break
        size = path.stat().st_size
        if held_out + size / 2 < config.validation_fraction * (total + size):
            validation.append(path)
            held_out += size
        else:
            train.append(path)
        total += size
    if not validation:
        raise BadInputError(
            f"corpus max_bytes={config.max_bytes} selects {len(train)} file(s): too few to hold any out for validation"
        )
    return train, validation


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (a `tokenizers.Tokenizer`) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_windows(tokenizer, texts: list[str], window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(input_ids (N, window) int64, attention_mask (N, window) int64, real tokens) from `texts` joined
    by end-of-text tokens; the last row is padded with end-of-text ids under mask 0."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot)
    stream = np.asarray(ids, dtype=np.int64)
    rows = -(-len(stream) // window)
    input_ids = np.full(rows * window, eot, dtype=np.int64)
    input_ids[: len(stream)] = stream
    mask = np.zeros(rows * window, dtype=np.int64)
    mask[: len(stream)] = 1
    return input_ids.reshape(rows, window), mask.reshape(rows, window), len(stream)


def build_corpus(folder: str | Path, config: CorpusConfig = CorpusConfig(), *, stdlib: Path | None = None) -> Corpus:
    """Write tokenizer.json, train.npz and validation.npz under `folder`; return what was written."""
    folder = Path(folder)
    train_paths, validation_paths = split_files(stdlib_files(stdlib), config)
    # The stdlib is UTF-8 (PEP 3120); a stray undecodable byte becomes U+FFFD rather than a failure.
    read = lambda paths: [p.read_bytes().decode("utf-8", errors="replace") for p in paths]  # noqa: E731
    train_texts, validation_texts = read(train_paths), read(validation_paths)
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    counts = {}
    for name, texts in (("train", train_texts), ("validation", validation_texts)):
        input_ids, mask, counts[name] = token_windows(tokenizer, texts, config.window)
        np.savez(folder / f"{name}.npz", input_ids=input_ids, attention_mask=mask)
    return Corpus(
        tokenizer=folder / "tokenizer.json",
        train=folder / "train.npz",
        validation=folder / "validation.npz",
        train_files=tuple(p.name for p in train_paths),
        validation_files=tuple(p.name for p in validation_paths),
        train_bytes=sum(len(t.encode()) for t in train_texts),
        validation_bytes=sum(len(t.encode()) for t in validation_texts),
        train_tokens=counts["train"],
        validation_tokens=counts["validation"],
        vocab_size=tokenizer.get_vocab_size(),
    )
