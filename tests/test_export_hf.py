"""`jaxnv export-hf WORKDIR --out DIR`: a model fine-tuned from a Hugging Face checkpoint goes back
as a directory that `transformers` loads, with the run's logits and its tokenizer."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxnv.cli import main  # noqa: E402

TEXTS = [f"def g{i}(y):\n    return y - {i} * {i + 1}\n" * 3 for i in range(40)]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny random Qwen2 (q/k/v biases) fine-tuned for 3 steps by `jaxnv train`."""
    from jaxnv.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("export")
    tokenizer = train_bpe(TEXTS, 280)
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save(root / "base")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    workdir = str(root / "run")
    args = [
        "train", "code_lm", "--workdir", workdir, f"model.init_from=hf:{root / 'base'}",
        f"data.path={corpus}", "data.eval_fraction=0", "data.seq_len=32", "train.batch_size=8",
        "train.steps=3", "optimizer.warmup_steps=0", "optimizer.learning_rate=0.01",
        "logging.progress=false", "logging.tensorboard=false", "logging.mfu=false",
    ]  # fmt: skip
    assert main(args) == 0
    return root, workdir, tokenizer


def test_export_hf_loads_in_transformers_with_the_runs_logits(finetuned, capsys):
    from flax import nnx

    from jaxnv.serve.loading import load_lm

    root, workdir, tokenizer = finetuned
    out = root / "exported"
    assert main(["export-hf", workdir, "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    lm = load_lm(workdir)
    model = nnx.merge(lm.graphdef, lm.params, lm.model_state)
    tokens = np.random.default_rng(0).integers(0, 280, (2, 24)).astype(np.int32)
    ours = np.asarray(model(tokens))
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs[..., : ours.shape[-1]], atol=1e-4, rtol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    with torch.no_grad():
        before = base(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(before - theirs).max() > 1e-3  # the fine-tuned weights, not the base's
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast.encode("def g1(y):") == tokenizer.encode("def g1(y):")


def test_export_hf_never_overwrites(finetuned, capsys):
    root, workdir, _ = finetuned
    taken = root / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export-hf", workdir, "--out", str(taken)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and "already exists" in err[0]
    assert (taken / "keep.txt").read_text() == "mine" and len(os.listdir(taken)) == 1
