"""Write damaged copies of a GGUF model, one per case, for tests/bad_model_input.rs.

    damage_gguf.py SOURCE.gguf OUT_DIR

Each case is OUT_DIR/<case>.gguf. Fixed-size values (counts, ids, dims,
offsets, lengths) are edited in place through the `gguf` reader's memory map
(GGUFReader(path, "r+")): one working copy is opened once, each edit is made,
flushed, copied out and undone. Changes of structure (an array of another
length, a tensor left out) are new files written with GGUFWriter. The names
of the cases written are printed, one a line.
"""

import contextlib
import os
import shutil
import sys

import gguf
import numpy as np


@contextlib.contextmanager
def patched(reader, part, value, index=0):
    """`part[index] = value` in the mapped file, undone on exit."""
    old = part[index].copy()
    part[index] = value
    reader.data.flush()
    try:
        yield
    finally:
        part[index] = old
        reader.data.flush()


def value_part(reader, key):
    """The memory-mapped numpy part holding a scalar field's value."""
    field = reader.fields[key]
    return field.parts[field.data[0]]


def tensor_field(reader, name):
    return next(t for t in reader.tensors if t.name == name).field


def rewrite(reader, out, fields=None, drop_tensor=None):
    """A new file through GGUFWriter: `reader`'s metadata with `fields`
    (key -> (value, type, sub_type)) replacing or adding values, and every
    tensor except `drop_tensor`."""
    fields = dict(fields or {})
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        value, val_type, sub_type = fields.pop(field.name, (field.contents(), val_type, sub_type))
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    for key, (value, val_type, sub_type) in fields.items():
        writer.add_key_value(key, value, val_type, sub_type=sub_type)
    tensors = [t for t in reader.tensors if t.name != drop_tensor]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def main():
    source, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, ".work.gguf")
    shutil.copyfile(source, work)
    reader = gguf.GGUFReader(work, "r+")
    arch = reader.fields["general.architecture"].contents()
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    written = []

    def copy_as(case):
        shutil.copyfile(work, os.path.join(out_dir, case + ".gguf"))
        written.append(case)

    # Fixed-size values, edited in place.
    in_place = {
        "head_count_zero": (f"{arch}.attention.head_count", 0),
        "head_count_absurd": (f"{arch}.attention.head_count", 1 << 30),
        # 3 heads of 192 (rotary over all 192) divide the embedding but
        # disagree with attn_k's rows.
        "head_count_disagrees_with_tensors": [(f"{arch}.attention.head_count", 3), (f"{arch}.rope.dimension_count", 192)],
        "head_count_kv_zero": (f"{arch}.attention.head_count_kv", 0),
        "head_count_kv_not_dividing": (f"{arch}.attention.head_count_kv", 4),
        "embedding_length_zero": (f"{arch}.embedding_length", 0),
        "feed_forward_length_zero": (f"{arch}.feed_forward_length", 0),
        "block_count_zero": (f"{arch}.block_count", 0),
        "block_count_past_layers": (f"{arch}.block_count", 31),
        "rope_dimension_count_wrong": (f"{arch}.rope.dimension_count", 32),
        "vocab_size_wrong": (f"{arch}.vocab_size", n_tokens + 7),
        "bos_out_of_range": ("tokenizer.ggml.bos_token_id", n_tokens),
        "eos_out_of_range": ("tokenizer.ggml.eos_token_id", 0xFFFFFFFF),
        "tensor_count_absurd": ("GGUF.tensor_count", 1 << 60),
    }
    for case, edits in in_place.items():
        with contextlib.ExitStack() as stack:
            for key, value in edits if isinstance(edits, list) else [edits]:
                stack.enter_context(patched(reader, value_part(reader, key), value))
            copy_as(case)

    # Tensor infos: parts are name length, name, dimension count, dims, type, offset.
    with patched(reader, tensor_field(reader, "blk.3.ffn_up.weight").parts[3], 0, index=1):
        copy_as("tensor_dim_zero")
    with patched(reader, tensor_field(reader, "blk.10.attn_q.weight").parts[5], 1 << 40):
        copy_as("tensor_offset_past_end")
    # blk.7.attn_k.weight renamed blk.7.attn_x.weight (same length).
    name = tensor_field(reader, "blk.7.attn_k.weight").parts[1]
    with patched(reader, name, ord("x"), index=len("blk.7.attn_")):
        copy_as("tensor_renamed")
    # Lengths: general.name's string and the tokens array claim 2^60 entries.
    with patched(reader, reader.fields["general.name"].parts[3], 1 << 60):
        copy_as("string_length_absurd")
    with patched(reader, reader.fields["tokenizer.ggml.tokens"].parts[4], 1 << 60):
        copy_as("array_length_absurd")

    # Structural changes, written anew.
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    A, S, I = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    rewrite(reader, os.path.join(out_dir, "token_type_longer.gguf"),
            fields={"tokenizer.ggml.token_type": (types + [1], A, I)})
    written.append("token_type_longer")
    rewrite(reader, os.path.join(out_dir, "tokens_shorter.gguf"),
            fields={"tokenizer.ggml.tokens": (tokens[:-1], A, S)})
    written.append("tokens_shorter")
    rewrite(reader, os.path.join(out_dir, "output_norm_missing.gguf"), drop_tensor="output_norm.weight")
    written.append("output_norm_missing")

    # The data cut off part way through the tensors.
    size = os.path.getsize(source)
    with open(source, "rb") as src, open(os.path.join(out_dir, "truncated.gguf"), "wb") as dst:
        dst.write(src.read(size * 6 // 10))
    written.append("truncated")

    del reader
    os.remove(work)
    print("\n".join(written))


if __name__ == "__main__":
    main()
