//! PTX of the attention kernels (filled by the CUDA kernels issue).
