"""AWQ int4 quantization: packing (pack.py), quantized modules (modules.py), the activation-aware
scale and clip search (awq.py), calibration over a model and the quantized run directory
(calibrate.py), and AutoAWQ checkpoints in and out (hf_awq.py).

Nothing is imported here: `dropless.ops` imports `pack` and `modules` imports `dropless.ops`.
"""
