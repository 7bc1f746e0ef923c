//! What training does to an out-dir: one run at a time, no silent replacement of an earlier
//! run, a loss history that survives torn writes, SIGINT/SIGTERM with a final checkpoint, and
//! SIGKILL at random moments followed by a resume that ends as the uninterrupted run.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails_with, resume_args, succeeds, TINY_MODEL};

/// A tiny model that evaluates (one batch) and saves every 2 iterations, with dropout so that
/// the generator state matters on resume.
fn tiny(out: &str, max_iters: &str) -> Vec<String> {
    let run = [
        "train",
        "--out-dir",
        out,
        "--eval-iters",
        "1",
        "--eval-interval",
        "2",
        "--dropout",
        "0.1",
        "--always-save-checkpoint",
        "true",
        "--max-iters",
        max_iters,
    ];
    [&run[..], TINY_MODEL]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    spawn_with(dir, args, Stdio::piped())
}

/// [`spawn`] with `stderr` where the child's standard error goes.
fn spawn_with(dir: &Path, args: &[String], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nanogpt"))
        .current_dir(dir)
        .env_remove("NANOGPT_INPUT")
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// Waits (up to a minute) until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Number of training-batch rows in `out/loss.csv`.
fn batch_rows(out: &Path) -> usize {
    std::fs::read_to_string(out.join("loss.csv"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(",batch,"))
        .count()
}

/// The `iter,split,loss` columns of `loss.csv` (not the timings).
fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("loss.csv"))
        .unwrap()
        .lines()
        .map(|l| l.splitn(4, ',').take(3).collect::<Vec<_>>().join(","))
        .collect()
}

fn same_checkpoint(a: &Path, b: &Path) {
    let load = |p: &Path| {
        nanogpt::checkpoint::load(&p.join("ckpt.safetensors"), &candle_core::Device::Cpu).unwrap()
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.meta.iter_num, b.meta.iter_num);
    assert_eq!(a.meta.rng_state, b.meta.rng_state);
    assert_eq!(a.meta.optim_step, b.meta.optim_step);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(t), bits(&b.tensors[name]), "{name} differs");
    }
}

fn prepared() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.txt"), common::corpus()).unwrap();
    succeeds(dir.path(), &["prepare", "--input", "input.txt"]);
    dir
}

#[test]
fn fresh_runs_do_not_replace_an_earlier_run_and_resume_repairs_a_torn_row() {
    let dir = prepared();
    let d = dir.path();
    let out = d.join("out");
    succeeds(d, &strs(&tiny("out", "4")));
    let csv = std::fs::read(out.join("loss.csv")).unwrap();
    fails_with(
        d,
        &strs(&tiny("out", "6")),
        "holds the checkpoint of an earlier run",
    );
    assert_eq!(
        std::fs::read(out.join("loss.csv")).unwrap(),
        csv,
        "loss.csv untouched"
    );

    // A run killed while writing a row leaves it torn; the resume drops it and goes on.
    let mut torn = csv.clone();
    torn.extend_from_slice(b"4,batch,1.2");
    std::fs::write(out.join("loss.csv"), &torn).unwrap();
    let resume = resume_args("out");
    succeeds(d, &[&resume[..], &["--max-iters", "6"]].concat());
    assert_eq!(batch_rows(&out), 6);
    assert!(std::fs::read_to_string(out.join("loss.csv"))
        .unwrap()
        .ends_with('\n'));

    // Only the lock, the checkpoint and the history: without the checkpoint, a fresh run still
    // refuses to replace the history.
    std::fs::remove_file(out.join("ckpt.safetensors")).unwrap();
    fails_with(
        d,
        &strs(&tiny("out", "2")),
        "holds the loss history of an earlier run",
    );
    let mut args = tiny("out", "2");
    args.push("--overwrite".into());
    succeeds(d, &strs(&args));
    assert_eq!(batch_rows(&out), 2, "the replaced run's rows are gone");
}

