//! SentencePiece `tokenizer.model` (a `sentencepiece.ModelProto` protobuf) and the reference's
//! `_set_vocab_sentencepiece` / `_create_vocab_sentencepiece`.
//!
//! Only `ModelProto.pieces` (field 1) is read: `SentencePiece { piece = 1 (string), score = 2 (float),
//! type = 3 (enum: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE) }`
//! (`sentencepiece_model.proto`). Every other field is skipped by wire type.

use std::path::Path;

use serde_json::Value;

use super::hf::read_json_opt;
use super::{does_token_look_special, special, token_type, Hparams, KvWriter, TokenizerError};

/// Cap on the number of pieces (the largest real SentencePiece vocabularies are ~256k; this only bounds the
/// allocation a corrupt file could ask for).
const MAX_PIECES: usize = 4 << 20;

/// One vocabulary entry of a `tokenizer.model`.
#[derive(Clone, Debug, PartialEq)]
pub struct SpmPiece {
    pub piece: String,
    pub score: f32,
    /// `SentencePiece.Type` (1 NORMAL when absent).
    pub kind: u32,
}

/// sentencepiece `SentencePiece.Type` values.
#[allow(dead_code)]
pub mod piece_type {
    pub const NORMAL: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
    pub const UNUSED: u32 = 5;
    pub const BYTE: u32 = 6;
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    /// Reads a field: `(number, wire type, payload)`; payload is the bytes of a LEN field or of a fixed
    /// field, and empty for a varint (whose value is returned separately).
    fn field(&mut self) -> Option<(u64, u8, &'a [u8], u64)> {
        let key = self.varint()?;
        let wt = (key & 7) as u8;
        let num = key >> 3;
        match wt {
            0 => Some((num, wt, &[], self.varint()?)),
            1 => Some((num, wt, self.bytes(8)?, 0)),
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                Some((num, wt, self.bytes(n)?, 0))
            }
            5 => Some((num, wt, self.bytes(4)?, 0)),
            _ => None, // groups (3/4) are not used by sentencepiece
        }
    }
}

/// Parses the pieces of a SentencePiece `ModelProto`.
pub fn parse_model_proto(buf: &[u8]) -> Result<Vec<SpmPiece>, String> {
    let mut r = Reader { buf, pos: 0 };
    let mut pieces = Vec::new();
    while !r.done() {
        let at = r.pos;
        let (num, wt, payload, _) =
            r.field().ok_or_else(|| format!("truncated or malformed protobuf field at byte {at}"))?;
        if num != 1 {
            continue;
        }
        if wt != 2 {
            return Err(format!("ModelProto.pieces at byte {at} has wire type {wt}, expected 2"));
        }
        if pieces.len() >= MAX_PIECES {
            return Err(format!("more than {MAX_PIECES} pieces"));
        }
        let mut p = Reader { buf: payload, pos: 0 };
        let mut piece = SpmPiece { piece: String::new(), score: 0.0, kind: piece_type::NORMAL };
        while !p.done() {
            let (n, w, pl, v) =
                p.field().ok_or_else(|| format!("malformed SentencePiece message in the piece at byte {at}"))?;
            match (n, w) {
                (1, 2) => {
                    piece.piece = String::from_utf8(pl.to_vec())
                        .map_err(|_| format!("piece {} is not valid UTF-8", pieces.len()))?;
                }
                (2, 5) => {
                    let b: [u8; 4] = pl.try_into().map_err(|_| "bad float score".to_string())?;
                    piece.score = f32::from_le_bytes(b);
                }
                (3, 0) => piece.kind = u32::try_from(v).map_err(|_| format!("bad piece type {v}"))?,
                _ => {}
            }
        }
        pieces.push(piece);
    }
    Ok(pieces)
}

/// Reads `dir/tokenizer.model`.
pub fn read_tokenizer_model(path: &Path) -> Result<Vec<SpmPiece>, TokenizerError> {
    let buf = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    let pieces = parse_model_proto(&buf).map_err(|what| TokenizerError::Invalid {
        path: path.to_path_buf(),
        what: format!("not a SentencePiece model: {what}"),
    })?;
    if pieces.is_empty() {
        return Err(TokenizerError::Invalid {
            path: path.to_path_buf(),
            what: "SentencePiece model without pieces".into(),
        });
    }
    Ok(pieces)
}

/// `_set_vocab_sentencepiece`.
pub(crate) fn set_vocab_sentencepiece(dir: &Path, hp: &Hparams<'_>, w: &mut KvWriter) -> Result<(), TokenizerError> {
    let (tokens, scores, types) = create_vocab_sentencepiece(dir, hp)?;
    let n = tokens.len() as u64;
    w.add_vocab("llama", "default", tokens, Some(scores), types);
    let sv = special::SpecialVocab::load(dir, hp.raw(), false, special::DEFAULT_TYPES, Some(n))?;
    sv.add_to_gguf(w, dir)
}

type SpmVocab = (Vec<String>, Vec<f32>, Vec<i32>);

