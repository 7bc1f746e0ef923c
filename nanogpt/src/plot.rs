//! The loss history: a CSV in `out-dir` written as training goes, and a PNG of the curves drawn
//! at the end with plotters.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;

use crate::out_dir::LOSS_CSV;

/// One row of `loss.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The iteration.
    pub iter: usize,
    /// `batch` (the training batch's loss), or `train`/`val` (estimates over eval-iters batches).
    pub split: String,
    /// The loss.
    pub loss: f64,
    /// Learning rate of the step (`batch` rows).
    pub lr: Option<f64>,
    /// Milliseconds the step took (`batch` rows).
    pub ms: Option<f64>,
}

const HEADER: &str = "iter,split,loss,lr,ms";

/// `loss.csv`, kept in memory too for the plot.
pub struct LossLog {
    file: BufWriter<File>,
    records: Vec<Record>,
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

impl LossLog {
    /// Starts a new `out_dir/loss.csv` (replacing any: the caller checked that it may).
    pub fn create(out_dir: &Path) -> Result<Self> {
        let path = out_dir.join(LOSS_CSV);
        let file =
            File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut log = Self {
            file: BufWriter::new(file),
            records: Vec::new(),
        };
        writeln!(log.file, "{HEADER}")?;
        log.file.flush()?;
        Ok(log)
    }

    /// Continues `out_dir/loss.csv` for a run resumed at iteration `start`: keeps the rows
    /// logged before it (and the evaluation at `start` when `keep_evals_at_start`), cuts the
    /// rest off (the resumed run logs them again), and appends from there. A torn last line
    /// (a run killed while writing it) is dropped; any other unreadable row is an error.
    pub fn resume(out_dir: &Path, start: usize, keep_evals_at_start: bool) -> Result<Self> {
        let path = out_dir.join(LOSS_CSV);
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(out_dir),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (keep, records) = rows_to_keep(&text, start, keep_evals_at_start)
            .with_context(|| format!("cannot resume the loss history {}", path.display()))?;
        file.set_len(keep as u64)
            .and_then(|()| file.seek(SeekFrom::End(0)).map(drop))
            .with_context(|| format!("cannot cut {} at the checkpoint", path.display()))?;
        let mut log = Self {
            file: BufWriter::new(file),
            records,
        };
        if keep == 0 {
            writeln!(log.file, "{HEADER}")?;
            log.file.flush()?;
        }
        Ok(log)
    }

    /// Appends a row (flushed at once, so a crash keeps what was logged).
    pub fn push(&mut self, rec: Record) -> Result<()> {
        writeln!(
            self.file,
            "{},{},{},{},{}",
            rec.iter,
            rec.split,
            rec.loss,
            opt(rec.lr),
            opt(rec.ms)
        )?;
        self.file.flush()?;
        self.records.push(rec);
        Ok(())
    }

    /// Every row so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }
}

/// The length of the part of a `loss.csv` to keep for a resume at `start` (whole lines only,
/// header included; 0 when even the header is torn) and its rows.
fn rows_to_keep(
    text: &[u8],
    start: usize,
    keep_evals_at_start: bool,
) -> Result<(usize, Vec<Record>)> {
    let mut records = Vec::new();
    let mut keep = 0;
    for (i, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let Some(line) = line.strip_suffix(b"\n") else {
            break; // torn: a run was killed while writing it
        };
        let line = String::from_utf8_lossy(line);
        if i == 0 {
            if line != HEADER {
                bail!("its first line is `{line}`, not the header `{HEADER}`; move the file away to resume");
            }
        } else {
            let rec = parse_row(&line).with_context(|| format!("line {}", i + 1))?;
            let kept = rec.iter < start
                || (rec.iter == start && rec.split != "batch" && keep_evals_at_start);
            if !kept {
                break; // the rows from here on come after the checkpoint
            }
            records.push(rec);
        }
        keep += line.len() + 1;
    }
    Ok((keep, records))
}

fn parse_row(line: &str) -> Result<Record> {
    let f: Vec<&str> = line.split(',').collect();
    let bad = || anyhow!("bad row `{line}`");
    if f.len() != 5 {
        return Err(bad());
    }
    let num = |s: &str| -> Result<Option<f64>> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad())
        }
    };
    Ok(Record {
        iter: f[0].parse().map_err(|_| bad())?,
        split: f[1].to_string(),
        loss: num(f[2])?.ok_or_else(bad)?,
        lr: num(f[3])?,
        ms: num(f[4])?,
    })
}

