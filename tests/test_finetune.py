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


@pytest.mark.slow
def test_finetune_lm_lora_keeps_the_base_and_exports_to_transformers(checkpoint, tmp_path):
    """`jaxnv train finetune_lm ... lora.rank=4` on the tiny Llama: the summary has the held-out
    loss before and after (lower), and a sample; the base
    is the checkpoint's weights bit for bit after training; merged and saved, the model loads in
    transformers with jaxnv's logits."""
    import jax
    from safetensors.numpy import load_file

    from jaxnv.core.state import path_str
    from jaxnv.hf import save
    from jaxnv.models.lora import merge
    from jaxnv.serve.loading import load_lm

    workdir = str(tmp_path / "ft")
    held_out = tmp_path / "eval.jsonl"
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40, 44)]
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = [a for a in ARGS if not a.startswith(("data.eval_fraction", "train.steps"))]
    args += ["train.steps=6", "lora.rank=4", "optimizer.learning_rate=1e-2",
             f"model.init_from=hf:{checkpoint['dir']}", f"data.path={checkpoint['corpus']}",
             f"data.eval_path={held_out}"]  # fmt: skip
    assert main(["train", "finetune_lm", "--workdir", workdir, *args]) == 0
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert isinstance(summary["sample"], str) and summary["sample"]
    # adapters only: wqkv and wo of 2 layers, r * (in + out) each
    D, K, G, H = 64, 2, 2, 16
    per_layer = 4 * (D + K * (G + 2) * H) + 4 * (4 * H + D)
    assert summary["params"] == 2 * per_layer

    lm = load_lm(workdir)  # rebuilt from model.init_from, adapters from the checkpoint
    hf = load_file(os.path.join(checkpoint["dir"], "model.safetensors"))
    base = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(lm.model_state)}
    q = np.asarray(base["blocks/attn/wqkv"])[0, :, :, :G].reshape(D, -1)  # layer 0: (D, N * H)
    np.testing.assert_array_equal(q.T, hf["model.layers.0.self_attn.q_proj.weight"])
    from flax import nnx

    merged = merge(nnx.merge(lm.graphdef, lm.params, lm.model_state))
    out = save(merged, tmp_path / "merged", tokenizer=checkpoint["dir"])
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(0).integers(0, 300, (2, 16))
    with torch.no_grad():
        theirs = back(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(nnx.merge(lm.graphdef, lm.params, lm.model_state)(tokens.astype(np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_a_tokenizer_larger_than_the_checkpoints_vocabulary_is_one_line(
    checkpoint, tmp_path, capsys
):
    init = f"model.init_from=hf:{checkpoint['dir']}"
    args = [*ARGS, init, f"data.path={checkpoint['corpus']}", "data.tokenizer=bpe:400"]
    code = main(["train", "code_lm", "--workdir", str(tmp_path / "w"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert code == 2 and len(err) == 1 and "vocabulary 320" in err[0], err  # a BPE of <= 400
    assert not (tmp_path / "w" / "checkpoints").exists()
