"""Checkpoints: sharded DeepSpeed save, atomic publication, background upload, resume, reshard, export.

A checkpoint is one folder `RUN_DIR/checkpoints/step-000000123/`:

    manifest.json            written last: every file below with its size and BLAKE3 digest, world size, step
    state.pt                 the trainer's state dict (step, images, loader state, run id, recipe, code version)
    ema.safetensors          the EMA generator (full, not sharded)
    rng/rank-00000.pt        each rank's RNG states (torch, cuda, numpy, python)
    G/, D/                   each DeepSpeed engine's own checkpoint (ZeRO partitions written by every rank)
    G_universal/, ...        (only after a resume on another world size) DeepSpeed's universal format, derived

Publication is atomic: every rank writes under `checkpoints/.tmp-000000123/` (its files in parallel, each
hashed while written and fsynced) and leaves its files' sums next to it; rank 0, once every rank's sums are
there, checks the files, writes the manifest, renames the folder to `step-...` and only then replaces the
`latest` pointer file (temp file + fsync + os.replace). A process killed at any moment leaves the previous
checkpoint loadable; `.tmp-*` leftovers are removed by the next save or resume. A checkpoint is complete
iff its manifest exists and every file it lists has the listed size. `Saver(background=True)` returns
from a save after a snapshot of the state and writes and publishes in background threads (see writer).

Verification: before anything of a checkpoint is loaded (DeepSpeed unpickles its shards with
weights_only=False), every file is checked against the manifest's size and digest, the files split over the
ranks (`verify`; `Verification` runs the same check in the background while a trainer builds its models).
A resume takes the newest candidate that verifies and says which ones it passed over (`resume_candidates`,
`start_verification`, `first_verified`, `find_resume`); export checks the files it reads and refuses
non-finite weights. Modules: files (names, manifest, hashing, verification, RNG, plain state), writer
(save, Saver), remote (upload, download, Uploader), upload_worker (the upload process), reader (resume,
universal format, load), export.

Object storage: DeepSpeed writes local paths only, so a checkpoint is published locally first and then
copied by `Uploader` (rank 0; a separate low-priority process with a bandwidth bound, see upload_worker)
to `URL/step-.../`: the files, then the manifest (a remote checkpoint is complete iff its manifest
exists), then `URL/latest`. The URL is used as given: it is the remote twin of `RUN_DIR/checkpoints/`
(pass a per-run URL).

Call order in a trainer (every function marked COLLECTIVE is called by every rank):

    ckpt = find_resume(run_dir, cfg.run.resume, url=..., storage=...)   # COLLECTIVE, before the engines
    patch = ds_config_patch(ckpt, world) if ckpt else {}                 # COLLECTIVE; add to each DS config
    engines = {"G": deepspeed.initialize(...), "D": ...}
    state = load(ckpt, engines, ema) if ckpt else fresh                  # COLLECTIVE
    uploader = Uploader(url, storage, mb_s=...) if url and rank == 0 else None
    saver = Saver(background=True)
    ... saver.save(run_dir, step, engines, ema, state, keep_last=..., uploader=uploader) ...  # COLLECTIVE
    saver.close(); uploader.close()                                      # at the end; close returns the error count

(`save(...)`, the function, is a save that returns once published.)

(`waveforge.checkpointer.Checkpointer` does all of this for the trainer.)

Everything this package writes itself is loaded as data (`torch.load(weights_only=True)`, safetensors);
DeepSpeed's own shard files are read by DeepSpeed, which uses `torch.load(weights_only=False)` internally:
they are verified against the manifest first, so a swapped or corrupted shard is never unpickled (the
manifest itself is trusted: only resume from checkpoints whose folder you trust).
"""

from waveforge.checkpoint.export import CONFIG_FILE, GENERATOR_FILE, export, read_export, write_export
from waveforge.checkpoint.files import (
    EMA,
    LATEST,
    MANIFEST,
    STATE,
    CheckpointError,
    Verification,
    ckpt_root,
    complete_checkpoints,
    is_complete,
    read_manifest,
    step_name,
    verify,
    verify_files,
)
from waveforge.checkpoint.reader import (
    ds_config_patch,
    find_resume,
    first_verified,
    load,
    needs_universal,
    prepare_universal,
    read_state,
    resume_candidates,
    start_verification,
)
from waveforge.checkpoint.remote import Uploader, download, upload
from waveforge.checkpoint.writer import Saver, save

__all__ = ["CONFIG_FILE", "EMA", "GENERATOR_FILE", "LATEST", "MANIFEST", "STATE", "CheckpointError", "Saver",
           "Uploader", "ckpt_root", "complete_checkpoints", "download", "ds_config_patch", "export",
           "find_resume", "first_verified", "is_complete", "load", "needs_universal", "prepare_universal",
           "read_export", "read_manifest", "read_state", "resume_candidates", "save", "start_verification",
           "step_name", "upload", "Verification", "verify", "verify_files", "write_export"]
