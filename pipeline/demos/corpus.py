"""The language-model demo's text: two domains every machine has, a BPE tokenizer trained on them
here, and windows of tokens written as token data (`input_ids` (N, L), `attention_mask`).

    code        the top-level `.py` files of `sysconfig.get_paths()["stdlib"]` (present wherever Python
                is; never downloaded), in a fixed pseudo-random order (crc32 of the file name, so the
                order depends on no directory listing), taken until `max_bytes` of text
    prose       the English documentation text of `pydoc_data.topics` (the standard library's help()
                pages: a dict of topic -> text), in crc32 order of the topic, until `prose_max_bytes`
                (0: no prose domain)
    split       per domain, by file or topic: each goes to the side that keeps validation's share of
                the bytes so far nearest `validation_fraction` (a text never lands on both sides, so
                validation measures generalisation to unseen modules and topics)
    tokenizer   byte-level BPE (`tokenizers`), trained on the train split of every domain only: every
                byte is in the alphabet, so no text is ever unknown; one special token, <|endoftext|>,
                ends each text
    windows     each domain's split, tokenised and joined (text, <|endoftext|>, text, ...), cut into
                rows of `window` tokens; the last partial row is padded (attention_mask 0). A window
                never spans two domains. Per domain {train,validation}-DOMAIN.npz; train.npz and
                validation.npz are the mixture: every domain's windows, code first

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
    max_bytes: int = 1_600_000  # code text used, both splits together
    prose_max_bytes: int = 0  # pydoc topics text used, both splits together; 0: code only
    validation_fraction: float = 0.1  # of the bytes
    vocab_size: int = 2048
    window: int = 128  # tokens per row

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise BadInputError(f"corpus max_bytes must be > 0, got {self.max_bytes}")
        if self.prose_max_bytes < 0:
            raise BadInputError(f"corpus prose_max_bytes must be >= 0, got {self.prose_max_bytes}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise BadInputError(f"corpus validation_fraction must lie in (0, 1), got {self.validation_fraction}")
        if self.vocab_size < 257:
            raise BadInputError(f"corpus vocab_size must be > 256 (the byte alphabet plus merges), got {self.vocab_size}")
        if self.window < 2:
            raise BadInputError(f"corpus window must be >= 2 tokens (a label needs a next token), got {self.window}")


@dataclass(frozen=True)
class Domain:
    """One domain's part of the corpus: its two token-data files, the texts on each side, sizes."""

    name: str  # "code" or "prose"
    train: Path
    validation: Path
    train_texts: tuple[str, ...]  # file names (code) or topics (prose), in corpus order
    validation_texts: tuple[str, ...]
    train_bytes: int
    validation_bytes: int
    train_tokens: int  # real tokens (padding excluded), end-of-text tokens included
    validation_tokens: int


@dataclass(frozen=True)
class Corpus:
    """What `build_corpus` wrote: the tokenizer, the mixture's two token-data files, each domain's."""

    tokenizer: Path
    train: Path  # the mixture: every domain's train windows
    validation: Path
    domains: dict[str, Domain]
    vocab_size: int  # as trained (at most the configured size)

    @property
    def train_files(self) -> tuple[str, ...]:
        return self.domains["code"].train_texts

    @property
    def validation_files(self) -> tuple[str, ...]:
        return self.domains["code"].validation_texts

    @property
    def train_bytes(self) -> int:
        return sum(d.train_bytes for d in self.domains.values())

    @property
    def validation_bytes(self) -> int:
        return sum(d.validation_bytes for d in self.domains.values())

    @property
    def train_tokens(self) -> int:
        return sum(d.train_tokens for d in self.domains.values())

    @property
    def validation_tokens(self) -> int:
        return sum(d.validation_tokens for d in self.domains.values())

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


