"""Hugging Face checkpoints in and out (GPT-2, Llama, Mistral, Qwen2).

    from jaxnv.hf import load, save
    model = load("path/to/hf_dir")                 # logits[..., :vocab] equal transformers'
    save(model, "out_dir")                         # transformers loads it back

See `jaxnv.checkpoint.hf` (reading, placement, writing) and `jaxnv.checkpoint.hf_tables` (config
translation and the per-architecture tensor tables).
"""

from jaxnv.checkpoint.hf import export_kwargs, load, load_tokenizer, save
from jaxnv.checkpoint.hf_tables import ARCHITECTURES, model_kwargs

__all__ = ["ARCHITECTURES", "export_kwargs", "load", "load_tokenizer", "model_kwargs", "save"]
