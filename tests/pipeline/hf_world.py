"""A tiny Hugging Face world, built locally (nothing is ever downloaded): a byte-level BPE tokenizer
trained on a few sentences and wrapped as a PreTrainedTokenizerFast with a chat template, text and
chat `.jsonl` files (text.jsonl, val.jsonl, chat.jsonl), and tiny causal LMs (models/llama,
models/gpt2, models/student-init: Llamas and a GPT-2 from configs) saved with `save_pretrained`,
each with the tokenizer beside it as a hub folder has it. `hf_world(root)` builds it; `HF_VOCAB` is the tokenizer's vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path

HF_VOCAB = 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ("the cat sat on a mat and the dog ran to the park where a bird sang while the sun rose over "
         "green hills and quiet rivers").split()


def sentences(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


class HFWorld:
    def __init__(self, root: Path):
        import torch
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(sentences(200, 0), trainers.BpeTrainer(
            vocab_size=HF_VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0]))
        self.vocab = tok.get_vocab_size()
        self.tokenizer_json = root / "tokenizer.json"
        tok.save(str(self.tokenizer_json))
        wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                       pad_token="<|endoftext|>")
        wrapped.chat_template = CHAT_TEMPLATE
        self.tokenizer = root / "tok"
        wrapped.save_pretrained(str(self.tokenizer))
        self.text = root / "text.jsonl"
        self.text.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(48, 1)))
        self.val_text = root / "val.jsonl"
        self.val_text.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(16, 2)))
        self.chat = root / "chat.jsonl"
        lines = []
        for i, (q, a) in enumerate(zip(sentences(24, 3), sentences(24, 4))):
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                messages = [{"role": "system", "content": "be brief"}, *messages]
            lines.append(json.dumps({"messages": messages}) + "\n")
        self.chat.write_text("".join(lines))
        self.models = {}
        for seed, (name, config) in enumerate((
            ("llama", transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)),
            ("gpt2", transformers.GPT2Config(vocab_size=self.vocab, n_embd=16, n_layer=1, n_head=2, n_positions=256,
                                             bos_token_id=0, eos_token_id=0)),
            ("student-init", transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)),
        )):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config)
            self.models[name] = root / "models" / name
            model.save_pretrained(str(self.models[name]))
            wrapped.save_pretrained(str(self.models[name]))  # as a hub folder: the model with its tokenizer


def hf_world(root: Path) -> HFWorld:
    return HFWorld(root)
