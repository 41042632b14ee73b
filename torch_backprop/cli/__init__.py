"""The ``torch-backprop`` command: one file per subcommand, and what they share.

* ``command``: the dispatcher (``main``), which imports a subcommand's file when it is used;
* ``train``: the ``train`` command: options, the training loop, the process group;
  ``run_folder``: its files (checkpoint, ``--resume``, the lock on ``--out``); ``data``: the datasets;
  ``private``: ``train --dp`` (Poisson batches, the DP step of either backend, Opacus's accountant);
* ``verify``: the ``verify`` command;
* ``bench``: the ``bench`` command: the grid of cases and contenders and their measurement;
  ``bench_report``: its table and chart; ``timing``: interleaved rounds (also used by
  ``benchmarks/``);
* ``options``: the command-line convention that every command and example shares (``CommandParser``,
  the widths format, option types, ``ConfigError``, ``--device``); ``files``: atomic writes.

Import rule: the commands may import any of the library (``torch_backprop.core``, ``firstorder``,
``secondorder``); nothing in the library imports ``torch_backprop.cli``.
"""

from .command import main

__all__ = ["main"]
