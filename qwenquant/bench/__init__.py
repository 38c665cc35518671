"""`qwenquant bench`: prefill/decode speed, memory split and bandwidth bound of a checkpoint, run through the
low-precision kernels of `qwenquant.kernels`. Result schema: `qwenquant.bench.output`."""
