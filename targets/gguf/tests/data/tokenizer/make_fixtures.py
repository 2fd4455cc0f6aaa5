#!/usr/bin/env python3
"""Regenerate the tokenizer test fixtures and the reference KVs (run by hand; tests only read the output).

    VENV=/root/.cache/sling-lab/venv LLAMA_CPP_DIR=/root/.cache/sling-lab/llama.cpp \
        $VENV/bin/python targets/gguf/tests/data/tokenizer/make_fixtures.py [--only NAME]

Each fixture is a model directory (config.json + tokenizer files). For each, the pinned reference converter
(convert_hf_to_gguf.py --vocab-only, through shared/oracles/convert_compat.py so an unknown chkhsh maps to
"gpt-2") is run and the `tokenizer.*` KVs of its output are stored, in file order, in <dir>/expected_kvs.json:
    [{"key": K, "type": "STRING"|"UINT32"|"BOOL"|"ARRAY"|..., "elem": ELEM_TYPE (arrays),
      "value": V (scalars and arrays up to 4096 elements) or "len": N + "sha256": H (bigger arrays)}]
The sha256 of an array is over its elements, each serialized as `repr`-free canonical JSON, one per line.
`python make_fixtures.py --dump-only DIR` dumps an existing directory (used for the generated gpt-2 fixture).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", "/root/.cache/sling-lab/llama.cpp"))
COMPAT = Path(os.environ.get("COMPAT", "/work/shared/oracles/convert_compat.py"))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159 ++ -- == != <= >=",
    "Mixture-of-Experts models route each token to a few experts; llama.cpp, vLLM and MLX run them.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.",
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense.",
    "Readability counts. Special cases aren't special enough to break the rules.",
    "Although practicality beats purity. Errors should never pass silently.",
    "In the face of ambiguity, refuse the temptation to guess. Now is better than never.",
    "def main():\n    return 0\n\nif __name__ == '__main__':\n    main()\n",
    "Привет мир! 你好，世界！ こんにちは 🚀 café naïve résumé",
] * 30


def qwen2moe_config(vocab: int, **extra):
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": vocab,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    cfg.update(extra)
    return cfg


def mixtral_config(vocab: int, **extra):
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "num_local_experts": 4,
           "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False}
    cfg.update(extra)
    return cfg


def build_tiny_bpe(vocab_size=512):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # extra added tokens: a non-special one (USER_DEFINED), a non-special one that looks special (CONTROL),
    # and a non-special one that is a normalized=True token
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("<|tool|>", special=False, normalized=False),
                    AddedToken(" hello world", special=False, normalized=True)])
    return tok


def write_json(p: Path, obj):
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_fast(tok, out: Path, **kw):
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=4096, **kw)
    fast.save_pretrained(str(out))
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


def make_tiny(out_root: Path):
    tok = build_tiny_bpe(512)
    n = tok.get_vocab_size()
    # 1. Qwen2-MoE style (gpt2 vocab), config vocab larger than the tokenizer's -> [PAD{i}] holes
    d = out_root / "qwen2moe_tiny"
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    cfg = save_fast(tok, d, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    write_json(d / "tokenizer_config.json", cfg)
    write_json(d / "config.json", qwen2moe_config(n + 13, bos_token_id=0, eos_token_id=2))
    # 2. Mixtral (llama style) with only tokenizer.json (byte-level BPE): which path does the reference take?
    d = out_root / "mixtral_tiny"
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    cfg = save_fast(tok, d, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None)
    cfg["add_prefix_space"] = False
    write_json(d / "tokenizer_config.json", cfg)
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    write_json(d / "config.json", mixtral_config(n, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    return n


def train_spm(out: Path) -> Path:
    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as td:
        corpus = Path(td) / "c.txt"
        corpus.write_text("\n".join(CORPUS), encoding="utf-8")
        prefix = Path(td) / "m"
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=420,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                       user_defined_symbols=["<tool>"], control_symbols=["<ctl>"],
                                       minloglevel=2, normalization_rule_name="identity")
        dst = out / "tokenizer.model"
        shutil.copy(str(prefix) + ".model", dst)
    return dst


def make_spm(out_root: Path):
    # 3. Mixtral with tokenizer.model (SentencePiece) + added tokens
    d = out_root / "mixtral_spm"
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    train_spm(d)
    write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_prefix_space": True, "tokenizer_class": "LlamaTokenizer",
        "chat_template": [{"name": "default", "template": CHAT_TEMPLATE}, {"name": "tool_use", "template": "{{ tools }}"}],
        "added_tokens_decoder": {
            "0": {"content": "<unk>", "special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
            "1": {"content": "<s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
            "2": {"content": "</s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
            "420": {"content": "[INST]", "special": False, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
            "421": {"content": "\u2581end\u2581", "special": False, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
        }})
    write_json(d / "added_tokens.json", {"[INST]": 420, "[/INST]": 422, "<s>": 1})
    write_json(d / "config.json", mixtral_config(424, bos_token_id=1, eos_token_id=2))


def make_llama_hf(out_root: Path):
    # 4. Mixtral with only a Llama-style tokenizer.json (BPE + byte_fallback, decoder Sequence): LlamaHfVocab
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    d = out_root / "mixtral_hf"
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_tokens([AddedToken("[TOOL_CALLS]", special=True, normalized=False),
                    AddedToken("<extra>", special=False, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE})
    write_json(d / "config.json", mixtral_config(tok.get_vocab_size(), bos_token_id=1, eos_token_id=2))


# ------------------------------------------------------------------------------------------------------
def canon(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def dump_kvs(gguf_path: Path):
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    import gguf
    r = gguf.GGUFReader(str(gguf_path))
    out = []
    for f in r.fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        t = gguf.GGUFValueType(f.types[0])
        e = {"key": f.name, "type": t.name}
        val = f.contents()
        if t == gguf.GGUFValueType.ARRAY:
            e["elem"] = gguf.GGUFValueType(f.types[1]).name if len(f.types) > 1 else None
            if e["elem"] in ("FLOAT32", "FLOAT64"):
                val = [float(x) for x in val]
            if len(val) <= 4096:
                e["value"] = val
            else:
                e["len"] = len(val)
                e["sha256"] = hashlib.sha256("".join(canon(x) + "\n" for x in val).encode()).hexdigest()
        else:
            e["value"] = float(val) if t in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64) else val
        out.append(e)
    return out


def run_reference(d: Path, use_compat: bool, allow_fail: bool = False):
    with tempfile.TemporaryDirectory() as td:
        outf = Path(td) / "vocab.gguf"
        script = str(COMPAT) if use_compat else str(LLAMA_CPP / "convert_hf_to_gguf.py")
        env = dict(os.environ, LLAMA_CPP_DIR=str(LLAMA_CPP))
        cmd = [sys.executable, script, str(d), "--vocab-only", "--outfile", str(outf)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0 and allow_fail:
            return None, (p.stdout + p.stderr)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-6000:])
            raise SystemExit(f"reference converter failed on {d}")
        log = (p.stdout + p.stderr)
        kvs = dump_kvs(outf)
    return kvs, log


# ------------------------------------------------------------------------------------------------------
# Variants for differential testing (not committed): `--variants DIR` writes one model directory per case with
# the reference's expected_kvs.json; `SLING_TOKENIZER_DIRS=DIR/* cargo test -p sling-target-gguf --test
# tokenizer_vocab -- --ignored external_dirs` compares sling with them.
def make_variants(out_root: Path):
    base = HERE / "qwen2moe_tiny"
    tj0 = json.loads((base / "tokenizer.json").read_text())
    tc0 = json.loads((base / "tokenizer_config.json").read_text())
    n = len(tj0["model"]["vocab"])

    def mk(name, tj=None, tc=None, cfg=None, files=None, style="gpt2"):
        d = out_root / name
        shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
        write_json(d / "tokenizer.json", tj if tj is not None else tj0)
        if tc is not False:
            write_json(d / "tokenizer_config.json", tc if tc is not None else tc0)
        write_json(d / "config.json", cfg if cfg is not None else qwen2moe_config(n + 13, bos_token_id=0, eos_token_id=2))
        for fname, content in (files or {}).items():
            (d / fname).parent.mkdir(parents=True, exist_ok=True)
            (d / fname).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
        (d / "style.txt").write_text(style)

    def tj_with(**kw):
        t = json.loads(json.dumps(tj0)); t.update(kw); return t

    def added(content, special=True, normalized=False):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False,
                "normalized": normalized, "single_word": False, "special": special}

    # deepseek-like: BOS via TemplateProcessing and add_bos_token, AddedToken dicts, LlamaTokenizerFast class
    tp = {"type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    mk("v_deepseek_like", tj=tj_with(post_processor=tp),
       tc={"add_bos_token": True, "add_eos_token": False, "bos_token": added("<|endoftext|>"),
           "eos_token": added("<|im_end|>"), "pad_token": added("<|endoftext|>"), "legacy": True,
           "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 4096, "clean_up_tokenization_spaces": False,
           "chat_template": CHAT_TEMPLATE})
    # no tokenizer_config.json at all (chat_template.jinja is then ignored by SpecialVocab)
    mk("v_no_config", tc=False, files={"chat_template.jinja": CHAT_TEMPLATE})
    # legacy special_tokens_map.json; <|im_end|> only in the model vocab (not an added token)
    t = json.loads(json.dumps(tj0)); t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<|im_end|>"]
    t["model"]["vocab"]["<|im_end|>"] = 2
    mk("v_legacy_stm", tj=t, tc={"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                                 "add_bos_token": False},
       files={"special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>",
              "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}},
              "chat_template.json": {"chat_template": "{{ json_template }}"}})
    # RobertaProcessing + BertNormalizer(lowercase)
    rp = {"type": "RobertaProcessing", "sep": ["<|im_end|>", 2], "cls": ["<|endoftext|>", 0], "trim_offsets": True,
          "add_prefix_space": False}
    mk("v_roberta_bert_norm", tj=tj_with(post_processor=rp, normalizer={"type": "BertNormalizer", "clean_text": True,
       "handle_chinese_chars": True, "strip_accents": None, "lowercase": True}),
       tc={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    # old-style string merges; and no merges in tokenizer.json but a merges.txt
    t = json.loads(json.dumps(tj0)); t["model"]["merges"] = [" ".join(m) for m in t["model"]["merges"]]
    mk("v_string_merges", tj=t, tc={**tc0, "normalizer_note": 1})
    t2 = json.loads(json.dumps(tj0)); merges = t2["model"]["merges"]; t2["model"]["merges"] = []
    mk("v_merges_txt", tj=t2, files={"merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\nbad line here\n"})
    # TemplateProcessing with a trailing special that is not eos -> eot bookkeeping; Sequence normalizer flags
    tp2 = {"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                    {"SpecialToken": {"id": "<|im_end|>", "type_id": 1}}],
           "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                              "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]},
                              "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    mk("v_eot_template", tj=tj_with(post_processor=tp2, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Lowercase"}, {"type": "StripAccents"}]}),
       tc={"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "sep_token": "<|endoftext|>"},
       cfg=qwen2moe_config(n + 3, eot_token_id=1, text_config={"eos_token_id": 2}))
    # extra special tokens (new content -> new added token) + model-specific *_token + decoder-only token
    mk("v_extra_specials", tc={**tc0, "extra_special_tokens": ["<|new_extra|>", "<|im_start|>"], "image_token": "<image>",
                               "added_tokens_decoder": {**tc0.get("added_tokens_decoder", {}),
                                                        "600": {"content": "<only_in_config>", "special": False,
                                                                "normalized": False, "lstrip": False, "rstrip": False,
                                                                "single_word": False}}},
       cfg=qwen2moe_config(n + 13, bos_token_id=0, eos_token_id=2))
    # Llama style: CodeLlama vocab 32016 (infill ids, re-added keys), Granite small vocab 49152
    tcl = {**tc0, "add_prefix_space": True, "add_eos_token": True, "bos_token": "<|im_start|>"}
    mk("v_codellama_32016", tc=tcl, cfg=mixtral_config(32016, bos_token_id=1, eos_token_id=2), style="llama")
    mk("v_granite_49152", tc=tcl, cfg=mixtral_config(49152, bos_token_id=1, eos_token_id=2), style="llama")
    # named chat templates with odd names, a duplicate and a non-default without template
    mk("v_named_templates", tc={**tc0, "chat_template": [{"name": "default", "template": "D"},
       {"name": "tool use!", "template": "T"}, {"name": "rag", "template": "R"}, {"name": "rag", "template": "R2"}, {"name": "", "template": "nameless"}]})
    # Llama style with a SentencePiece model and config vocab larger than the model (PAD fill) + pad_token_id
    d = out_root / "v_spm_pad"
    shutil.rmtree(d, ignore_errors=True); shutil.copytree(HERE / "mixtral_spm", d)
    (d / "expected_kvs.json").unlink(); (d / "reference.log").unlink(missing_ok=True)
    write_json(d / "config.json", mixtral_config(440, bos_token_id=1, eos_token_id=2, pad_token_id=430))
    (d / "style.txt").write_text("llama")

    # a reference failure: config vocab_size smaller than the tokenizer's ids
    mk("v_err_small_vocab", cfg=qwen2moe_config(100))
    for d in sorted(p for p in out_root.iterdir() if p.is_dir()):
        kvs, log = run_reference(d, use_compat=True, allow_fail=True)
        write_markers(d, kvs, log)
        print(d.name, "reference failed" if kvs is None else f"{len(kvs)} KVs")


def write_markers(d: Path, kvs, log: str):
    """expected_kvs.json (or expected_error.txt), pre.txt and chkhsh.txt for the `external_dirs` test."""
    import re
    if kvs is None:
        (d / "expected_error.txt").write_text(log.strip().splitlines()[-1] + "\n")
        return
    write_json(d / "expected_kvs.json", kvs)
    (d / "pre.txt").write_text("gpt-2" if "convert_compat: unknown chkhsh" in log else "")
    if m := re.search(r"chkhsh:\s+([0-9a-f]{64})", log):
        (d / "chkhsh.txt").write_text(m.group(1) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--dump-only", default="", help="only run the reference on this dir and write expected_kvs.json")
    ap.add_argument("--no-compat", action="store_true")
    ap.add_argument("--variants", default="", help="write the differential-test variants to this directory")
    args = ap.parse_args()
    if args.variants:
        Path(args.variants).mkdir(parents=True, exist_ok=True)
        make_variants(Path(args.variants))
        return
    if args.dump_only:
        d = Path(args.dump_only)
        kvs, log = run_reference(d, use_compat=not args.no_compat, allow_fail=True)
        write_markers(d, kvs, log)
        print(d.name, "reference failed" if kvs is None else f"{len(kvs)} KVs")
        return
    makers = {"tiny": make_tiny, "spm": make_spm, "llama_hf": make_llama_hf}
    for name, mk in makers.items():
        if args.only and name not in args.only.split(","):
            continue
        mk(HERE)
    for d in sorted(p for p in HERE.iterdir() if p.is_dir()):
        if args.only and not any(k in d.name for k in args.only.split(",")):
            pass
        kvs, log = run_reference(d, use_compat=True)
        write_json(d / "expected_kvs.json", kvs)
        (d / "reference.log").write_text("\n".join(l for l in log.splitlines() if "tokenizer" in l.lower()
                                                   or "vocab" in l.lower() or "chkhsh" in l.lower()
                                                   or "WARNING" in l) + "\n")
        print(d.name, len(kvs), "KVs")


if __name__ == "__main__":
    main()
