"""The one command-line grammar of every entry point in jobs/.

    python jobs/<job>.py recipe=NAME [key=value ...] [job keys] [--print-config] [--dry-run] [--json]

`key=value` items are recipe overrides (dotted keys or the short aliases of `waveforge.config.ALIASES`);
job keys are the few extra arguments of one job (e.g. `source=` of make_shards). Any error in them
prints `error: ...` on stderr and exits with status 2 before anything is started.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from waveforge import config

COMMON_FLAGS = {
    "--print-config": "print the resolved recipe (YAML, secrets masked) and exit",
    "--print-keys": "list every recipe key with its default and exit",
}


@dataclass
class Args:
    cfg: config.Recipe | None  # the resolved, validated recipe (None for jobs without one)
    job: dict[str, Any] = field(default_factory=dict)  # job keys given (parsed values)
    flags: set[str] = field(default_factory=set)  # flags given, e.g. {"--dry-run"}
    overrides: list[str] = field(default_factory=list)  # the recipe overrides as typed


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _usage(prog: str, description: str, job_keys: dict[str, str], flags: dict[str, str], recipe: bool) -> str:
    lines = [f"usage: python jobs/{prog}.py {'recipe=NAME [key=value ...] ' if recipe else ''}"
             f"{' '.join(k + '=...' for k in job_keys)} [flags]", "", description.strip(), ""]
    if recipe:
        lines += ["recipe:", f"  recipe=NAME          one of: {', '.join(config.available_recipes())}",
                  "  key=value            override any recipe key, e.g. train.lr_g=1e-4 model.nf=32",
                  "  short aliases        " + ", ".join(f"{a} (= {k})" for a, k in config.ALIASES.items()), ""]
    if job_keys:
        lines.append("job keys:")
        lines += [f"  {k + '=...':<20} {h}" for k, h in job_keys.items()]
        lines.append("")
    lines.append("flags:")
    lines += [f"  {k:<20} {h}" for k, h in {**flags, **(COMMON_FLAGS if recipe else {})}.items()]
    lines += ["  --help, -h           show this help and exit", "",
              "Bad input (unknown key, wrong type, value out of range, unknown recipe) exits with status 2."]
    return "\n".join(lines)


def parse(argv: Sequence[str], prog: str, description: str, job_keys: dict[str, str] | None = None,
          flags: dict[str, str] | None = None, recipe: bool = True, default_recipe: str = "tiny",
          require: Sequence[str] = ()) -> Args:
    """Parse `argv` (without the program name). Exits 0 on --help, 2 on any error."""
    job_keys = job_keys or {}
    flags = flags or {}
    known_flags = set(flags) | (set(COMMON_FLAGS) if recipe else set())
    given_flags: set[str] = set()
    overrides: list[str] = []
    job: dict[str, Any] = {}
    name = default_recipe
    for item in argv:
        if item in ("-h", "--help"):
            print(_usage(prog, description, job_keys, flags, recipe))
            raise SystemExit(0)
        if item.startswith("--"):
            if item not in known_flags:
                import difflib

                close = difflib.get_close_matches(item, sorted(known_flags), n=2)
                fail(f"unknown flag {item!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                     + f" (see python jobs/{prog}.py --help)")
            given_flags.add(item)
            continue
        try:
            key, value = config.split_override(item)
        except config.ConfigError as e:
            fail(str(e))
        if key == "recipe" and recipe:
            name = str(value)
        elif key in job_keys:
            job[key] = value
        elif recipe:
            overrides.append(item)
        else:
            import difflib

            close = difflib.get_close_matches(key, list(job_keys), n=3)
            fail(f"unknown key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                 + f" (valid keys: {', '.join(job_keys)})")
    for k in require:
        if k not in job:
            fail(f"missing {k}=... ({job_keys.get(k, '')})")
    cfg = None
    if recipe:
        if "--print-keys" in given_flags:
            defaults = config.flat(config.Recipe())
            for k in config.all_keys():
                print(f"{k} = {defaults[k]!r}")
            raise SystemExit(0)
        try:
            cfg = config.load(name, overrides)
        except config.ConfigError as e:
            fail(str(e))
        if "--print-config" in given_flags:
            print(config.to_yaml(cfg), end="")
            raise SystemExit(0)
    return Args(cfg=cfg, job=job, flags=given_flags, overrides=overrides)


def run_main(fn: Callable[[], Any]) -> None:
    """Run an entry point's main: a user's mistake (config.UserError: a bad value, path, file, credentials,
    address) anywhere becomes one line `error: ...` and exit status 2, without a traceback."""
    try:
        fn()
    except config.UserError as e:
        fail(one_line(e))


def one_line(e: BaseException) -> str:
    """An error's message as one line (its first; the details of a long one stay in logs)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__
