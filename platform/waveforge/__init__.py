"""waveforge: wavelet diffusion GANs (WaveDiff) trained at cluster scale.

Layers, bottom to top (a module imports only its own layer or those below; tests/test_architecture.py):
  runtime         config (recipes), cli, dist (distributed helpers), runtime (launch env, stop flag)
  foundations     storage (fsspec), wavelet, cpu_kernels, images
  math and parts  models, diffusion (the GAN process), samplers, data
  services        checkpoint, tracking (MLflow), metrics (FID/KID, reference statistics)
  use of a model  inference (load a generator, sample), edm (the EDM family), plan (resources)
  training        train (the loop), steps (one iteration per family), checkpointer, evaluator, meters
  jobs            submit (Slurm / local dispatch), jobs (evaluate, sample), sweep
See README.md ("Architecture").
"""

__version__ = "0.1.0"
