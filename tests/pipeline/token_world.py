"""A tiny language-model world for stage-two tests: token data, three small teacher LMs, a sparse
store made by stage one, and student LMs (written under a temporary folder, importable as
`mtkd_test_lms`). Import the `token_world` fixture into a test module to use it.

The LMs are plain PyTorch (fast to build): an embedding, a GRU and an output layer `lm_head`,
exposing `.hidden(input_ids)` so that the trainer can take the fused-linear path; `scaled_lm`
multiplies its logits after the output layer (a model the fused path must refuse); `recording_lm`
writes down what each process trains on (for the torchrun test).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

VOCAB, MAX_LEN = 40, 16
TEACHERS = ("g1", "g2", "g3")

LMS_SOURCE = textwrap.dedent(
    '''
    """Tiny language models for mtkd's tests (written by tests/pipeline/token_world.py)."""
    import torch
    from torch import nn


    class TinyLM(nn.Module):
        def __init__(self, vocab_size=40, hidden=16, scale=1.0):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, hidden)
            self.rnn = nn.GRU(hidden, hidden, batch_first=True)
            self.lm_head = nn.Linear(hidden, vocab_size)
            self.scale = scale

        def hidden(self, input_ids):  # as mtkd.pipeline.models' LMs: no mask (causal: right padding is harmless)
            return self.rnn(self.embed(input_ids))[0]  # (B, L, H)

        def forward(self, input_ids):
            return self.lm_head(self.hidden(input_ids)) * self.scale  # (B, L, V)


    def tiny_lm(**kwargs):
        return TinyLM(**kwargs)


    def scaled_lm(**kwargs):
        return TinyLM(scale=2.0, **kwargs)


    class RecordingLM(TinyLM):
        """A TinyLM that, on every training forward, appends to RECORD/rank-R.txt (R: torchrun's
        RANK) a line with the sum of its parameters and then each real sequence of the batch."""

        def __init__(self, record, **kwargs):
            super().__init__(**kwargs)
            self.record = record

        def hidden(self, input_ids, attention_mask=None):
            if self.training and attention_mask is not None:
                import os

                with open(os.path.join(self.record, f"rank-{os.environ.get('RANK', '0')}.txt"), "a") as f:
                    f.write(f"P {float(sum(p.double().sum() for p in self.parameters()))!r}\\n")
                    for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                        f.write(" ".join(str(t) for t, m in zip(row, mask) if m) + "\\n")
            return super().hidden(input_ids)

        def forward(self, input_ids, attention_mask=None):
            return self.lm_head(self.hidden(input_ids, attention_mask)) * self.scale


    def recording_lm(**kwargs):
        return RecordingLM(**kwargs)
    '''
)


class TokenWorld:
    """train.npz / val.npz (padded input_ids + attention_mask), teachers.toml (three TinyLMs with
    checkpoints), store.zarr (top-k 8 at T = 1, 2, chunks of `chunk_rows` rows), student.toml."""

    seqs, chunk_rows, top_k = 60, 32, 8

    def __init__(self, root: Path):
        import torch

        from mtkd.pipeline.infer import run_infer

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "mtkd_test_lms.py").write_text(LMS_SOURCE)
        sys.path.insert(0, str(root))
        import mtkd_test_lms

        rng = np.random.default_rng(0)
        chain = rng.dirichlet(np.full(VOCAB, 0.1), size=VOCAB)  # a Markov chain the teachers half learn
        self.data = {}
        for split, n in (("train", self.seqs), ("val", self.seqs // 2)):
            ids, mask = np.zeros((n, MAX_LEN), np.int64), np.zeros((n, MAX_LEN), np.int64)
            for i in range(n):
                length = int(rng.integers(3, MAX_LEN + 1))
                seq = [int(rng.integers(VOCAB))]
                for _ in range(length - 1):
                    seq.append(int(rng.choice(VOCAB, p=chain[seq[-1]])))
                ids[i, :length], mask[i, :length] = seq, 1
            self.data[split] = root / f"{split}.npz"
            np.savez(self.data[split], input_ids=ids, attention_mask=mask)
        lines = ["# mtkd infer --teachers teachers.toml --data train.npz --out store.zarr --top-k 8"]
        for seed, name in enumerate(TEACHERS):
            torch.manual_seed(100 + seed)
            teacher = mtkd_test_lms.tiny_lm(hidden=12 + 4 * seed)
            with torch.no_grad():
                teacher.lm_head.weight.mul_(4.0)  # confident teachers: a target far from a fresh student
            torch.save(teacher.state_dict(), root / f"{name}.pt")
            lines += ["[[teachers]]", f'name = "{name}"', 'factory = "mtkd_test_lms:tiny_lm"',
                      f"kwargs = {{ hidden = {12 + 4 * seed} }}", f'checkpoint = "{name}.pt"', ""]
        self.teachers = root / "teachers.toml"
        self.teachers.write_text("\n".join(lines))
        self.store = root / "store.zarr"
        run_infer(self.teachers, str(self.data["train"]), self.store, top_k=self.top_k, temperatures="1,2",
                  device="cpu", chunk_rows=self.chunk_rows)
        self.student = self.student_toml("student.toml", "tiny_lm", hidden=8)

    def student_toml(self, filename: str, factory: str, **kwargs) -> Path:
        path = self.root / filename
        args = ", ".join(f"{k} = {v}" for k, v in kwargs.items())
        path.write_text(f'[student]\nname = "{factory}"\nfactory = "mtkd_test_lms:{factory}"\nkwargs = {{ {args} }}\n')
        return path


@pytest.fixture(scope="session")
def token_world(tmp_path_factory: pytest.TempPathFactory) -> TokenWorld:
    return TokenWorld(tmp_path_factory.mktemp("token_world"))
