//! The data: `prepare` turns a text corpus into `train.bin`/`val.bin` (u16 little-endian tokens)
//! plus the tokenizer, and [`Dataset`] reads them back and samples training batches.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rng::Rng;
use crate::tokenizer::{Tokenizer, TokenizerKind, MAX_VOCAB};
use crate::{files, memory};

/// Where `prepare` downloads tiny Shakespeare from when no input is given.
pub const SHAKESPEARE_URL: &str =
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
/// The sha256 of the canonical tiny Shakespeare.
pub const SHAKESPEARE_SHA256: &str =
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed";
/// The environment variable naming a local corpus when `--input` is not given.
pub const INPUT_ENV: &str = "NANOGPT_INPUT";

/// What `nanogpt prepare` needs.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// The corpus; `None` means `data_dir/input.txt`, downloaded first if missing.
    pub input: Option<PathBuf>,
    /// Where the tokens and the tokenizer go.
    pub data_dir: PathBuf,
    /// Character or BPE tokenizer.
    pub tokenizer: TokenizerKind,
    /// BPE vocabulary size (BPE only).
    pub vocab_size: Option<usize>,
}

/// The default BPE vocabulary size.
pub const DEFAULT_BPE_VOCAB: usize = 1024;

/// Tokenizes the corpus and writes `train.bin`, `val.bin` and `meta.json` (the tokenizer, and
/// each bin's length and sha256) into the data folder. The folder is built under a temporary
/// name and swapped into place when complete (other files in it, such as a downloaded
/// `input.txt`, are kept), so an interrupted prepare leaves the old folder as it was.
/// Returns a one-line summary.
pub fn prepare(opts: &PrepareOptions) -> Result<String> {
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let text = read_corpus(opts.input.as_deref(), dir)?;
    let tokenizer = match (opts.tokenizer, opts.vocab_size) {
        (TokenizerKind::Char, None) => Tokenizer::char_level(&text),
        (TokenizerKind::Char, Some(_)) => {
            bail!("--vocab-size only applies to --tokenizer bpe; the char vocabulary is the corpus's distinct characters")
        }
        (TokenizerKind::Bpe, n) => Tokenizer::train_bpe(&text, n.unwrap_or(DEFAULT_BPE_VOCAB))?,
    };
    if tokenizer.vocab_size() > MAX_VOCAB {
        bail!(
            "the corpus has {} distinct characters, more than the {MAX_VOCAB} that u16 tokens can hold; use --tokenizer bpe",
            tokenizer.vocab_size()
        );
    }
    // nanoGPT's split: the first 90% of the characters train, the rest validate.
    let n = text.chars().count() * 9 / 10;
    let cut = text.char_indices().nth(n).map_or(text.len(), |(i, _)| i);
    let (train_text, val_text) = text.split_at(cut);
    let train = tokenizer.encode(train_text)?;
    let val = tokenizer.encode(val_text)?;
    let (train_bytes, val_bytes) = (token_bytes(&train), token_bytes(&val));
    let mut meta: serde_json::Value = serde_json::from_str(&tokenizer.to_json()?)?;
    meta[FILES_KEY] = serde_json::to_value(BTreeMap::from([
        (TRAIN_BIN, BinRecord::of(&train_bytes)),
        (VAL_BIN, BinRecord::of(&val_bytes)),
    ]))?;
    let meta = serde_json::to_string_pretty(&meta)?;
    files::replace_dir(
        dir,
        &[
            (TRAIN_BIN, &train_bytes),
            (VAL_BIN, &val_bytes),
            (META_JSON, meta.as_bytes()),
        ],
    )?;
    Ok(format!(
        "prepared {}: {} characters, vocabulary of {} tokens, {} train and {} val tokens",
        dir.display(),
        text.chars().count(),
        tokenizer.vocab_size(),
        train.len(),
        val.len()
    ))
}

/// Whether `prepare` has completed in `data_dir`.
pub fn is_prepared(data_dir: &Path) -> bool {
    data_dir.join(META_JSON).is_file()
}

const TRAIN_BIN: &str = "train.bin";
const VAL_BIN: &str = "val.bin";
const META_JSON: &str = "meta.json";
/// The key of `meta.json` that records the bins.
const FILES_KEY: &str = "files";

/// What `meta.json` records of a bin, so that `train` notices a bin that does not belong to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BinRecord {
    bytes: u64,
    sha256: String,
}

impl BinRecord {
    fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The bins' records in the `meta.json` text of `dir`.
fn bin_records(dir: &Path, meta: &str) -> Result<BTreeMap<String, BinRecord>> {
    let path = dir.join(META_JSON);
    let again = format!("run `nanogpt prepare --data-dir {}` again", dir.display());
    let value: serde_json::Value = serde_json::from_str(meta)
        .with_context(|| format!("{} is corrupt; {again}", path.display()))?;
    let Some(files) = value.get(FILES_KEY) else {
        bail!(
            "{} records no length and checksum of {TRAIN_BIN} and {VAL_BIN} (an older nanogpt wrote it, or it was copied from elsewhere); {again}",
            path.display()
        );
    };
    serde_json::from_value(files.clone())
        .with_context(|| format!("{} has a bad `{FILES_KEY}` record; {again}", path.display()))
}

fn read_corpus(input: Option<&Path>, dir: &Path) -> Result<String> {
    let local = dir.join("input.txt");
    // What a download killed while writing left behind.
    files::remove_stale_temps(dir, "input.txt", false)?;
    let path = match input {
        Some(p) => p.to_path_buf(),
        None if local.is_file() => local,
        None => {
            download_shakespeare(&local)?;
            local
        }
    };
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the corpus {} (it must be UTF-8 text)",
            path.display()
        )
    })?;
    if text.chars().count() < 100 {
        bail!(
            "the corpus {} has only {} characters; it needs at least 100",
            path.display(),
            text.chars().count()
        );
    }
    Ok(text)
}

