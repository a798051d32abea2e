"""Graph passes and analyses, one per file: channel_flow (match), check_config, fold, emit_onnx."""
