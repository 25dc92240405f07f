"""A tiny Hugging Face model folder and jsonl data made on the spot, for ``--task hf`` tests.

Nothing is downloaded: the Llama config is written with ``save_pretrained``, a byte-level BPE
tokenizer is trained with ``tokenizers`` on a few standard-library sources, and the data records
are paragraphs of other standard-library sources. Everything then loads through the real
``from_pretrained`` and ``load_dataset`` paths.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
VOCAB_SIZE = 512
STDLIB = Path(os.__file__).parent
TOKENIZER_SOURCES = ("os.py", "textwrap.py", "json/decoder.py", "string.py")
DATA_SOURCES = (
    ("a.jsonl", ("argparse.py",)),
    ("b.jsonl", ("logging/__init__.py",)),
    ("c.jsonl", ("dataclasses.py", "enum.py")),
)


@dataclass(frozen=True)
class HfFiles:
    model: Path
    """Folder with config.json and the tokenizer (no weights)."""
    data: Path
    """Folder with the jsonl files."""

    def task_flags(self) -> list[str]:
        """``locoswarm run`` flags that select this model and data."""
        return ["--task", "hf", "--model", str(self.model), "--data", str(self.data)]


def make_hf_files(root: Path, *, tie_word_embeddings: bool = False) -> HfFiles:
    """Writes the model folder ``root/model`` and the data folder ``root/data``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    model_dir, data_dir = root / "model", root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    config.save_pretrained(model_dir)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(STDLIB / name) for name in TOKENIZER_SOURCES], trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=EOS
    )
    fast.save_pretrained(model_dir)

    for name, sources in DATA_SOURCES:
        with open(data_dir / name, "w", encoding="utf-8") as out:
            for source in sources:
                text = (STDLIB / source).read_text(encoding="utf-8")
                for paragraph in text.split("\n\n"):
                    if paragraph.strip():
                        out.write(json.dumps({"text": paragraph}) + "\n")
    return HfFiles(model=model_dir, data=data_dir)
