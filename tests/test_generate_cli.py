"""`jaxnv generate` as a user runs it: on a local Hugging Face model directory its greedy text is
what `transformers` generates, and on a training workdir it continues with the run's tokenizer."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxnv.cli import main  # noqa: E402

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with a BPE tokenizer beside it."""
    from jaxnv.data.tokenizers import train_bpe

    tokenizer = train_bpe(TEXTS, 300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(directory)
    return str(directory), model, tokenizer


def test_greedy_text_from_a_hf_directory_is_transformers_own(hf_dir, capsys):
    path, model, tokenizer = hf_dir
    prompts = ["def f3(x):", "    return"]
    args = ["generate", path, "--max-tokens", "12", "--temperature", "0"]
    assert main([*args, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    out = capsys.readouterr().out
    for prompt in prompts:  # each prompt alone through transformers (no padding involved)
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        tokens = [t for t in new[0, ids.shape[1] :].tolist() if t != tokenizer.eos_id]
        if tokenizer.eos_id in new[0, ids.shape[1] :].tolist():  # jaxnv stops at eos
            tokens = new[0, ids.shape[1] :].tolist()
            tokens = tokens[: tokens.index(tokenizer.eos_id)]
        assert prompt + tokenizer.decode(tokens) in out


def test_a_stop_string_cuts_the_text(hf_dir, capsys):
    path, _, _ = hf_dir
    args = ["generate", path, "--prompt", "def f1(x):", "--max-tokens", "20", "--temperature", "0"]
    assert main(args) == 0
    full = capsys.readouterr().out.strip()
    cont = full[len("def f1(x):") :]
    stop = cont[len(cont) // 2 : len(cont) // 2 + 2]
    assert stop and main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out.strip() == "def f1(x):" + cont[: cont.index(stop)].rstrip()


def test_generate_on_a_workdir_uses_the_runs_tokenizer(tmp_path, capsys):
    import json

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    workdir = str(tmp_path / "run")
    train = [
        "train", "code_lm", "--workdir", workdir, f"data.path={corpus}", "data.eval_fraction=0",
        "data.tokenizer=bytes", "model.num_layers=1", "model.embed_dim=32", "model.num_heads=2",
        "data.seq_len=32", "train.batch_size=8", "train.steps=3", "logging.progress=false",
        "logging.tensorboard=false", "logging.mfu=false", "optimizer.warmup_steps=0",
    ]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    args = ["generate", workdir, "--prompt", "def ", "--max-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    text = capsys.readouterr().out[:-1]  # print's newline off
    assert text.startswith("def ") and len(text) <= len("def ") + 8  # bytes: one id a byte
    assert os.path.isdir(os.path.join(workdir, "tokenizer"))
    np.testing.assert_equal(main(["generate", str(tmp_path), "--prompt", "x"]), 2)
