"""The Gemma forward pass and what fills it: one model for Gemma 1/2/3 with config flags per generation.

    gemma     the decoder (attention, MLP, norms, rotary, sliding window); a quantized model is the
              same class with its Linears swapped
    qlinear   Linears over quantized weights (GGML blocks, FP8, INT8, packed INT4), dequantized per call
    loading   a checkpoint's tensors into the model, whole or one decoder layer at a time
"""
