"""Import an official WaveDiff / DDGAN generator as a waveforge export, and a training state as a waveforge
checkpoint to fine-tune from (one process, no GPU needed).

    python jobs/import_reference.py checkpoint=EXP/netG_475.pth recipe=celebahq256 out=imports/celebahq256
    python jobs/import_reference.py checkpoint=EXP/content.pth recipe=cifar10 out=imports/cifar10
    python jobs/sample.py run=imports/celebahq256 num=64 --grid
    python jobs/train.py recipe=cifar10 resume=imports/cifar10 run.dir=runs/cifar10-finetune   # content.pth

checkpoint= is the reference's netG_<epoch>.pth (with or without DDP's `module.` prefix) or its content.pth
(the EMA generator is exported, or the raw one if the run had no EMA; and OUT/checkpoints/step-N holds G,
D, the EMA, both Adam optimizers' moments and the step and image counters, for jobs/train.py resume=OUT).
The recipe's model section must be the checkpoint's architecture (the official runs' recipes are:
cifar10, stl10, celebahq256, celebahq512, celebahq1024, lsun_church256). Writes OUT/generator_ema.safetensors
and OUT/model_config.json, the format jobs/export.py writes, for jobs/sample.py run=OUT and
jobs/evaluate.py checkpoint=OUT. bands= is the band order of the checkpoint's input/output: wavediff (the
reference's own DWT) or pytorch_wavelets (--use_pytorch_wavelet); the default is the official run's for
the recipe. A file that is not such a checkpoint, or keys and shapes that do not fit the recipe, exit with
status 2 and write nothing.
"""

import sys

from waveforge import cli

JOB_KEYS = {
    "checkpoint": "the reference's netG_*.pth or content.pth (required)",
    "out": "output folder of the export (required)",
    "bands": "input/output band order of the checkpoint: wavediff or pytorch_wavelets (default: the recipe's run)",
}


def main() -> None:
    args = cli.parse(sys.argv[1:], "import_reference", __doc__, job_keys=JOB_KEYS, require=["checkpoint", "out"])
    from waveforge import jobs

    bands = args.job.get("bands")
    summary = jobs.import_reference(args.cfg, str(args.job["checkpoint"]), str(args.job["out"]),
                                    bands=str(bands) if bands is not None else None)
    print(f"imported {summary['kind']} ({summary['weights']}, {summary['parameters'] / 1e6:.3f}M parameters, "
          f"bands {summary['bands']}) as recipe {args.cfg.recipe}: wrote {summary['out']}/generator_ema.safetensors "
          f"and model_config.json")
    if "checkpoint" in summary:
        print(f"training state at step {summary['step']}: {summary['checkpoint']}; fine-tune with "
              f"python jobs/train.py recipe={args.cfg.recipe} resume={summary['out']} run.dir=runs/...")


if __name__ == "__main__":
    cli.run_main(main)