fn download_shakespeare(dest: &Path) -> Result<()> {
    eprintln!("downloading {SHAKESPEARE_URL}");
    let fail = || {
        format!("cannot download tiny Shakespeare from {SHAKESPEARE_URL}; without network, give a local copy: `nanogpt prepare --input FILE` or {INPUT_ENV}=FILE")
    };
    let mut body = Vec::new();
    ureq::get(SHAKESPEARE_URL)
        .call()
        .with_context(fail)?
        .into_body()
        .into_reader()
        .take(16 << 20)
        .read_to_end(&mut body)
        .with_context(fail)?;
    let digest = sha256_hex(&body);
    if digest != SHAKESPEARE_SHA256 {
        bail!("the download from {SHAKESPEARE_URL} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; not using it");
    }
    files::write_bytes_atomic(dest, &body)
}

/// The u16 little-endian bytes of `tokens` (each below [`MAX_VOCAB`]).
fn token_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens
        .iter()
        .flat_map(|&t| (t as u16).to_le_bytes())
        .collect()
}

/// Reads a bin, checking it against its record in `meta.json` and its tokens against the
/// vocabulary.
fn read_tokens(path: &Path, record: &BinRecord, vocab_size: usize) -> Result<Vec<u16>> {
    let again = "run `nanogpt prepare` again";
    let len = std::fs::metadata(path)
        .with_context(|| {
            format!(
                "cannot read {}; run `nanogpt prepare` to create it",
                path.display()
            )
        })?
        .len();
    if len != record.bytes {
        bail!(
            "{} has {len} bytes but meta.json records {}: the bins and meta.json are not from one prepare; {again}",
            path.display(),
            record.bytes
        );
    }
    // The bytes and their tokens.
    let need = memory::Estimate {
        bytes: len.saturating_mul(2),
        what: "the tokens",
    };
    memory::check_fits(
        &format!("reading {}", path.display()),
        &need,
        memory::available(),
    )?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if sha256_hex(&bytes) != record.sha256 {
        bail!(
            "{} does not match the sha256 that meta.json records: it changed after prepare, or the bins and meta.json are not from one prepare; {again}",
            path.display()
        );
    }
    if bytes.len() % 2 != 0 {
        bail!(
            "{} is corrupt: {} bytes is not a whole number of u16 tokens; run `nanogpt prepare` again",
            path.display(),
            bytes.len()
        );
    }
    let tokens: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if let Some((i, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        bail!(
            "{} is corrupt: token {t} at position {i} is outside the vocabulary of {vocab_size}; run `nanogpt prepare` again",
            path.display()
        );
    }
    Ok(tokens)
}

/// Which half of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `train.bin`.
    Train,
    /// `val.bin`.
    Val,
}

/// The prepared tokens and their tokenizer.
pub struct Dataset {
    train: Vec<u16>,
    val: Vec<u16>,
    /// The tokenizer of `meta.json`.
    pub tokenizer: Tokenizer,
}

impl Dataset {
    /// Reads a prepared data folder, checking that each split holds more than `block_size` tokens.
    pub fn load(dir: &Path, block_size: usize) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "data folder {} does not exist; run `nanogpt prepare --data-dir {}`",
                dir.display(),
                dir.display()
            );
        }
        let tokenizer = Tokenizer::load(dir)?;
        let vocab = tokenizer.vocab_size();
        let meta = std::fs::read_to_string(dir.join(META_JSON))
            .with_context(|| format!("cannot read {}", dir.join(META_JSON).display()))?;
        let records = bin_records(dir, &meta)?;
        let record = |name: &str| {
            records.get(name).with_context(|| {
                format!(
                    "{} records nothing of {name}; run `nanogpt prepare` again",
                    dir.join(META_JSON).display()
                )
            })
        };
        let train = read_tokens(&dir.join(TRAIN_BIN), record(TRAIN_BIN)?, vocab)?;
        let val = read_tokens(&dir.join(VAL_BIN), record(VAL_BIN)?, vocab)?;
        for (name, tokens) in [(TRAIN_BIN, &train), (VAL_BIN, &val)] {
            if tokens.len() <= block_size {
                bail!(
                    "{} has {} tokens, too few for block-size {block_size} (it needs at least {}); use a smaller block-size or more data",
                    dir.join(name).display(),
                    tokens.len(),
                    block_size + 1
                );
            }
        }
        Ok(Self {
            train,
            val,
            tokenizer,
        })
    }

    /// A batch of `batch_size` random windows: inputs `x` and next-token targets `y`, both
    /// `(batch_size, block_size)` u32 tensors on `device`.
    pub fn batch(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let data = match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        };
        let mut x = Vec::with_capacity(batch_size * block_size);
        let mut y = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            let start = rng.below((data.len() - block_size) as u64) as usize;
            let window = &data[start..start + block_size + 1];
            x.extend(window[..block_size].iter().map(|&t| t as u32));
            y.extend(window[1..].iter().map(|&t| t as u32));
        }
        let shape = (batch_size, block_size);
        Ok((
            Tensor::from_vec(x, shape, device)?,
            Tensor::from_vec(y, shape, device)?,
        ))
    }
}
