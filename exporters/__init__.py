"""ONNX export (TensorRT and CPU flavours), TensorRT build, validation and Triton packaging."""
