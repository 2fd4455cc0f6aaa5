//! Tokenizer → GGUF metadata (`sling_target_gguf::tokenizer`) against the pinned reference converter.
//!
//! * `reference`: the fixture directories under `tests/data/tokenizer/` (made by `make_fixtures.py` there, which
//!   also ran `convert_hf_to_gguf.py --vocab-only` on each and stored the `tokenizer.*` KVs in
//!   `expected_kvs.json`): values, types and order must match exactly.
//! * `gguf_vocab`: real GPT-2 / Qwen2 tokenizers rebuilt at test time from llama.cpp's
//!   `models/ggml-vocab-*.gguf` (too big to commit); checks the chkhsh detection and the KVs against digests
//!   produced by the reference. Skipped (with a message) when the llama.cpp tree is not on this machine.
//! * `errors`: missing / malformed files, unknown chkhsh, bad `--tokenizer-pre`, holes and duplicates.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sling_formats::gguf::{GgufValue, ValueType};
use sling_target_gguf::tokenizer::{check_vocab, chkhsh, vocab_kvs, TokenizerError, VocabOptions, VocabStyle};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "ARRAY",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    }
}

/// A scalar as `gguf.GGUFReader(...).contents()` gives it, as JSON.
fn scalar_json(v: &GgufValue) -> Value {
    match v {
        GgufValue::String(s) => json!(s),
        GgufValue::Bool(b) => json!(b),
        GgufValue::F32(x) => json!(f64::from(*x)),
        GgufValue::F64(x) => json!(x),
        other => match other.as_u64() {
            Some(u) => json!(u),
            None => match other {
                GgufValue::I8(x) => json!(x),
                GgufValue::I16(x) => json!(x),
                GgufValue::I32(x) => json!(x),
                GgufValue::I64(x) => json!(x),
                _ => panic!("nested array"),
            },
        },
    }
}

/// Python `json.dumps(x, ensure_ascii=False, separators=(",", ":"))` for a string or number.
fn canon(v: &Value) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// Compares sling's KVs with the reference's `expected_kvs.json` form; panics with the first difference.
fn assert_matches_reference(got: &[(String, GgufValue)], expected: &Value, what: &str) {
    let exp = expected.as_array().expect("expected_kvs.json is a list");
    let got_keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    let exp_keys: Vec<&str> = exp.iter().map(|e| e["key"].as_str().expect("key")).collect();
    assert_eq!(got_keys, exp_keys, "{what}: KV keys/order differ");
    for ((key, v), e) in got.iter().zip(exp) {
        assert_eq!(type_name(v.value_type()), e["type"].as_str().expect("type"), "{what}: type of {key}");
        match v {
            GgufValue::Array(elem, items) => {
                assert_eq!(type_name(*elem), e["elem"].as_str().expect("elem"), "{what}: element type of {key}");
                let mut items: Vec<Value> = items.iter().map(scalar_json).collect();
                if let Some(values) = e.get("value") {
                    let mut values = values.as_array().expect("array value").clone();
                    if key == "tokenizer.chat_templates" {
                        // a Python set in the reference: its order depends on PYTHONHASHSEED
                        let by_str = |a: &Value, b: &Value| a.to_string().cmp(&b.to_string());
                        items.sort_by(by_str);
                        values.sort_by(by_str);
                    }
                    assert_eq!(items.len(), values.len(), "{what}: length of {key}");
                    for (i, (a, b)) in items.iter().zip(&values).enumerate() {
                        assert_eq!(a, b, "{what}: {key}[{i}]");
                    }
                } else {
                    assert_eq!(items.len() as u64, e["len"].as_u64().expect("len"), "{what}: length of {key}");
                    let mut h = Sha256::new();
                    for x in &items {
                        h.update(canon(x).as_bytes());
                        h.update(b"\n");
                    }
                    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(digest, e["sha256"].as_str().expect("sha256"), "{what}: digest of {key}");
                }
            }
            other => assert_eq!(scalar_json(other), e["value"], "{what}: value of {key}"),
        }
    }
}

fn run_fixture(name: &str, style: VocabStyle, pre: Option<&str>) -> Vec<(String, GgufValue)> {
    let dir = data_dir().join(name);
    let config = read_json(&dir.join("config.json"));
    let opts = VocabOptions { pre_override: pre.map(str::to_string) };
    let kvs = vocab_kvs(&dir, &config, style, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_matches_reference(&kvs, &read_json(&dir.join("expected_kvs.json")), name);
    check_vocab(&dir, &config, style, &opts).expect("check_vocab agrees with vocab_kvs");
    kvs
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
        }
    }
}

