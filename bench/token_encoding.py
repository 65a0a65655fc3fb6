"""Bytes per token of a top-k store, by encoding: measured on a trained LM's real outputs.

    python bench/token_encoding.py                  # about 5 minutes on 2 CPU cores
    python bench/token_encoding.py --json bench/results/token-encoding.json

1. corpus: the Python standard library's own source files (found through sysconfig; never downloaded);
2. a byte-level BPE tokenizer (tokenizers, vocabulary --vocab) trained on it locally;
3. a small `transformer_lm` trained on it for --steps steps (its outputs are a real LM's: peaked,
   long-tailed, not random logits);
4. `run_infer(top_k=--top-k)` over held-out sequences into a store (the store's own encoding);
5. each candidate encoding below re-encodes the stored arrays into a fresh Zarr array (crc32c last,
   as every store array) and reports the bytes on disk per token and the time to read them back.
   Ids stay exact and log-probabilities keep their float16 bits in every candidate (all lossless).

6. the sampled layouts (--sampled K+M: top-K plus M tail draws per token, K = 0 pure sampling) are
   stored by `run_infer(tail_samples=M)` in the store's own encoding and their bytes per token
   reported per array, beside the top-k store's (`sampled` in the JSON).

Candidates: the id order (most probable first, as `topk` returns them, or ascending id with the
log-probabilities permuted alike) x codecs (none, zstd, blosc-zstd with byte or bit shuffle, a delta
filter on sorted ids).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from mtkd.pipeline.data import make_token_data
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.models import transformer_lm
from mtkd.pipeline.store import open_store


def corpus(max_bytes: int) -> list[str]:
    """The standard library's .py files, in path order, up to max_bytes of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def train_lm(seqs: np.ndarray, vocab: int, steps: int, batch: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformer_lm(vocab, d_model=128, layers=2, heads=4, max_len=seqs.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.from_numpy(seqs[torch.randint(0, len(seqs), (batch,), generator=g).numpy()])
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def candidates() -> dict[str, dict]:
    """name -> {order, ids, logprobs, floats}: codec lists (before crc32c) for each array."""
    zstd3, zstd9 = ZstdCodec(level=3), ZstdCodec(level=9)

    def blosc(typesize, shuffle, level=5):
        return BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=typesize)

    from numcodecs.zarr3 import Delta  # only the delta candidates need it

    delta = [Delta(dtype="int32")]
    return {
        "raw (crc32c only)": {"order": "prob", "ids": [], "lp": [], "f32": []},
        "zstd-3": {"order": "prob", "ids": [zstd3], "lp": [zstd3], "f32": [zstd3]},
        "zstd-9": {"order": "prob", "ids": [zstd9], "lp": [zstd9], "f32": [zstd9]},
        "blosc-zstd shuffle": {"order": "prob", "ids": [blosc(4, BloscShuffle.shuffle)], "lp": [blosc(2, BloscShuffle.shuffle)], "f32": [blosc(4, BloscShuffle.shuffle)]},
        "blosc-zstd bitshuffle": {"order": "prob", "ids": [blosc(4, BloscShuffle.bitshuffle)], "lp": [blosc(2, BloscShuffle.bitshuffle)], "f32": [blosc(4, BloscShuffle.bitshuffle)]},
        "sorted ids, zstd-3": {"order": "id", "ids": [zstd3], "lp": [zstd3], "f32": [zstd3]},
        "sorted ids, blosc-zstd shuffle": {"order": "id", "ids": [blosc(4, BloscShuffle.shuffle)], "lp": [blosc(2, BloscShuffle.shuffle)], "f32": [blosc(4, BloscShuffle.shuffle)]},
        "sorted ids, blosc-zstd bitshuffle": {"order": "id", "ids": [blosc(4, BloscShuffle.bitshuffle)], "lp": [blosc(2, BloscShuffle.bitshuffle)], "f32": [blosc(4, BloscShuffle.bitshuffle)]},
        "sorted ids + delta, zstd-3": {"order": "id", "ids": [zstd3], "ids_filters": delta, "lp": [zstd3], "f32": [zstd3]},
        "sorted ids + delta, blosc-zstd bitshuffle": {"order": "id", "ids": [blosc(4, BloscShuffle.bitshuffle)], "ids_filters": delta,
                                                      "lp": [blosc(2, BloscShuffle.bitshuffle)], "f32": [blosc(4, BloscShuffle.bitshuffle)]},
    }


