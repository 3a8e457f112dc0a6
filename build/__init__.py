"""Build steps that turn model checkpoints into served models.

``build.default_model`` prepares the default model (Gemma 3 270M, converted from the bundled Q4_K_M GGUF into a
plain Hugging Face checkpoint). TensorRT-LLM engine builds and model-repository rendering live in this package too.
"""
