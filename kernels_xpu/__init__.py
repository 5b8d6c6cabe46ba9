"""Intel GPU (XPU) platform: torch.xpu, the CUDA platform's Triton kernels through Intel's Triton backend, oneCCL."""
