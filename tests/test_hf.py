"""Hugging Face import/export against `transformers` itself (CPU, fp32).

Tiny random models (2 layers, 64 wide) of each architecture are made by `transformers`, saved
as safetensors, loaded by `jaxnv.hf.load`, and their logits compared; exported models are loaded
back by `transformers`. Each bad input gets its one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxnv.checkpoint import hf_tables
from jaxnv.hf import load, load_tokenizer, model_kwargs, save
from jaxnv.parallel.mesh import MeshConfig, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100  # not a multiple of 128: the padded rows are exercised
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=96,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # GQA (2 kv heads for 4 query heads), untied head
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    # q/k/v biases, tied embeddings
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True
    ),
    # MQA; a sliding window no shorter than the context changes nothing
    "mistral": lambda: transformers.MistralConfig(
        **COMMON, num_key_value_heads=1, sliding_window=64, rope_theta=500.0
    ),
    # Llama-3 rope scaling; head_dim 32 with 4 heads (heads * head_dim != hidden_size)
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, rope_scaling=LLAMA3, head_dim=32
    ),
}


def _randomize(model, seed: int):
    """Every weight random (norm scales around 1), so no layout error can hide behind zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(mean + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{name: (directory, transformers model)} for each architecture, saved as safetensors."""
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        model = _randomize(transformers.AutoModelForCausalLM.from_config(make()), seed=i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def _tokens(seed=0, batch=2, length=24):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def _ours(model, tokens) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(hf_models, name):
    path, reference = hf_models[name]
    model = load(path)
    tokens = _tokens()
    ours, theirs = _ours(model, tokens), _hf_logits(reference, tokens)
    assert ours.shape == theirs.shape == (2, 24, VOCAB)
    assert np.abs(theirs).max() > 1.0  # not a trivially small comparison
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral", "llama3"])
def test_export_loads_in_transformers(hf_models, tmp_path, name):
    path, reference = hf_models[name]
    out = save(load(path), tmp_path / "out")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(reference)
    tokens = _tokens(1)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(reference, tokens), atol=1e-5)
    # the tensors themselves are the originals, name for name
    theirs = {k: v.numpy() for k, v in reference.state_dict().items()}
    for key, value in load_file(out / "model.safetensors").items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def test_sharded_checkpoint_with_index(hf_models, tmp_path):
    path, reference = hf_models["llama"]
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = _tokens(2)
    np.testing.assert_allclose(
        _ours(load(sharded), tokens), _hf_logits(reference, tokens), atol=1e-4, rtol=1e-4
    )
    # and our own sharded export, which transformers reads through its index
    out = save(load(sharded), tmp_path / "out", max_shard_bytes=100_000)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
                   .values())) > 2  # fmt: skip
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(reference, tokens), atol=1e-5)


def test_fsdp_load_places_each_tensor_on_its_shards(hf_models):
    path, reference = hf_models["llama"]
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    model = load(path, mesh=mesh, rules="fsdp")
    for x in (model.embedding[...], model.blocks.attn.wqkv[...], model.head[...]):
        assert len(x.addressable_shards) == 8
        assert all(s.data.size * 8 == x.size for s in x.addressable_shards)  # 1/8 each
    tokens = _tokens(3, batch=8)
    with jax.set_mesh(mesh):
        ours = _ours(model, tokens)
    np.testing.assert_allclose(ours, _hf_logits(reference, tokens), atol=1e-4, rtol=1e-4)


def test_load_inside_a_training_runs_mesh_context(hf_models):
    """A summary or callback runs under the run's `jax.set_mesh`: load works there too."""
    path, reference = hf_models["qwen2"]
    with jax.set_mesh(make_mesh(MeshConfig(data=-1))):
        model = load(path)
    tokens = _tokens(4)
    np.testing.assert_allclose(_ours(model, tokens), _hf_logits(reference, tokens), atol=1e-4)


def test_tables_round_trip_exactly():
    """to_hf(to_ours(x)) is x for every entry of every architecture (numpy only)."""
    rng = np.random.default_rng(0)
    for name, make in CONFIGS.items():
        config = make().to_dict()
        kw = model_kwargs(config)
        for entry in hf_tables.tensor_table(hf_tables.architecture(config), kw):
            shapes = [tuple(kw["max_seq_len"] if d is None else d for d in s) for s in entry.shapes]
            arrays = [rng.normal(size=s).astype(np.float32) for s in shapes]
            back = entry.to_hf(entry.to_ours(*arrays))
            for a, b in zip(arrays, back, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {entry.names}")


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def test_errors_are_one_line(hf_models, tmp_path):
    path, _ = hf_models["llama"]

    def refused(error, match, *args, **kwargs):
        with pytest.raises(error, match=match) as info:
            load(*args, **kwargs)
        assert "\n" not in str(info.value)

    refused(FileNotFoundError, "has no config.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 3}))
    refused(ValueError, r"unsupported architecture 'bert'.*GPT-2.*Llama.*Mistral.*Qwen2", tmp_path)

    bad = _copy(path, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    refused(ValueError, r"model\.layers\.1\.self_attn\.k_proj\.weight .* shape \(16, 64\)", bad)

    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.norm.weight"]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    refused(ValueError, r"tensor model\.extra\.weight in model\.safetensors is not part of", bad)
    del tensors["model.extra.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    refused(ValueError, r"2 tensors are missing .*model\.norm\.weight", bad)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never opened")
    refused(ValueError, "convert them to safetensors", pickled)

    big = tmp_path / "big"
    shutil.copytree(path, big)
    (big / "tokenizer.json").write_text(json.dumps(_word_tokenizer(VOCAB + 5)))
    refused(ValueError, r"105 tokens but the model's vocabulary is 100", big)


def test_missing_shard_is_named(hf_models, tmp_path):
    path, reference = hf_models["qwen2"]
    reference.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "s" / gone).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {gone} named in"):
        load(tmp_path / "s")


def test_sliding_window_shorter_than_context_is_refused(hf_models, tmp_path):
    path, reference = hf_models["mistral"]
    config = json.loads((path / "config.json").read_text())
    short = _copy(path, tmp_path)
    (short / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(ValueError, match="sliding_window=16 is shorter than the context 64"):
        load(short)
    model = load(short, max_seq_len=16)  # within the window, the model is exact
    tokens = _tokens(4, length=16)
    np.testing.assert_allclose(_ours(model, tokens), _hf_logits(reference, tokens), atol=1e-4)


def _word_tokenizer(size: int) -> dict:
    """A tokenizer.json (WordLevel) with `size` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return json.loads(tok.to_str())


def test_tokenizer_travels_with_the_model(hf_models, tmp_path):
    path, _ = hf_models["gpt2"]
    src = _copy(path, tmp_path)
    (src / "tokenizer.json").write_text(json.dumps(_word_tokenizer(VOCAB)))
    model = load(src)
    out = save(model, tmp_path / "out")  # the imported model's own tokenizer comes along
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ours = load_tokenizer(out, VOCAB)
    assert ours.encode("w1 w7 w99 zz").ids == [1, 7, 99, 0] == theirs("w1 w7 w99 zz")["input_ids"]
    with pytest.raises(FileExistsError, match="not empty"):
        save(model, out)  # nothing is overwritten
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_model_trained_in_jaxnv_exports_as_llama(tmp_path):
    from flax import nnx

    from jaxnv.models import Transformer

    model = Transformer(VOCAB, num_layers=2, num_heads=4, embed_dim=64, rngs=nnx.Rngs(0))
    out = save(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    tokens = _tokens(5)
    np.testing.assert_allclose(_hf_logits(back, tokens), _ours(model, tokens), atol=1e-4)
    odd = Transformer(VOCAB, num_layers=1, num_heads=4, embed_dim=64, position="learned",
                      rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="norm='rms', mlp='gated'.*GPT-2 checkpoint cannot"):
        save(odd, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import jax
    from jaxnv.hf import load
    from jaxnv.parallel.mesh import MeshConfig, make_mesh

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    # a first load compiles what the loader jits (a layer into its stack, a few MB of compiler
    # memory a shape, whatever the model's size); the second is the measured one
    model = load(sys.argv[1], mesh=mesh)
    del model
    gc.collect()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS")
    model = load(sys.argv[1], mesh=mesh)
    placed = sum(s.data.nbytes for p in jax.tree.leaves(__import__("flax").nnx.state(model))
                 for s in p.addressable_shards)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "placed": placed,
                      "reset": reset}))
    """
)


@pytest.mark.slow
def test_load_memory_peaks_near_one_file(tmp_path):
    """~90 MB of Llama weights in 5 files load under fsdp on 8 devices with host memory above
    the placed weights peaking under 1.5x the largest file."""
    D, F, L, V = 512, 1536, 4, 8192
    config = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                  num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    kw = model_kwargs(config)
    files, weight_map = [[] for _ in range(L + 1)], {}
    for entry in hf_tables.tensor_table("llama", kw):
        layer = int(entry.path[1]) if entry.path[0] == "blocks" else L
        files[layer] += list(zip(entry.names, entry.shapes, strict=True))
    sizes = []
    for i, names in enumerate(files):
        file = f"model-{i + 1:05d}-of-{L + 1:05d}.safetensors"
        tensors = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in names}
        save_file(tensors, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        sizes.append((tmp_path / file).stat().st_size)
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # a fixed mmap threshold: every large buffer is mapped and given back when freed, so the
    # first load's memory cannot be reused unseen by the measured second one
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["reset"], "cannot reset VmHWM here: the measurement would be meaningless"
    # on CPU devices the placed weights are host memory too: what must stay small is the rest
    transient = got["peak"] - got["before"] - got["placed"]
    print(f"files {[s >> 20 for s in sizes]} MiB, transient {transient / 2**20:.1f} MiB")
    assert sum(sizes) > 80 << 20
    assert transient < 1.5 * max(sizes), (transient, max(sizes))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_equals_transformers(hf_models, name):
    from flax import nnx

    from jaxnv.models.generate import generate

    path, reference = hf_models[name]
    graphdef, params, rest = nnx.split(load(path), nnx.Param, ...)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (3, 11, 7)]  # ragged batch
    ours = generate(graphdef, params, prompts, 8, temperature=0.0, model_state=rest)
    for prompt, new in zip(prompts, ours, strict=True):
        ids = torch.from_numpy(prompt[None].astype(np.int64))
        with torch.no_grad():
            mask = torch.ones_like(ids)
            out = reference.generate(
                ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                attention_mask=mask,
            )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(new), out[0, len(prompt) :].numpy())


def test_bfloat16_in_and_out(hf_models, tmp_path):
    path, reference = hf_models["qwen2"]
    model = load(path, dtype="bfloat16")
    assert model.blocks.attn.bqkv[...].dtype == jnp.bfloat16
    out = save(model, tmp_path / "bf16")
    theirs = {k: v.to(torch.bfloat16).float().numpy() for k, v in reference.state_dict().items()}
    written = load_file(out / "model.safetensors")
    assert {str(x.dtype) for x in written.values()} == {"bfloat16"}
    for key, value in written.items():
        np.testing.assert_array_equal(value.astype(np.float32), theirs[key], err_msg=key)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(7)
    np.testing.assert_allclose(_ours(load(out), tokens), _hf_logits(back, tokens), atol=1e-4)
