//! Tokenizers: nanoGPT's character vocabulary, or a byte-level BPE trained with the `tokenizers`
//! crate. Both are saved in the data folder and inside every checkpoint.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::ModelWrapper;

/// The largest vocabulary that fits the `u16` tokens of `train.bin`/`val.bin`.
pub const MAX_VOCAB: usize = u16::MAX as usize + 1;

/// Which kind of tokenizer `prepare` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizerKind {
    /// One token per distinct character of the corpus (65 for tiny Shakespeare).
    Char,
    /// Byte-level BPE trained on the corpus.
    Bpe,
}

/// A tokenizer, as `prepare` builds it and `train`/`sample` use it.
pub enum Tokenizer {
    /// The sorted distinct characters of the corpus; token `i` is `chars[i]`.
    Char(Vec<char>),
    /// A byte-level BPE.
    Bpe(Box<tokenizers::Tokenizer>),
}

/// How a tokenizer is written to `meta.json` and into checkpoints.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Saved {
    Char { chars: String },
    Bpe { tokenizer: serde_json::Value },
}

impl Tokenizer {
    /// The character vocabulary of `text`.
    pub fn char_level(text: &str) -> Self {
        let chars: BTreeSet<char> = text.chars().collect();
        Tokenizer::Char(chars.into_iter().collect())
    }

    /// A byte-level BPE of `vocab_size` tokens trained on `text`.
    pub fn train_bpe(text: &str, vocab_size: usize) -> Result<Self> {
        let alphabet = ByteLevel::alphabet();
        if vocab_size < alphabet.len() || vocab_size > MAX_VOCAB {
            bail!(
                "--vocab-size {vocab_size} is out of range: a byte-level BPE needs at least {} tokens (one per byte) and train.bin stores u16 tokens, so at most {MAX_VOCAB}",
                alphabet.len()
            );
        }
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainer::builder()
                .vocab_size(vocab_size)
                .show_progress(false)
                .initial_alphabet(alphabet.into_iter().collect())
                .build(),
        );
        let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        tok.train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| anyhow!("training the BPE tokenizer failed: {e}"))?;
        Ok(Tokenizer::Bpe(Box::new(tok)))
    }

    /// Number of distinct tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(chars) => chars.len(),
            Tokenizer::Bpe(tok) => tok.get_vocab_size(true),
        }
    }

    /// The tokens of `text`; for the char vocabulary, an error names any character outside it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(chars) => {
                let mut ids = Vec::with_capacity(text.len());
                let mut unknown = BTreeSet::new();
                for c in text.chars() {
                    match chars.binary_search(&c) {
                        Ok(i) => ids.push(i as u32),
                        Err(_) => {
                            unknown.insert(c);
                        }
                    }
                }
                if !unknown.is_empty() {
                    let shown: Vec<String> = unknown.iter().map(|c| format!("{c:?}")).collect();
                    let vocab: String = chars.iter().collect();
                    bail!(
                        "the text has characters outside the model's vocabulary: {}; the vocabulary is {vocab:?}",
                        shown.join(", ")
                    );
                }
                Ok(ids)
            }
            Tokenizer::Bpe(tok) => Ok(tok
                .encode(text, false)
                .map_err(|e| anyhow!("BPE encoding failed: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char(chars) => ids
                .iter()
                .map(|&i| {
                    chars.get(i as usize).copied().ok_or_else(|| {
                        anyhow!(
                            "token {i} is outside the vocabulary of {} characters",
                            chars.len()
                        )
                    })
                })
                .collect(),
            Tokenizer::Bpe(tok) => tok
                .decode(ids, false)
                .map_err(|e| anyhow!("BPE decoding failed: {e}")),
        }
    }

    /// The tokenizer as JSON text (`meta.json` and checkpoints).
    pub fn to_json(&self) -> Result<String> {
        let saved = match self {
            Tokenizer::Char(chars) => Saved::Char {
                chars: chars.iter().collect(),
            },
            Tokenizer::Bpe(tok) => Saved::Bpe {
                tokenizer: serde_json::to_value(tok.as_ref())?,
            },
        };
        Ok(serde_json::to_string_pretty(&saved)?)
    }

    /// Reads a tokenizer written by [`Tokenizer::to_json`].
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(match serde_json::from_str(text)? {
            Saved::Char { chars } => {
                let chars: Vec<char> = chars.chars().collect();
                if chars.is_empty() || chars.windows(2).any(|w| w[0] >= w[1]) {
                    bail!("the character vocabulary must be non-empty, sorted and without repeats");
                }
                Tokenizer::Char(chars)
            }
            Saved::Bpe { tokenizer } => {
                Tokenizer::Bpe(Box::new(serde_json::from_value(tokenizer)?))
            }
        })
    }

    /// Reads `meta.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the tokenizer {}", path.display()))?;
        Self::from_json(&text).with_context(|| {
            format!(
                "{} is corrupt; run `nanogpt prepare` again to rebuild the data",
                path.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_vocab_round_trips_and_rejects_unknown_characters() {
        let tok = Tokenizer::char_level("hello world\n");
        assert_eq!(tok.vocab_size(), 9);
        let ids = tok.encode("low\n").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "low\n");
        let e = tok.encode("HELLO!").unwrap_err().to_string();
        assert!(
            e.contains("'!'") && e.contains("'H'") && e.contains("vocabulary is"),
            "{e}"
        );
        let again = Tokenizer::from_json(&tok.to_json().unwrap()).unwrap();
        assert_eq!(again.encode("hello").unwrap(), tok.encode("hello").unwrap());
        assert!(tok.decode(&[99]).is_err());
    }

    #[test]
    fn bpe_trains_and_round_trips() {
        let text = "the cat sat on the mat.\nthe dog sat on the log.\n".repeat(20);
        let tok = Tokenizer::train_bpe(&text, 300).unwrap();
        assert!(
            tok.vocab_size() > 256 && tok.vocab_size() <= 300,
            "{}",
            tok.vocab_size()
        );
        let ids = tok.encode("the cat sat on the log.\n").unwrap();
        assert!(ids.len() < 24, "merges should shorten the text: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sat on the log.\n");
        let again = Tokenizer::from_json(&tok.to_json().unwrap()).unwrap();
        assert_eq!(
            again.encode("Zebra!").unwrap(),
            tok.encode("Zebra!").unwrap()
        );
        assert!(Tokenizer::train_bpe(&text, 100).is_err());
        assert!(Tokenizer::train_bpe(&text, 70_000).is_err());
    }
}