mod reference {
    use super::*;

    /// gpt2 path, Qwen2-MoE config: tiny byte-level BPE whose chkhsh is unknown (the reference ran through
    /// convert_compat.py, i.e. pre "gpt-2"); config vocab_size 528 > 515 tokens → [PAD515]..[PAD527];
    /// added tokens: special (CONTROL), non-special (USER_DEFINED), non-special but `<|…|>` (CONTROL),
    /// normalized=True (no encode/decode round trip); chat_template and add_bos_token from tokenizer_config.
    #[test]
    fn qwen2moe_tiny_gpt2() {
        let kvs = run_fixture("qwen2moe_tiny", VocabStyle::Gpt2, Some("gpt-2"));
        let tokens = match &kvs[2].1 {
            GgufValue::Array(_, t) => t,
            _ => panic!("tokens"),
        };
        assert_eq!(tokens.len(), 528);
        assert_eq!(tokens[527].as_str(), Some("[PAD527]"));
    }

    /// Llama style (MixtralForCausalLM) with only a byte-level tokenizer.json: the reference's LlamaHfVocab
    /// refuses it (no byte_fallback → FileNotFoundError) and falls back to gpt2; add_prefix_space → first KV;
    /// chat template from chat_template.jinja.
    #[test]
    fn mixtral_tiny_falls_back_to_gpt2() {
        let kvs = run_fixture("mixtral_tiny", VocabStyle::Llama, Some("gpt-2"));
        assert_eq!(kvs[0].0, "tokenizer.ggml.add_space_prefix");
        assert_eq!(kvs[1].1, GgufValue::String("gpt2".into()));
    }

    /// Llama style with a Llama-like tokenizer.json (BPE + byte_fallback, decoder Sequence): LlamaHfVocab.
    #[test]
    fn mixtral_hf_llama_hf_vocab() {
        let kvs = run_fixture("mixtral_hf", VocabStyle::Llama, None);
        assert_eq!(kvs[0].1, GgufValue::String("llama".into()));
    }

    /// Llama style with a SentencePiece tokenizer.model (+ added_tokens.json, added_tokens_decoder, a named
    /// chat-template list).
    #[test]
    fn mixtral_spm_sentencepiece() {
        let kvs = run_fixture("mixtral_spm", VocabStyle::Llama, None);
        assert_eq!(kvs[1].1, GgufValue::String("llama".into()));
    }

    /// `SpmOrGpt2` (dense Qwen2, DeepSeek v1): SentencePiece when tokenizer.model exists (the same KVs as the
    /// Llama style minus its leading add_space_prefix), else gpt2.
    #[test]
    fn spm_or_gpt2() {
        let dir = data_dir().join("mixtral_spm");
        let config = read_json(&dir.join("config.json"));
        let kvs = vocab_kvs(&dir, &config, VocabStyle::SpmOrGpt2, &VocabOptions::default()).expect("spm");
        let mut exp = read_json(&dir.join("expected_kvs.json"));
        let exp_list = exp.as_array_mut().expect("list");
        assert_eq!(exp_list.remove(0)["key"], "tokenizer.ggml.add_space_prefix");
        assert_matches_reference(&kvs, &exp, "mixtral_spm as SpmOrGpt2");
        let dir = data_dir().join("qwen2moe_tiny");
        let config = read_json(&dir.join("config.json"));
        let opts = VocabOptions { pre_override: Some("gpt-2".into()) };
        let kvs = vocab_kvs(&dir, &config, VocabStyle::SpmOrGpt2, &opts).expect("gpt2");
        assert_matches_reference(&kvs, &read_json(&dir.join("expected_kvs.json")), "qwen2moe_tiny as SpmOrGpt2");
    }

    /// The pre override is ignored by the non-BPE paths (they always write "default"), as in the reference.
    #[test]
    fn override_does_not_touch_spm_pre() {
        run_fixture("mixtral_spm", VocabStyle::Llama, Some("qwen2"));
    }
}