/// Fonts tried for the plot's text, in order.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a system font for plotters once; false when none was found.
fn load_font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).is_ok_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// Draws the batch loss and the train/val estimates against iterations into `path` (PNG).
/// Without a system font the curves are drawn without text.
pub fn plot(records: &[Record], path: &Path) -> Result<PathBuf> {
    let series = |split: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| r.split == split && r.loss.is_finite())
            .map(|r| (r.iter as f64, r.loss))
            .collect()
    };
    let (batch, train, val) = (series("batch"), series("train"), series("val"));
    let all = batch.iter().chain(&train).chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all.clone().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let y_min = all.map(|p| p.1).fold(f64::INFINITY, f64::min).min(y_max) * 0.95;
    let text = load_font();

    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("nanogpt loss", ("sans-serif", 28))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("iteration")
            .y_desc("cross-entropy loss")
            .label_style(("sans-serif", 16))
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()?;
    }
    let faint = RGBColor(150, 170, 210);
    let lines = [
        ("batch loss", batch, faint.stroke_width(1)),
        ("train loss (estimate)", train, BLUE.stroke_width(3)),
        ("val loss (estimate)", val, RED.stroke_width(3)),
    ];
    for (label, points, style) in lines {
        if points.is_empty() {
            continue;
        }
        let drawn = chart.draw_series(LineSeries::new(points, style))?;
        if text {
            drawn
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    root.present()
        .with_context(|| format!("cannot write the loss plot {}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_resume_keeps_earlier_rows_and_plot_is_written() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let row = |iter, split: &str, loss| Record {
            iter,
            split: split.into(),
            loss,
            lr: (split == "batch").then_some(1e-3),
            ms: (split == "batch").then_some(5.0),
        };
        let mut log = LossLog::create(dir.path())?;
        for i in 0..6 {
            if i % 3 == 0 {
                log.push(row(i, "train", 3.0 - i as f64 * 0.1))?;
                log.push(row(i, "val", 3.1 - i as f64 * 0.1))?;
            }
            log.push(row(i, "batch", 3.0 - i as f64 * 0.1))?;
        }
        drop(log);
        let csv = dir.path().join(LOSS_CSV);
        let whole = std::fs::read_to_string(&csv)?;
        // A run killed while writing a row leaves it torn: the resume drops it.
        std::fs::write(&csv, format!("{whole}6,batch,2.4"))?;
        let log = LossLog::resume(dir.path(), 3, true)?;
        let kept = log.records().to_vec();
        assert_eq!(kept.len(), 3 + 2 + 2);
        assert!(kept.iter().all(|r| r.iter < 3 || r.split != "batch"));
        assert_eq!(kept[0], row(0, "train", 3.0));
        drop(log);
        let cut = std::fs::read_to_string(&csv)?;
        assert!(
            whole.starts_with(&cut) && cut.lines().count() == 1 + 7,
            "{cut}"
        );
        // Without the evaluation at the checkpoint's iteration (an interrupted run's).
        assert_eq!(LossLog::resume(dir.path(), 3, false)?.records().len(), 5);
        std::fs::write(&csv, format!("{HEADER}\n0,batch,oops,,\n1,batch,2,,\n"))?;
        let e = LossLog::resume(dir.path(), 3, true).err().unwrap();
        assert!(
            format!("{e:#}").contains("line 2: bad row `0,batch,oops,,`"),
            "{e:#}"
        );
        std::fs::write(&csv, "iter,spl")?;
        assert!(LossLog::resume(dir.path(), 3, true)?.records().is_empty());
        assert_eq!(std::fs::read_to_string(&csv)?, format!("{HEADER}\n"));
        let png = plot(&kept, &dir.path().join("loss.png"))?;
        assert!(std::fs::metadata(png)?.len() > 1000);
        Ok(())
    }
}
