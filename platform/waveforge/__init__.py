"""waveforge: wavelet diffusion GANs (WaveDiff) trained at cluster scale.

Components (each testable alone): config (recipes), dist (tiny distributed helpers), wavelet, models,
diffusion, data, train, checkpoint, tracking, evaluate, launch. See README.md.
"""

__version__ = "0.1.0"
