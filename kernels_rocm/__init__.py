"""ROCm/HIP platform: AMD GPUs through torch's HIP build, the CUDA platform's Triton kernels with AMD launch tuning."""