/// `_create_vocab_sentencepiece`.
fn create_vocab_sentencepiece(dir: &Path, hp: &Hparams<'_>) -> Result<SpmVocab, TokenizerError> {
    let model_path = dir.join("tokenizer.model");
    let pieces = read_tokenizer_model(&model_path)?;
    // find_hparam(["vocab_size_per_layer_input", "vocab_size"], optional=True) or tokenizer.vocab_size()
    let hv = hp.get("vocab_size_per_layer_input").or_else(|| hp.get("vocab_size"));
    let vocab_size: usize = match hv {
        Some(v) if super::truthy(v) => usize::try_from(v.as_u64().ok_or_else(|| TokenizerError::Invalid {
            path: dir.join("config.json"),
            what: format!("vocab_size is {v}, not a count"),
        })?)
        .map_err(|_| TokenizerError::Invalid { path: dir.join("config.json"), what: "vocab_size too large".into() })?,
        _ => pieces.len(),
    };
    if vocab_size > MAX_PIECES {
        return Err(TokenizerError::Invalid {
            path: dir.join("config.json"),
            what: format!("vocab_size {vocab_size} is larger than {MAX_PIECES}"),
        });
    }

    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores: Vec<f32> = vec![-10000.0; vocab_size];
    let mut types: Vec<i32> = vec![token_type::UNUSED; vocab_size];

    for (id, p) in pieces.iter().enumerate() {
        if id >= vocab_size {
            tracing::warn!("ignore tokens from {id}: id is out of range, max={}", vocab_size.saturating_sub(1));
            break;
        }
        let ty = match p.kind {
            piece_type::UNKNOWN => token_type::UNKNOWN,
            piece_type::CONTROL => token_type::CONTROL,
            piece_type::UNUSED => token_type::UNUSED,
            piece_type::BYTE => token_type::BYTE,
            _ => token_type::NORMAL,
        };
        tokens[id] = p.piece.clone();
        scores[id] = p.score;
        types[id] = ty;
    }

    let at_path = dir.join("added_tokens.json");
    if let Some(at) = read_json_opt(&at_path)? {
        let at = at
            .as_object()
            .ok_or_else(|| TokenizerError::Invalid { path: at_path.clone(), what: "is not a JSON object".into() })?;
        for (key, id) in at {
            let id = slot(&at_path, key, id, vocab_size)?;
            let Some(id) = id else { continue };
            tokens[id] = key.clone();
            scores[id] = -1000.0;
            types[id] = token_type::USER_DEFINED;
        }
    }

    let tc_path = dir.join("tokenizer_config.json");
    if let Some(tc) = read_json_opt(&tc_path)? {
        if let Some(atd) = tc.get("added_tokens_decoder") {
            let atd = atd.as_object().ok_or_else(|| TokenizerError::Invalid {
                path: tc_path.clone(),
                what: "added_tokens_decoder is not an object".into(),
            })?;
            for (key, data) in atd {
                let id: i64 = key.trim().parse().map_err(|_| TokenizerError::Invalid {
                    path: tc_path.clone(),
                    what: format!("added_tokens_decoder key {key:?} is not an integer"),
                })?;
                let content = data.get("content").and_then(Value::as_str).ok_or_else(|| TokenizerError::Invalid {
                    path: tc_path.clone(),
                    what: format!("added_tokens_decoder[{key}] has no string \"content\""),
                })?;
                let Some(id) = slot(&tc_path, content, &Value::from(id), vocab_size)? else { continue };
                if types[id] != token_type::UNUSED && tokens[id] != content {
                    tracing::warn!("replacing token {id}: {:?} -> {content:?}", tokens[id]);
                }
                let mut token = content.to_string();
                if data.get("special").is_some_and(super::truthy) || does_token_look_special(content) {
                    types[id] = token_type::CONTROL;
                } else {
                    token = token.replace('\u{2581}', " ");
                    types[id] = token_type::USER_DEFINED;
                }
                scores[id] = -1000.0;
                tokens[id] = token;
            }
        }
    }
    Ok((tokens, scores, types))
}

/// The list index an added-token id refers to: `None` (skipped with a warning) when out of range, an error for
/// negative or non-integer ids (Python would index from the end or raise).
fn slot(path: &Path, token: &str, id: &Value, vocab_size: usize) -> Result<Option<usize>, TokenizerError> {
    let id = id.as_i64().filter(|i| *i >= 0).ok_or_else(|| TokenizerError::Invalid {
        path: path.to_path_buf(),
        what: format!("token {token:?} has id {id}, not a non-negative integer"),
    })?;
    match usize::try_from(id) {
        Ok(i) if i < vocab_size => Ok(Some(i)),
        _ => {
            tracing::warn!("ignore token {id}: id is out of range, max={}", vocab_size.saturating_sub(1));
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    fn piece(p: &str, score: f32, kind: Option<u32>) -> Vec<u8> {
        let mut m = Vec::new();
        m.push(0x0a);
        varint(p.len() as u64, &mut m);
        m.extend_from_slice(p.as_bytes());
        m.push(0x15);
        m.extend_from_slice(&score.to_le_bytes());
        if let Some(k) = kind {
            m.push(0x18);
            varint(u64::from(k), &mut m);
        }
        let mut out = vec![0x0a];
        varint(m.len() as u64, &mut out);
        out.extend(m);
        out
    }

    #[test]
    fn parses_pieces_and_skips_other_fields() {
        let mut buf = piece("<unk>", 0.0, Some(2));
        buf.extend(piece("▁a", -1.5, None));
        // trainer_spec (field 2, LEN) with junk inside, then a varint field 5
        buf.extend([0x12, 0x03, 0x08, 0x96, 0x01, 0x28, 0x07]);
        let p = parse_model_proto(&buf).expect("parses");
        assert_eq!(
            p,
            vec![
                SpmPiece { piece: "<unk>".into(), score: 0.0, kind: 2 },
                SpmPiece { piece: "▁a".into(), score: -1.5, kind: 1 }
            ]
        );
    }

    #[test]
    fn rejects_truncated() {
        let buf = piece("abc", 0.0, None);
        assert!(parse_model_proto(&buf[..buf.len() - 2]).is_err());
        assert!(parse_model_proto(&[0x0b]).is_err());
    }
}
