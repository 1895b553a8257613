"""Generated Triton kernels for attnopt's ops (lowering targets on CUDA).

Empty until the kernel work lands: on every device the canonical op runs PyTorch's SDPA.
"""
