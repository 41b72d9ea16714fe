"""A tiny random-weight llama-architecture GGUF that llama.cpp really loads and runs.

Written with the `gguf` package; the tokenizer (SentencePiece llama vocabulary) is
copied from llama.cpp's own models/ggml-vocab-llama-spm.gguf, so prompts tokenize
and generated ids detokenize. Weights are seeded random: the text is nonsense, but
every layer of a real forward pass runs.
"""
from __future__ import annotations

from pathlib import Path

VOCAB_FILE = "models/ggml-vocab-llama-spm.gguf"

# Small, but with the shapes a real llama has (GQA: 4 query heads share 2 kv heads).
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
N_CTX = 256


def _copy_tokenizer(reader, writer) -> int:
    """Copy every tokenizer.* key of the vocab file; returns the vocabulary size."""
    import gguf

    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            if field.name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
            writer.add_array(field.name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], vtype)
    return n_vocab


def write_tiny_llama(path: Path, vocab_gguf: Path, seed: int = 0) -> Path:
    """Write the model to `path` using the vocabulary of `vocab_gguf`; returns `path`."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(vocab_gguf))
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("pylmserv-tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_vocab = _copy_tokenizer(reader, writer)
    writer.add_vocab_size(n_vocab)

    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # numpy shape (rows=out, cols=in); gguf stores it as ne = [in, out] as llama.cpp expects.
    writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD, scale=0.5))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", w(n_vocab, N_EMBD, scale=0.5))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(p + "attn_k.weight", w(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(p + "attn_v.weight", w(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(p + "attn_output.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_down.weight", w(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(directory: Path, llama_source: Path) -> Path:
    """The tiny model in `directory`, vocabulary from the llama.cpp tree at `llama_source`."""
    return write_tiny_llama(Path(directory) / "tiny-llama.gguf", Path(llama_source) / VOCAB_FILE)