def measure(arrays: dict[str, np.ndarray], chunk_rows: int, spec: dict, work: Path) -> dict:
    ids, lp = arrays["topk_ids"], arrays["topk_logprobs"]
    if spec["order"] == "id":
        order = np.argsort(ids, axis=1, kind="stable")
        ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    parts = {"topk_ids": (ids, spec["ids"], spec.get("ids_filters", [])), "topk_logprobs": (lp, spec["lp"], []),
             "lse": (arrays["lse"], spec["f32"], []), "label_logprob": (arrays["label_logprob"], spec["f32"], [])}
    n = len(ids)
    sizes, read_s = {}, 0.0
    for name, (values, compressors, filters) in parts.items():
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        a = zarr.create_array(path, shape=values.shape, chunks=(chunk_rows, *values.shape[1:]), dtype=values.dtype,
                              filters=filters, compressors=[*compressors, Crc32cCodec()], fill_value=0)
        a[...] = values
        sizes[name] = sum(p.stat().st_size for p in (path / "c").rglob("*") if p.is_file())
        started = time.perf_counter()
        back = zarr.open_array(path, mode="r")[...]
        read_s += time.perf_counter() - started
        assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(values).view(np.uint8)), name  # lossless, bit for bit
    return {"bytes_per_token": sum(sizes.values()) / n, "per_array": {k: v / n for k, v in sizes.items()},
            "read_tokens_per_s": n / read_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-bytes", type=int, default=3_000_000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens stored and measured")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--sampled", default="32+32,0+64", help="sampled layouts K+M to store and measure ('' for none)")
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="mtkd-encoding-"))
    try:
        started = time.perf_counter()
        texts = corpus(args.corpus_bytes)
        tok = train_tokenizer(texts, args.vocab)
        ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)])
        seqs = ids[: len(ids) // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
        held = max(1, args.eval_tokens // args.seq_len)
        train, test = seqs[:-held], seqs[-held:]
        print(f"corpus: {len(texts)} files, {len(ids)} tokens; training on {len(train)} sequences", file=sys.stderr)
        model = train_lm(train, args.vocab, args.steps, args.batch, seed=0)
        torch.save(model.state_dict(), work / "lm.pt")
        (work / "lm.toml").write_text(
            '[[teachers]]\nname = "lm"\nfactory = "mtkd.pipeline.models:transformer_lm"\n'
            f"kwargs = {{ vocab_size = {args.vocab}, d_model = 128, layers = 2, heads = 4, max_len = {args.seq_len} }}\n"
            'checkpoint = "lm.pt"\n'
        )
        data = make_token_data("stdlib held-out", list(test))
        result = run_infer(work / "lm.toml", data, work / "store.zarr", top_k=args.top_k, batch_size=16, device="cpu")
        store = open_store(work / "store.zarr")
        stats = store.teacher("lm").stats
        arrays = store.read("lm", 0, store.num_rows)
        rows = {}
        for name, spec in candidates().items():
            rows[name] = measure(arrays, store.chunk_rows, spec, work / "candidates")
            print(f"  {name:45s} {rows[name]['bytes_per_token']:7.1f} B/token  read {rows[name]['read_tokens_per_s'] / 1e6:6.2f} M tokens/s", file=sys.stderr)
        from mtkd.pipeline.report import _bytes_per_row

        sampled = {}
        for part in filter(None, args.sampled.split(",")):
            k, m = (int(x) for x in part.split("+"))
            path = work / f"store-{k}+{m}.zarr"
            run_infer(work / "lm.toml", data, path, top_k=k, tail_samples=m, batch_size=16, device="cpu")
            s = open_store(path)
            per_array = {a.name: sum(f.stat().st_size for f in (path / "teachers" / "lm" / a.name / "c").rglob("*") if f.is_file()) / s.num_rows
                         for a in s.layout("lm").arrays()}
            sampled[part] = {"bytes_per_token": _bytes_per_row(s, "lm", s.done_blocks("lm")), "per_array": per_array}
            print(f"  top-{k} + {m} samples: {sampled[part]['bytes_per_token']:7.1f} B/token", file=sys.stderr)

        out = {
            "tokens": store.num_rows, "vocab": args.vocab, "top_k": args.top_k, "chunk_rows": store.chunk_rows,
            "teacher": {"perplexity": stats["perplexity"], "next_token_accuracy": stats["accuracy"], "tail_mass": stats["tail_mass"]},
            "store_bytes_per_token": _bytes_per_row(store, "lm", store.done_blocks("lm")),
            "infer_tokens_per_s": result.rows_per_s,
            "candidates": rows,
            "sampled": sampled,
            "conditions": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, machine shared with other jobs",
            "versions": {"zarr": zarr.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "wall_s": time.perf_counter() - started,
        }
        print(json.dumps(out, indent=2))
        if args.json_path:
            args.json_path.write_text(json.dumps(out, indent=2) + "\n")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