def prose_topics() -> list[tuple[str, str]]:
    """(topic, text) of `pydoc_data.topics`, in the corpus order (crc32 of the topic)."""
    from pydoc_data.topics import topics

    return sorted(topics.items(), key=lambda item: (zlib.crc32(item[0].encode()), item[0]))


def split_files(files: list[Path], config: CorpusConfig) -> tuple[list[Path], list[Path]]:
    """(train, validation): files in order until max_bytes; each goes to the side that keeps
    validation's share of the bytes so far nearest validation_fraction."""
    train, validation = split_texts([(p, p.stat().st_size) for p in files], config.max_bytes,
                                    config.validation_fraction)
    if not validation:
        raise BadInputError(
            f"corpus max_bytes={config.max_bytes} selects {len(train)} file(s): too few to hold any out for validation"
        )
    return train, validation


def split_texts(items: list, max_bytes: int, validation_fraction: float) -> tuple[list, list]:
    """(train, validation) of (item, size) pairs taken in order until max_bytes; each item goes to
    the side that keeps validation's share of the bytes so far nearest validation_fraction."""
    train, validation, total, held_out = [], [], 0, 0
    for item, size in items:
        if total >= max_bytes:
            break
        if held_out + size / 2 < validation_fraction * (total + size):
            validation.append(item)
            held_out += size
        else:
            train.append(item)
        total += size
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
    """Write tokenizer.json, {train,validation}-DOMAIN.npz per domain and the mixture's train.npz and
    validation.npz under `folder`; return what was written."""
    folder = Path(folder)
    train_paths, validation_paths = split_files(stdlib_files(stdlib), config)
    # The stdlib is UTF-8 (PEP 3120); a stray undecodable byte becomes U+FFFD rather than a failure.
    read = lambda paths: [p.read_bytes().decode("utf-8", errors="replace") for p in paths]  # noqa: E731
    # domain -> (train names, train texts, validation names, validation texts)
    sides = {"code": ([p.name for p in train_paths], read(train_paths),
                      [p.name for p in validation_paths], read(validation_paths))}
    if config.prose_max_bytes:
        topics = prose_topics()
        train_topics, validation_topics = split_texts([((t, text), len(text.encode())) for t, text in topics],
                                                      config.prose_max_bytes, config.validation_fraction)
        if not validation_topics:
            raise BadInputError(f"corpus prose_max_bytes={config.prose_max_bytes} selects {len(train_topics)} "
                                "topic(s): too few to hold any out for validation")
        sides["prose"] = ([t for t, _ in train_topics], [text for _, text in train_topics],
                          [t for t, _ in validation_topics], [text for _, text in validation_topics])
    tokenizer = train_tokenizer([text for side in sides.values() for text in side[1]], config.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    domains, mixture = {}, {"train": [], "validation": []}
    for name, (train_names, train_texts, validation_names, validation_texts) in sides.items():
        counts = {}
        for split, texts in (("train", train_texts), ("validation", validation_texts)):
            input_ids, mask, counts[split] = token_windows(tokenizer, texts, config.window)
            np.savez(folder / f"{split}-{name}.npz", input_ids=input_ids, attention_mask=mask)
            mixture[split].append((input_ids, mask))
        domains[name] = Domain(
            name=name, train=folder / f"train-{name}.npz", validation=folder / f"validation-{name}.npz",
            train_texts=tuple(train_names), validation_texts=tuple(validation_names),
            train_bytes=sum(len(t.encode()) for t in train_texts),
            validation_bytes=sum(len(t.encode()) for t in validation_texts),
            train_tokens=counts["train"], validation_tokens=counts["validation"],
        )
    for split, parts in mixture.items():
        np.savez(folder / f"{split}.npz", input_ids=np.concatenate([ids for ids, _ in parts]),
                 attention_mask=np.concatenate([mask for _, mask in parts]))
    return Corpus(tokenizer=folder / "tokenizer.json", train=folder / "train.npz",
                  validation=folder / "validation.npz", domains=domains, vocab_size=tokenizer.get_vocab_size())
