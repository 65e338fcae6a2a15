"""What quantization cost, measured: open any artifact as the built-in model, and score it.

    artifact      open a GGUF file or an HF checkpoint as a Gemma with quantized Linears (open_artifact)
    ct_artifact   the same for a compressed-tensors directory
    eval_model    a model + tokenizer ready for `eval` (open_for_eval)
    perplexity    llama-perplexity's chunking and statistics
    drift         KL / top-1 / per-layer error of an artifact against its base
    inspect       what a checkpoint, an output or any GGUF holds, from headers only
"""
