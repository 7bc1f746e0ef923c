//! Compiles `src/*.cu` to PTX when the `cuda` feature is on; without it the crate has no kernels.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build() {
        println!("cargo::rerun-if-changed=src");
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        println!("cargo::rerun-if-env-changed=CUDA_PATH");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let builder = bindgen_cuda::Builder::default()
            .kernel_paths_glob("src/*.cu")
            .include_paths_glob("src/*.cuh")
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--expt-relaxed-constexpr")
            .arg("-lineinfo");
        let bindings = builder.build_ptx().expect("compiling the attention kernels to PTX");
        bindings.write(out.join("ptx.rs")).expect("writing ptx.rs");
    }
}
