#!/usr/bin/env python3
"""Makes the SentencePiece tokenizer fixture: trains a small BPE SentencePiece model (byte
fallback on, so characters outside the vocabulary become <0xXX> tokens), writes it as vocab-only
`llama` GGUF files (one with add_space_prefix true, one false, as Gemma vocabularies are), and
records llama.cpp's token ids and detokenized text for a list of tricky strings.

    pip install sentencepiece gguf llama-cpp-python==0.3.36   # llama.cpp build: see ../shared/tools
    python3 tests/tools/make_spm_fixture.py tests/data

Writes spm-prefix.gguf, spm-noprefix.gguf and spm-tokens.json into the given folder.
"""
import ctypes
import json
import os
import sys
import tempfile

import gguf
import llama_cpp
import sentencepiece as spm

CORPUS = """The river flows past the old mill, and the miller counts his sacks of grain.
Rivers in Europe: the Danube, the Rhine, the Elbe, the Loire and the Thames.
She said: "It's late; we'll leave at 7:30 tomorrow." He didn't answer.
def square(x):
    return x * x  # the square of x
for (int i = 0; i < 10; i++) { total += values[i]; }
Weights are stored in blocks of 32 values with one scale per block.
A mixture of experts routes every token to six of one hundred and twenty-eight experts.
Thinking tokens come before the answer, and a budget limits how many there are.
Die Straße ist lang. Les élèves étudient. El niño come manzanas.
""" * 20

CASES = [
    "",
    " ",
    "Hello world",
    "Hello, world!",
    "  two leading spaces",
    "trailing space ",
    "tabs\tand\nnewlines\n\n",
    "Größe Übung straße café naïve",
    "東京は日本の首都です。",
    "🚀🙂👍🏽 emoji",
    "1234567 3.14159 -42 1e10",
    'fn main() {\n    println!("{}", x);\n}',
    "def f(x):\n\treturn x**2  # square",
    "<s>hello</s> world",
    "<think>\nplan\n</think>answer",
    "don't won't it's we'll they've I'm",
    "the river flows past the mill",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "   \n   \n",
    "Mixture-of-Experts = 128 experts, 6 active",
    "Ünïcödé — “quotes” ‘single’ … ellipsis",
    "x=1;y=2;z=x+y",
    "<unk> and <0x41> written as text",
]

USER_DEFINED = ["<think>", "</think>"]


def train(folder):
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(CORPUS)
    prefix = os.path.join(folder, "spm")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=850,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        user_defined_symbols=USER_DEFINED,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_gguf(sp, path, add_space_prefix):
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("spm tokenizer fixture")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece.encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif piece in USER_DEFINED:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def detokenize(llm, ids):
    """llama_detokenize (the whole-sequence decode, which drops the prefix space)."""
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    buf = ctypes.create_string_buffer(4096)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, True)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8", "replace")


def golden(path):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    out = []
    for text in CASES:
        special = llm.tokenize(text.encode(), add_bos=True, special=True)
        plain = llm.tokenize(text.encode(), add_bos=True, special=False)
        pieces = llm.detokenize(special[1:], special=True).decode("utf-8", "replace")
        out.append(
            {
                "text": text,
                "ids_special": special,
                "ids_plain": plain,
                "pieces_special": pieces,
                "detok_special": detokenize(llm, special[1:]),
            }
        )
    return out


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train(tmp)
        models = {}
        for name, prefix in [("spm-prefix", True), ("spm-noprefix", False)]:
            path = os.path.join(out_dir, name + ".gguf")
            write_gguf(sp, path, prefix)
            models[name] = {"file": name + ".gguf", "add_bos": True, "cases": golden(path)}
    note = (
        f"ids from llama.cpp (llama-cpp-python {llama_cpp.__version__}) with add_bos=True; "
        "ids_special parses special tokens in the text, ids_plain does not; pieces_special is "
        "the concatenated pieces of ids_special without the BOS (token_to_piece), detok_special "
        "its whole-sequence llama_detokenize. Made by "
        "tests/tools/make_spm_fixture.py."
    )
    with open(os.path.join(out_dir, "spm-tokens.json"), "w") as f:
        json.dump({"note": note, "models": models}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