/// Differential check on directories made elsewhere (`make_fixtures.py --variants DIR`, or real model
/// directories with an `expected_kvs.json` from the reference): `SLING_TOKENIZER_DIRS=d1:d2:...`. Each directory
/// may hold `style.txt` (`gpt2`/`llama`/`spm`, default `gpt2`), `pre.txt` (the --tokenizer-pre to pass, when the
/// reference ran through convert_compat.py), `chkhsh.txt` (the hash the reference logged) and
/// `expected_error.txt` (the reference failed).
#[test]
#[ignore = "needs SLING_TOKENIZER_DIRS"]
fn external_dirs() {
    let dirs = std::env::var("SLING_TOKENIZER_DIRS").unwrap_or_default();
    let mut failures = Vec::new();
    for d in dirs.split(':').filter(|s| !s.is_empty()) {
        let dir = Path::new(d);
        let style = match std::fs::read_to_string(dir.join("style.txt")).unwrap_or_default().trim() {
            "llama" => VocabStyle::Llama,
            "spm" => VocabStyle::SpmOrGpt2,
            _ => VocabStyle::Gpt2,
        };
        let pre =
            std::fs::read_to_string(dir.join("pre.txt")).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let config = read_json(&dir.join("config.json"));
        if let Ok(h) = std::fs::read_to_string(dir.join("chkhsh.txt")) {
            match chkhsh(dir) {
                Ok(got) if got == h.trim() => {}
                other => {
                    eprintln!("{d}: chkhsh {other:?}, the reference computed {}", h.trim());
                    failures.push(d.to_string());
                }
            }
        }
        let got = vocab_kvs(dir, &config, style, &VocabOptions { pre_override: pre });
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match (&got, dir.join("expected_error.txt").is_file()) {
                (Ok(kvs), false) => assert_matches_reference(kvs, &read_json(&dir.join("expected_kvs.json")), d),
                (Err(e), true) => eprintln!("{d}: both fail ({e})"),
                (Ok(_), true) => panic!("{d}: the reference failed but sling did not"),
                (Err(e), false) => panic!("{d}: {e}"),
            }
        }));
        match res {
            Ok(()) => eprintln!("ok   {d}"),
            Err(_) => failures.push(d.to_string()),
        }
    }
    assert!(failures.is_empty(), "mismatches: {failures:?}");
}

mod gguf_vocab {
    //! Real tokenizers rebuilt from llama.cpp's `models/ggml-vocab-{gpt-2,qwen2}.gguf` (like
    //! `shared/oracles/make_tiny_models.py build_from_gguf_vocab`). Expected values: `gguf_vocab_*.expected.json`,
    //! made by running the reference on the directory this test writes (set `SLING_TOKENIZER_KEEP=DIR` to keep it,
    //! then `make_fixtures.py --dump-only DIR/<name> --no-compat`).
    use super::*;
    use std::io::Read;

    const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn llama_cpp_dir() -> Option<PathBuf> {
        let mut cands = Vec::new();
        if let Ok(d) = std::env::var("LLAMA_CPP_DIR") {
            cands.push(PathBuf::from(d));
        }
        if let Ok(d) = std::env::var("LAB_DIR") {
            cands.push(PathBuf::from(d).join("llama.cpp"));
        }
        if let Ok(h) = std::env::var("HOME") {
            cands.push(PathBuf::from(&h).join(".cache/sling-lab/llama.cpp"));
            cands.push(PathBuf::from(&h).join("sling-lab/llama.cpp"));
        }
        cands.into_iter().find(|d| d.join("models/ggml-vocab-gpt-2.gguf").is_file())
    }

    /// Just enough of a GGUF reader for the vocab files (KVs only).
    #[derive(Debug)]
    enum Kv {
        Str(String),
        Int(i64),
        Strs(Vec<String>),
        Ints(Vec<i64>),
        Other,
    }