#[test]
fn one_run_per_out_dir_and_signals_stop_with_a_checkpoint() {
    let dir = prepared();
    let d = dir.path();
    let out = d.join("out");
    let first = spawn(d, &tiny("out", "100000"));
    wait_for("a checkpoint", || out.join("ckpt.safetensors").is_file());
    let pid = first.id().to_string();
    fails_with(
        d,
        &strs(&tiny("out", "4")),
        &format!("in use by another training run (pid {pid})"),
    );
    let resume = resume_args("out");
    fails_with(d, &resume, "in use by another training run");

    // SIGINT: the step finishes, a checkpoint is saved, the exit status says SIGINT.
    signal(&first, libc::SIGINT);
    let done = first.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted by SIGINT at iteration")
            && err.contains("checkpoint saved to out/ckpt.safetensors"),
        "{err}"
    );
    let stopped_at =
        nanogpt::checkpoint::load(&out.join("ckpt.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
            .meta
            .iter_num;
    assert_eq!(batch_rows(&out), stopped_at, "a row per finished step");
    let (stdout, _) = succeeds(
        d,
        &[&resume[..], &["--max-iters", &(stopped_at + 2).to_string()]].concat(),
    );
    assert!(
        stdout.contains(&format!("done at iteration {}", stopped_at + 2)),
        "{stdout}"
    );

    // SIGTERM twice: the second one ends the process at once, without saving. (It is sent once
    // the first was handled: two pending signals of one kind merge into one.)
    // A larger model, so that a step lasts long enough for the second signal to come during it.
    let mut args = tiny("out2", "100000");
    for (flag, value) in [
        ("--n-embd", "256"),
        ("--block-size", "64"),
        ("--batch-size", "32"),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.into();
    }
    let mut second = spawn(d, &args);
    wait_for("training to start", || batch_rows(&d.join("out2")) > 0);
    signal(&second, libc::SIGTERM);
    let mut err = std::io::BufReader::new(second.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("stopping after this step") {
        let n = std::io::BufRead::read_line(&mut err, &mut seen).unwrap();
        assert!(n > 0, "no word of the first signal:\n{seen}");
    }
    signal(&second, libc::SIGTERM);
    std::io::Read::read_to_string(&mut err, &mut seen).unwrap();
    let status = second.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{seen}");
    assert!(
        seen.contains("quitting at once") && !seen.contains("checkpoint saved"),
        "{seen}"
    );
}

/// SIGKILL at random moments (during steps, evaluations and checkpoint writes), resume after
/// each: the final checkpoint and loss history equal those of a run never interrupted.
#[test]
fn killed_and_resumed_runs_end_as_the_uninterrupted_run() {
    const ITERS: &str = "100";
    let dir = prepared();
    let d = dir.path();
    // The uninterrupted run, timed: until its first checkpoint exists, and in all.
    let t0 = Instant::now();
    // (Its standard error unread, so not piped: a full pipe would stall it.)
    let mut whole = spawn_with(d, &tiny("whole", ITERS), Stdio::null());
    wait_for("a checkpoint", || {
        d.join("whole/ckpt.safetensors").is_file()
    });
    let first_us = t0.elapsed().as_micros() as u64;
    assert!(
        whole.wait().unwrap().success(),
        "the uninterrupted run failed"
    );
    // Kills come at a uniform moment of the first half of what is left of a run once its first
    // checkpoint exists (a save every 2 iterations: many land inside checkpoint writes), so that
    // the first round's kill lands before that run's end however fast the runs are (measured
    // from the whole run's time, which included its start, they were not always: with a time
    // drawn from the whole run's length, all four rounds could end first).
    let left_us = (t0.elapsed().as_micros() as u64).saturating_sub(first_us) / 2;

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill delays drawn with seed {seed}");
    let mut rng = nanogpt::rng::Rng::new(seed, 0);
    let out = d.join("killed");
    let resume: Vec<String> = resume_args("killed").map(String::from).to_vec();
    let mut kills = 0;
    for round in 0..4 {
        let args = if round == 0 {
            tiny("killed", ITERS)
        } else {
            resume.clone()
        };
        let mut child = spawn(d, &args);
        wait_for("a checkpoint", || out.join("ckpt.safetensors").is_file());
        std::thread::sleep(Duration::from_micros(rng.below(left_us.max(1))));
        signal(&child, libc::SIGKILL);
        let status = child.wait().unwrap();
        kills += usize::from(status.code().is_none());
    }
    assert!(
        kills > 0,
        "no run was killed: the runs are too short for this test"
    );
    succeeds(d, &strs(&resume));
    same_checkpoint(&d.join("whole"), &out);
    assert_eq!(losses(&d.join("whole")), losses(&out));
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["ckpt.safetensors", "loss.csv", "loss.png", "train.lock"],
        "no temporaries left"
    );
}
