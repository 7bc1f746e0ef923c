//! Checkpoints: exact round trip, and clear errors for corrupt or incompatible ones.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{prepared_data, run, tiny_config};
use nanogpt::checkpoint::{self, Meta};
use nanogpt::config::InitFrom;
use nanogpt::model::{init_weights, Gpt, ModelConfig};
use nanogpt::rng::Rng;
use nanogpt::train::{train, TrainOptions};

fn tiny_model(varmap: &VarMap, cfg: &ModelConfig) -> Gpt {
    let model = Gpt::new(
        cfg,
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu),
        true,
    )
    .unwrap();
    init_weights(varmap, cfg.n_layer, &mut Rng::new(9, 0)).unwrap();
    model
}

fn values(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        vocab_size: 11,
        block_size: 8,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        dropout: 0.0,
        bias: true,
    };
    let varmap = VarMap::new();
    tiny_model(&varmap, &cfg);
    let moment = Tensor::new(&[1.5f32, -2.25], &Device::Cpu).unwrap();
    let meta = Meta {
        train_config: nanogpt::config::TrainConfig::from_toml(nanogpt::config::CPU_RECIPE).unwrap(),
        model_config: cfg.clone(),
        iter_num: 250,
        best_val_loss: 1.234_567_890_123,
        optim_step: 250,
        rng_state: Rng::new(1, 2).to_state_string(),
        attn_seeds: vec![u64::MAX, 3],
        tokenizer: "{\"kind\":\"char\",\"chars\":\"abc\"}".into(),
        eval_pending: true,
    };
    let path = dir.path().join("out").join(checkpoint::FILE_NAME);
    checkpoint::save(
        &path,
        &varmap,
        vec![("optim.m.x".into(), moment.clone())],
        &meta,
    )
    .unwrap();
    // Only the checkpoint: no temporary is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ckpt.safetensors"]);
    let ckpt = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(ckpt.meta.train_config, meta.train_config);
    assert_eq!(ckpt.meta.model_config, cfg);
    assert_eq!((ckpt.meta.iter_num, ckpt.meta.optim_step), (250, 250));
    assert_eq!(ckpt.meta.best_val_loss, meta.best_val_loss);
    assert_eq!(ckpt.meta.rng_state, meta.rng_state);
    assert_eq!(ckpt.meta.attn_seeds, meta.attn_seeds);
    assert_eq!(ckpt.meta.tokenizer, meta.tokenizer);
    assert!(ckpt.meta.eval_pending);
    assert_eq!(values(&ckpt.tensors["optim.m.x"]), values(&moment));
    let restored = VarMap::new();
    tiny_model(&restored, &cfg);
    init_weights(&restored, cfg.n_layer, &mut Rng::new(10, 0)).unwrap();
    ckpt.restore_params(&restored).unwrap();
    let (a, b) = (
        varmap.data().lock().unwrap(),
        restored.data().lock().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, var) in a.iter() {
        assert_eq!(
            values(var.as_tensor()),
            values(b[name].as_tensor()),
            "{name}"
        );
    }
}

#[test]
fn corrupt_and_incompatible_checkpoints_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_data(dir.path());
    let mut cfg = tiny_config(&data, &dir.path().join("out"));
    cfg.max_iters = 2;
    cfg.eval_interval = 1;
    cfg.always_save_checkpoint = true;
    run(&cfg);
    let path = checkpoint::path_in(&cfg.out_dir);
    let good = std::fs::read(&path).unwrap();
    let resume = |c: &nanogpt::config::TrainConfig| {
        let mut c = c.clone();
        c.init_from = InitFrom::Resume;
        c.max_iters = 3;
        let opts = TrainOptions {
            config: c,
            device: Device::Cpu,
            dtype: DType::F32,
            progress: false,
            overwrite: false,
        };
        format!("{:#}", train(&opts).expect_err("resume should fail"))
    };

    let mut wider = cfg.clone();
    wider.n_layer = 3;
    assert!(resume(&wider).contains("it has n-layer = 2 but the configuration asks for 3"));
    let mut longer = cfg.clone();
    longer.block_size = 32;
    assert!(resume(&longer).contains("block-size 32 is larger than the checkpoint's 16"));

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let e = resume(&cfg);
    assert!(
        e.contains("not a valid nanogpt checkpoint") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&path, b"definitely not safetensors").unwrap();
    assert!(resume(&cfg).contains("not a valid nanogpt checkpoint"));
    std::fs::remove_file(&path).unwrap();
    assert!(resume(&cfg).contains("no checkpoint at"));

    // A smaller block size crops the position embedding and resumes.
    std::fs::write(&path, &good).unwrap();
    let mut shorter = cfg.clone();
    shorter.block_size = 8;
    shorter.init_from = InitFrom::Resume;
    shorter.max_iters = 3;
    run(&shorter);
}