    fn read_kvs(path: &Path) -> Vec<(String, Kv)> {
        let mut f = std::io::BufReader::new(std::fs::File::open(path).expect("open gguf"));
        fn rd<const N: usize>(f: &mut impl Read) -> [u8; N] {
            let mut b = [0u8; N];
            f.read_exact(&mut b).expect("read");
            b
        }
        fn u32_(f: &mut impl Read) -> u32 {
            u32::from_le_bytes(rd::<4>(f))
        }
        fn u64_(f: &mut impl Read) -> u64 {
            u64::from_le_bytes(rd::<8>(f))
        }
        fn string(f: &mut impl Read) -> String {
            let n = u64_(f) as usize;
            let mut b = vec![0u8; n];
            f.read_exact(&mut b).expect("read");
            String::from_utf8(b).expect("utf8")
        }
        fn scalar(f: &mut impl Read, t: u32) -> Kv {
            match t {
                0 | 1 | 7 => Kv::Int(i64::from(rd::<1>(f)[0])),
                2 | 3 => Kv::Int(i64::from(u16::from_le_bytes(rd::<2>(f)))),
                4 => Kv::Int(i64::from(u32_(f))),
                5 => Kv::Int(i64::from(i32::from_le_bytes(rd::<4>(f)))),
                6 => {
                    rd::<4>(f);
                    Kv::Other
                }
                8 => Kv::Str(string(f)),
                10 | 11 => Kv::Int(u64_(f) as i64),
                12 => {
                    rd::<8>(f);
                    Kv::Other
                }
                _ => panic!("type {t}"),
            }
        }
        assert_eq!(&rd::<4>(&mut f), b"GGUF");
        let _version = u32_(&mut f);
        let _n_tensors = u64_(&mut f);
        let n_kv = u64_(&mut f);
        let mut out = Vec::new();
        for _ in 0..n_kv {
            let key = string(&mut f);
            let t = u32_(&mut f);
            let v = if t == 9 {
                let et = u32_(&mut f);
                let n = u64_(&mut f);
                let items: Vec<Kv> = (0..n).map(|_| scalar(&mut f, et)).collect();
                if et == 8 {
                    Kv::Strs(items.into_iter().map(|k| if let Kv::Str(s) = k { s } else { unreachable!() }).collect())
                } else if items.iter().all(|k| matches!(k, Kv::Int(_))) {
                    Kv::Ints(items.into_iter().map(|k| if let Kv::Int(i) = k { i } else { unreachable!() }).collect())
                } else {
                    Kv::Other
                }
            } else {
                scalar(&mut f, t)
            };
            out.push((key, v));
        }
        out
    }

    /// Writes a model directory with a tokenizer.json rebuilt from `ggml-vocab-{name}.gguf`.
    fn build_dir(vocab_gguf: &Path, dir: &Path) -> String {
        let kvs = read_kvs(vocab_gguf);
        let get = |k: &str| kvs.iter().find(|(n, _)| n == k).map(|(_, v)| v).unwrap_or_else(|| panic!("{k}"));
        let Kv::Strs(tokens) = get("tokenizer.ggml.tokens") else { panic!("tokens") };
        let Kv::Ints(types) = get("tokenizer.ggml.token_type") else { panic!("types") };
        let Kv::Strs(merges) = get("tokenizer.ggml.merges") else { panic!("merges") };
        let Kv::Str(pre) = get("tokenizer.ggml.pre") else { panic!("pre") };
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').expect("merge");
                json!([a, b])
            })
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == 3)
            .map(|(i, (t, _))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let (normalizer, pre_tokenizer) = match pre.as_str() {
            "gpt-2" => (
                Value::Null,
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
            ),
            other => panic!("unsupported pre {other}"),
        };
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tj).expect("json")).expect("write");
        let eos = if tokens.iter().any(|t| t == "<|endoftext|>") {
            "<|endoftext|>".to_string()
        } else {
            let Kv::Int(e) = get("tokenizer.ggml.eos_token_id") else { panic!("eos") };
            tokens[*e as usize].clone()
        };
        let eos_id = tokens.iter().position(|t| *t == eos).expect("eos id");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&json!({
                "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false,
                "model_max_length": 4096, "bos_token": null, "eos_token": eos, "pad_token": eos, "unk_token": null,
                "chat_template": "{{ messages }}"
            }))
            .expect("json"),
        )
        .expect("write");
        let vocab_size = tokens.len().div_ceil(64) * 64;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&json!({
                "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": vocab_size,
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "eos_token_id": eos_id, "bos_token_id": null
            }))
            .expect("json"),
        )
        .expect("write");
        pre.clone()
    }

    fn check(name: &str, expected_hash: &str) {
        let Some(lcpp) = llama_cpp_dir() else {
            eprintln!("SKIP: llama.cpp models/ggml-vocab-*.gguf not found (set LLAMA_CPP_DIR)");
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = match std::env::var("SLING_TOKENIZER_KEEP") {
            Ok(d) => PathBuf::from(d).join(name),
            Err(_) => tmp.path().join(name),
        };
        let pre = build_dir(&lcpp.join(format!("models/ggml-vocab-{name}.gguf")), &dir);
        assert_eq!(chkhsh(&dir).expect("chkhsh"), expected_hash, "{name}: chkhsh");
        let config = read_json(&dir.join("config.json"));
        let kvs = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions::default()).expect("vocab_kvs");
        assert_eq!(kvs[1].1, GgufValue::String(pre.clone()), "{name}: detected pre");
        let exp = data_dir().join(format!("gguf_vocab_{name}.expected.json"));
        assert_matches_reference(&kvs, &read_json(&exp), name);
        // an override that agrees changes nothing; one that disagrees wins
        let o = VocabOptions { pre_override: Some("llama-bpe".into()) };
        let kvs2 = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &o).expect("override");
        assert_eq!(kvs2[1].1, GgufValue::String("llama-bpe".into()));
    }

    /// The chkhsh the reference table lists for openai-community/gpt2.
    #[test]
    fn gpt2_hash_and_kvs() {
        check("gpt-2", "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454");
    }

    /// The chkhsh the reference table lists for Qwen/Qwen1.5-7B.
    #[test]
    fn qwen2_hash_and_kvs() {
        check("qwen2", "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea");
    }
}

