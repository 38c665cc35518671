"""One quantization run, start to finish (qwenquant/runner/run.py), and the mixed-precision driver over runs."""
