//! The hand-written vector code, apart from the architectures that call it: the bf16 matmul
//! kernels, the greedy head's integer screen, attention's dot products, SwiGLU's activation,
//! RMSNorm, the thread pool they share, and what the CPU offers them (`cpu`), read in one place.

pub mod attention;
pub mod bf16;
pub mod cpu;
pub mod norm;
pub mod pool;
pub mod screen;
pub mod swiglu;
