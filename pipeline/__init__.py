"""zsaq-pipeline: data-free quantization of fine-tuned language models into int8/int4 inference engines."""

__version__ = "0.1.0"
