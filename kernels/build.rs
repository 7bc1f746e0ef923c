//! Compiles `src/*.cu` to PTX with bindgen_cuda when the `cuda` feature is on, and as C++ for
//! the CPU emulator when the `emu` feature is on; without either the crate has no kernels and
//! needs no toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
    #[cfg(feature = "emu")]
    emu::build();
}

#[cfg(feature = "emu")]
mod emu {
    /// The kernels compiled as C++ together with the emulator's runtime, as a static library.
    pub fn build() {
        println!("cargo::rerun-if-changed=src");
        println!("cargo::rerun-if-changed=emu");
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file("emu/runtime.cpp")
            .include("emu/include")
            .include("emu")
            .include("src")
            .opt_level(2)
            .flag("-fno-strict-aliasing")
            .flag_if_supported("-Wno-unknown-pragmas")
            .compile("attn_kernels_emu");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    /// The target compute capability: `CUDA_COMPUTE_CAP` (e.g. `90`), else the first GPU's.
    fn compute_cap() -> usize {
        if let Ok(v) = std::env::var("CUDA_COMPUTE_CAP") {
            return v
                .trim()
                .trim_end_matches(['a', 'f'])
                .parse()
                .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={v:?} is not a number like 90"));
        }
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .expect("set CUDA_COMPUTE_CAP (e.g. 90 for H100, 80 for A100, 75 for T4): no nvidia-smi to ask");
        let first = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .replace('.', "");
        first
            .trim()
            .parse()
            .expect("nvidia-smi printed no compute capability")
    }

    fn modified(p: &Path) -> Option<SystemTime> {
        p.metadata().and_then(|m| m.modified()).ok()
    }

    pub fn build() {
        println!("cargo::rerun-if-changed=src");
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        println!("cargo::rerun-if-env-changed=CUDA_PATH");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let cap = compute_cap();
        // bindgen_cuda only recompiles a kernel whose .cu is newer than its PTX: drop PTX that is
        // older than a header (or built for another compute capability) so edits are picked up.
        let newest_header = std::fs::read_dir("src")
            .expect("src")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
            .filter_map(|p| modified(&p))
            .max();
        let stamp = out.join("compute_cap.txt");
        let same_cap =
            std::fs::read_to_string(&stamp).ok().as_deref() == Some(cap.to_string().as_str());
        for entry in std::fs::read_dir(&out).expect("OUT_DIR").flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|x| x == "ptx")
                && (!same_cap || newest_header.is_some_and(|h| modified(&p).is_none_or(|m| m < h)))
            {
                std::fs::remove_file(&p).expect("removing stale PTX");
            }
        }
        let bindings = bindgen_cuda::Builder::default()
            .kernel_paths_glob("src/*.cu")
            .include_paths_glob("src/*.cuh")
            .compute_cap(cap)
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--expt-relaxed-constexpr")
            .arg("-lineinfo")
            .build_ptx()
            .expect("compiling the attention kernels to PTX");
        bindings.write(out.join("ptx.rs")).expect("writing ptx.rs");
        std::fs::write(&stamp, cap.to_string()).expect("writing the compute capability stamp");
        println!("cargo::rustc-env=ATTN_KERNELS_COMPUTE_CAP={cap}");
    }
}