mod errors {
    use super::*;

    fn tiny_copy() -> (tempfile::TempDir, PathBuf, Value) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        copy_dir(&data_dir().join("qwen2moe_tiny"), &dir);
        let config = read_json(&dir.join("config.json"));
        (tmp, dir, config)
    }

    #[test]
    fn missing_tokenizer_json() {
        let (_t, dir, config) = tiny_copy();
        std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
        for style in [VocabStyle::Gpt2, VocabStyle::Llama] {
            let e = vocab_kvs(&dir, &config, style, &VocabOptions::default()).expect_err("must fail");
            assert!(matches!(&e, TokenizerError::Missing { path, .. } if path.ends_with("tokenizer.json")), "{e}");
            assert!(e.to_string().contains("tokenizer.json"), "{e}");
        }
    }

    #[test]
    fn malformed_tokenizer_json() {
        let (_t, dir, config) = tiny_copy();
        std::fs::write(dir.join("tokenizer.json"), "{\"model\": {").expect("write");
        let e = check_vocab(&dir, &config, VocabStyle::Gpt2, &VocabOptions::default()).expect_err("must fail");
        assert!(matches!(&e, TokenizerError::Json { path, .. } if path.ends_with("tokenizer.json")), "{e}");
        // valid JSON that the tokenizers library rejects
        std::fs::write(dir.join("tokenizer.json"), "{\"model\": {\"type\": \"Nope\"}}").expect("write");
        let e = check_vocab(&dir, &config, VocabStyle::Gpt2, &VocabOptions::default()).expect_err("must fail");
        assert!(matches!(&e, TokenizerError::Tokenizers { .. }), "{e}");
    }

    #[test]
    fn malformed_tokenizer_config() {
        let (_t, dir, config) = tiny_copy();
        std::fs::write(dir.join("tokenizer_config.json"), "[1, 2").expect("write");
        let e = check_vocab(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt-2".into()) })
            .expect_err("must fail");
        assert!(matches!(&e, TokenizerError::Json { path, .. } if path.ends_with("tokenizer_config.json")), "{e}");
    }

    #[test]
    fn unknown_hash_without_override() {
        let (_t, dir, config) = tiny_copy();
        let hash = chkhsh(&dir).expect("hash");
        // the hash the reference printed for this fixture (reference.log)
        assert_eq!(hash, "d5991d366f0a313e525ec48083a2afaf53ee9ac6b5768fb7b974eee41835a80b");
        let e = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions::default()).expect_err("must fail");
        let msg = e.to_string();
        assert!(matches!(e, TokenizerError::UnknownPreTokenizer { .. }));
        assert!(msg.contains(&hash), "{msg}");
        assert!(msg.contains("--tokenizer-pre"), "{msg}");
        assert!(msg.contains("llama-bpe") && msg.contains("qwen2"), "{msg}");
    }

    #[test]
    fn invalid_override_name() {
        let (_t, dir, config) = tiny_copy();
        let e = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt2".into()) })
            .expect_err("must fail");
        assert!(matches!(&e, TokenizerError::InvalidPreOverride { name, .. } if name == "gpt2"), "{e}");
        assert!(e.to_string().contains("gpt-2"), "{e}");
    }

    #[test]
    fn config_vocab_smaller_than_tokenizer() {
        let (_t, dir, mut config) = tiny_copy();
        config["vocab_size"] = json!(100);
        let e = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt-2".into()) })
            .expect_err("must fail");
        assert!(matches!(e, TokenizerError::VocabSizeTooSmall { vocab_size: 100, max_id: 514, .. }), "{e}");
    }

    #[test]
    fn no_config_vocab_size_uses_tokenizer_size() {
        let (_t, dir, mut config) = tiny_copy();
        config.as_object_mut().expect("object").remove("vocab_size");
        let kvs = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt-2".into()) })
            .expect("ok");
        let GgufValue::Array(_, tokens) = &kvs[2].1 else { panic!("tokens") };
        assert_eq!(tokens.len(), 515);
    }

    /// A hole in the model's id space → `[PAD{i}]` / UNUSED; token strings that end up equal (here two
    /// user-defined added tokens, " dup" and "▁dup", the latter pre-normalized to " dup") are written as they
    /// are: the reference does not dedupe (llama.cpp would refuse such a file; sling logs a warning).
    #[test]
    fn holes_and_duplicates_like_the_reference() {
        let (_t, dir, config) = tiny_copy();
        let p = dir.join("tokenizer.json");
        let mut tj = read_json(&p);
        // "Ā" (byte 0x00) is in the initial alphabet but in no merge: moving it to id 600 leaves a hole at its id
        let vocab = tj["model"]["vocab"].as_object_mut().expect("vocab");
        let hole = vocab.get("\u{100}").and_then(Value::as_u64).expect("Ā in vocab") as usize;
        vocab.insert("\u{100}".into(), json!(600));
        // drop the non-special added tokens, add two that end up equal
        let added = tj["added_tokens"].as_array_mut().expect("added");
        added.retain(|t| t["special"] == json!(true));
        for (i, c) in [" dup", "\u{2581}dup"].iter().enumerate() {
            added.push(json!({"id": 512 + i, "content": c, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": true, "special": false}));
        }
        std::fs::write(&p, serde_json::to_string(&tj).expect("json")).expect("write");
        let mut config = config;
        config["vocab_size"] = json!(640);
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).expect("json")).expect("write");
        if let Ok(keep) = std::env::var("SLING_TOKENIZER_KEEP") {
            copy_dir(&dir, &Path::new(&keep).join("holes_dups"));
        }
        let kvs = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt-2".into()) })
            .expect("ok");
        let GgufValue::Array(_, tokens) = &kvs[2].1 else { panic!("tokens") };
        let GgufValue::Array(_, types) = &kvs[3].1 else { panic!("types") };
        assert_eq!(tokens[600].as_str(), Some("\u{100}"));
        assert_eq!(tokens[hole].as_str(), Some(format!("[PAD{hole}]").as_str()));
        assert_eq!(types[hole], GgufValue::I32(5));
        assert_eq!(tokens[512].as_str(), Some(" dup"));
        assert_eq!(tokens[513].as_str(), Some(" dup"));
        assert_eq!(types[513], GgufValue::I32(4));
        assert_eq!(tokens[514].as_str(), Some("[PAD514]"));
        assert_eq!(tokens.len(), 640);
        // and everything else as the reference wrote it for this directory
        assert_matches_reference(&kvs, &read_json(&data_dir().join("holes_dups.expected.json")), "holes_dups");
    }

    #[test]
    fn sentencepiece_garbage_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        copy_dir(&data_dir().join("mixtral_spm"), &dir);
        std::fs::write(dir.join("tokenizer.model"), b"\x0b\x00garbage").expect("write");
        let config = read_json(&dir.join("config.json"));
        let e = vocab_kvs(&dir, &config, VocabStyle::Llama, &VocabOptions::default()).expect_err("must fail");
        assert!(matches!(&e, TokenizerError::Invalid { path, .. } if path.ends_with("tokenizer.model")), "{e}");
    }

    #[test]
    fn negative_special_id_is_refused_like_the_reference() {
        let (_t, dir, mut config) = tiny_copy();
        config["pad_token_id"] = json!(-1);
        // the tokenizer_config pad token sets pad first; use a type only config.json sets
        config["sep_token_id"] = json!(-1);
        let e = vocab_kvs(&dir, &config, VocabStyle::Gpt2, &VocabOptions { pre_override: Some("gpt-2".into()) })
            .expect_err("must fail");
        assert!(matches!(&e, TokenizerError::BadSpecialTokenId { kind, id: -1, .. } if kind == "sep"), "{e}");
    }
}
