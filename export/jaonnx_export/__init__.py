"""jaonnx_export: PyTorch checkpoints to jaonnx ONNX artifacts (needs jaonnx[export])."""
