"""Inference with Omega routing: GGUF on llama-cpp-python (``ZptrLlama``) and the PyTorch path.

Import the pieces from their modules (``runtime.engine``, ``runtime.reference``,
``runtime.omega``, ``runtime.llama``): importing ``runtime`` alone loads nothing heavy.
"""
