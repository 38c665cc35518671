"""The data-free path: recipes whose quantizer needs no calibration data stream the source safetensors through
the quantizer into the output shards, tensor by tensor, without building the model (`eligibility.py` decides)."""
