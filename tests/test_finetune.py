"""`model.init_from=hf:DIR`: a run starts from a local Hugging Face checkpoint, as a user runs it
from the command line. The first step's loss equals `transformers`' loss on the same batch, and
the run's tokenizer is the checkpoint's own."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxnv.cli import main  # noqa: E402

ARGS = [
    "data.seq_len=32",
    "train.batch_size=8",
    "train.steps=2",
    "train.eval_every=0",
    "logging.log_every=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.mfu=false",
    "data.eval_fraction=0",
    "optimizer.warmup_steps=0",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (grouped-query attention) with a BPE tokenizer, and a JSONL corpus."""
    from jaxnv.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("hf")
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = train_bpe(texts, 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    directory = root / "llama"
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(directory)  # tokenizer.json beside the weights
    return {"dir": str(directory), "corpus": str(corpus), "model": model, "tokenizer": tokenizer}


def test_a_run_from_a_hf_checkpoint_starts_at_its_loss(checkpoint, tmp_path):
    from jaxnv.config import DataConfig
    from jaxnv.data.text import files_dataset

    workdir = str(tmp_path / "ft")
    init = f"model.init_from=hf:{checkpoint['dir']}"
    args = [*ARGS, init, f"data.path={checkpoint['corpus']}"]
    assert main(["train", "code_lm", "--workdir", workdir, *args]) == 0
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        first = next(r for r in map(json.loads, f) if r["split"] == "train")
    # the same batch, through transformers itself
    cfg = DataConfig(
        name="files", path=checkpoint["corpus"], seq_len=32, eval_fraction=0,
        tokenizer=checkpoint["dir"],
    )  # fmt: skip
    batch = files_dataset(cfg, batch_size=8, seed=0).train
    batch = next(iter(batch)) if not hasattr(batch, "holds_global") else batch[0]
    with torch.no_grad():
        logits = checkpoint["model"](torch.tensor(np.asarray(batch["x"], np.int64))).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.tensor(np.asarray(batch["y"], np.int64)).reshape(-1),
        )
    np.testing.assert_allclose(first["loss"], float(loss), rtol=1e-4)
    from jaxnv.data.tokenizers import load_saved

    saved = load_saved(os.path.join(workdir, "tokenizer"))
    assert saved.encode("def f(x):") == checkpoint["tokenizer"].encode("def f(x):")


def test_init_from_without_a_model_directory_is_one_line(tmp_path, capsys):
    code = main(
        ["train", "code_lm", "--workdir", str(tmp_path / "w"), *ARGS,
         f"model.init_from=hf:{tmp_path}", f"data.path={tmp_path}/*.jsonl"]
    )  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert code == 2 and len(err) == 1 and "holds no config.json" in err[0], err
