"""CUDA platform: Triton paged attention and fused ops, CUDA graphs."""
