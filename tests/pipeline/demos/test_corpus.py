"""The LM demo's corpus: the standard library's code split by file and its prose by topic, a BPE
tokenizer, token windows per domain and mixed."""

from __future__ import annotations

import numpy as np
import pytest

from mtkd.pipeline.demos.corpus import END_OF_TEXT, CorpusConfig, build_corpus, prose_topics, split_files, stdlib_files
from mtkd.pipeline.errors import BadInputError


def test_stdlib_files_are_the_top_level_sources_in_a_fixed_order():
    files = stdlib_files()
    assert len(files) > 50 and all(p.suffix == ".py" for p in files)
    assert {"os.py", "typing.py", "argparse.py"} <= {p.name for p in files}
    assert files == stdlib_files()


def test_split_is_by_file_and_holds_out_about_the_asked_fraction():
    config = CorpusConfig()  # the demo's 1.6 MB
    train, validation = split_files(stdlib_files(), config)
    assert not set(train) & set(validation)
    size = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
    total = size(train) + size(validation)
    assert total >= config.max_bytes
    assert 0.08 <= size(validation) / total <= 0.12


def test_build_corpus_writes_token_windows_that_decode_back_to_the_files(tmp_path):
    config = CorpusConfig(max_bytes=60_000, vocab_size=400, window=32)
    corpus = build_corpus(tmp_path, config)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(corpus.tokenizer))
    assert corpus.vocab_size == tokenizer.get_vocab_size() <= 400
    eot = tokenizer.token_to_id(END_OF_TEXT)
    for path, files, tokens in ((corpus.train, corpus.train_files, corpus.train_tokens),
                                (corpus.validation, corpus.validation_files, corpus.validation_tokens)):
        data = np.load(path)
        ids, mask = data["input_ids"], data["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] == 32 and ids.dtype.kind == "i"
        assert mask.sum() == tokens and mask[:-1].all()  # only the last row is padded
        assert (np.diff(mask[-1]) <= 0).all()  # real tokens form a prefix
        assert 0 <= ids.min() and ids.max() < corpus.vocab_size
        stream = ids[mask == 1]
        assert (stream == eot).sum() == len(files)
        # Byte-level BPE loses nothing: the first file decodes back to its exact text.
        first = stream[: int(np.argmax(stream == eot))]
        import sysconfig
        from pathlib import Path

        text = (Path(sysconfig.get_paths()["stdlib"]) / files[0]).read_text(encoding="utf-8")
        assert tokenizer.decode(first.tolist()) == text


def test_build_corpus_is_deterministic(tmp_path):
    config = CorpusConfig(max_bytes=40_000, vocab_size=300, window=16)
    a, b = build_corpus(tmp_path / "a", config), build_corpus(tmp_path / "b", config)
    assert a.tokenizer.read_bytes() == b.tokenizer.read_bytes()
    assert np.array_equal(np.load(a.train)["input_ids"], np.load(b.train)["input_ids"])
    assert a.validation_files == b.validation_files


def test_a_folder_without_sources_is_refused(tmp_path):
    with pytest.raises(BadInputError, match=str(tmp_path)):
        stdlib_files(tmp_path)


def test_too_little_text_to_hold_any_out_is_refused(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 100)
    with pytest.raises(BadInputError, match="max_bytes"):
        build_corpus(tmp_path / "out", CorpusConfig(max_bytes=10), stdlib=tmp_path)


@pytest.mark.parametrize("field, value", [("max_bytes", 0), ("prose_max_bytes", -1), ("validation_fraction", 1.0), ("vocab_size", 256), ("window", 1)])
def test_bad_settings_are_refused_naming_the_setting(field, value):
    with pytest.raises(BadInputError, match=field):
        CorpusConfig(**{field: value})


def test_prose_topics_are_the_pydoc_help_pages_in_a_fixed_order():
    topics = prose_topics()
    assert len(topics) > 50 and {"if", "for", "lambda"} <= {name for name, _ in topics}
    assert all(isinstance(text, str) and text for _, text in topics)
    assert topics == prose_topics()


def test_two_domains_are_split_by_text_and_windowed_apart_and_together(tmp_path):
    config = CorpusConfig(max_bytes=40_000, prose_max_bytes=40_000, vocab_size=400, window=32)
    corpus = build_corpus(tmp_path, config)
    assert set(corpus.domains) == {"code", "prose"}
    prose = corpus.domains["prose"]
    assert prose.train_texts and prose.validation_texts and not set(prose.train_texts) & set(prose.validation_texts)
    assert prose.train == tmp_path / "train-prose.npz" and prose.validation == tmp_path / "validation-prose.npz"
    # The mixture is each domain's windows, code first: no window spans two domains.
    for split in ("train", "validation"):
        mixture = np.load(tmp_path / f"{split}.npz")
        parts = [np.load(tmp_path / f"{split}-{name}.npz") for name in ("code", "prose")]
        assert np.array_equal(mixture["input_ids"], np.concatenate([p["input_ids"] for p in parts]))
        assert np.array_equal(mixture["attention_mask"], np.concatenate([p["attention_mask"] for p in parts]))
    assert corpus.train_tokens == corpus.domains["code"].train_tokens + prose.train_tokens
    assert int(np.load(corpus.validation)["attention_mask"].sum()) == corpus.validation_tokens
    # The tokenizer learnt from both train splits: the prose's first topic decodes back exactly.
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(corpus.tokenizer))
    ids = np.load(prose.train)["input_ids"].ravel()
    first = ids[: int(np.argmax(ids == tokenizer.token_to_id(END_OF_TEXT)))]
    assert tokenizer.decode(first.tolist()) == topics[prose.train_texts[0]]
    # Code alone (prose_max_bytes 0, the default) is the corpus it was: one domain, the mixture is it.
    alone = build_corpus(tmp_path / "code", CorpusConfig(max_bytes=40_000, vocab_size=400, window=32))
    assert set(alone.domains) == {"code"}
    assert np.array_equal(np.load(alone.train)["input_ids"], np.load(alone.domains["code"].train)["input_ids"])


def test_too_little_prose_to_hold_any_out_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="prose_max_bytes=10 "):
        build_corpus(tmp_path, CorpusConfig(max_bytes=40_000, prose_max_bytes=10, vocab_size=300))
    assert not (tmp_path / "tokenizer.json").exists()
