"""The ``launch/pretrain.py`` command line around Hydra: mistakes are told once, plainly.

* Overrides are checked against the schemas before Hydra composes anything, so a misspelt
  key gets "did you mean ...?" and a misspelt preset the valid ones, instead of Hydra's hint
  to add the key with ``+``.
* A config error ends every process with one message (printed by rank 0 only) and exit code
  :data:`CONFIG_ERROR_EXIT`; under torchrun the message also goes into torchrun's error file,
  so its failure summary names the cause.
* ``--nproc-per-node N`` runs the job on N local processes the way ``torchrun --standalone``
  does, after validating the config once in this process, before any worker starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ling_pretrain.config import compose_job
from ling_pretrain.config.checks import check_overrides
from ling_pretrain.config.load import NO_MODEL, has_model_override
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import validate
from ling_pretrain.train.preempt import EXIT_REFUSED

CONFIG_ERROR_EXIT = EXIT_REFUSED
"""Exit code of a run refused before any work (a config or command-line mistake)."""
SILENT_RANK_DELAY = 3.0
"""Seconds the ranks that do not print wait before exiting on a config error."""


def exit_with_config_error(err: ConfigError) -> NoReturn:
    """Print ``err`` once (rank 0), record it for torchrun, and exit every process."""
    message = f"error: {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}
        try:
            Path(error_file).write_text(json.dumps({"message": record}))
        except OSError:
            pass
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        # Every rank finds the same problem at about the same time, and torchrun stops the
        # others as soon as one exits: let rank 0 print first.
        time.sleep(SILENT_RANK_DELAY)
    sys.stdout.flush()
    os._exit(CONFIG_ERROR_EXIT)


def _take_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    rest, nproc, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc-per-node" and i + 1 < len(argv):
            nproc, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--nproc-per-node="):
            nproc = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if nproc is None:
        return None, rest
    if not str(nproc).isdigit() or int(nproc) < 1:
        raise ConfigError(f"--nproc-per-node={nproc} must be a positive number of processes.")
    return int(nproc), rest


def run_command_line(argv: Sequence[str], script: str, hydra_main: Callable[[], None]) -> None:
    """Check ``argv``, then run ``hydra_main`` here or start ``--nproc-per-node`` workers."""
    try:
        nproc, rest = _take_nproc(list(argv))
        overrides = [a for a in rest if not a.startswith("-")]
        problems = check_overrides(overrides)
        if not any(a.startswith(("-h", "--help", "--cfg", "--info")) for a in rest):
            if not has_model_override(overrides):
                problems.insert(0, NO_MODEL)
        if problems:
            raise ConfigError(
                "\n".join(f"  - {p}" for p in problems) if len(problems) > 1 else problems[0]
            )
        if nproc is not None and "WORLD_SIZE" not in os.environ:
            os.environ["LOCAL_WORLD_SIZE"] = str(nproc)
            validate(compose_job(overrides), nproc)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc-per-node={nproc}", script, *rest]
            os.execv(sys.executable, command)
    except ConfigError as err:
        exit_with_config_error(err)
    sys.argv = [script, *rest]
    hydra_main()
