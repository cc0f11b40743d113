"""The batch engine: a folder of images in, one table row per file out (knows nothing of ``DACrop``).

Rooms: :mod:`~dac.jobs.inputs` (finding inputs, naming outputs), :mod:`~dac.jobs.table`
(the CSV table and its journals), :mod:`~dac.jobs.settings` (digests of what changes an
output), :mod:`~dac.jobs.folder` (the results folder: checks, locks),
:mod:`~dac.jobs.engine` (:func:`run_archive` and :class:`ArchiveTask`). The tasks that
use it live in :mod:`dac.tasks`.
"""
from .engine import ArchiveSummary, ArchiveTask, default_workers, run_archive, search_threads, shard_from_environment
from .folder import check_out_dir, discard_outputs
from .inputs import Found, find_inputs, output_name
from .settings import module_settings, settings_digest, weights_digest
from .table import ARCHIVE_FIELDS, number_cell

__all__ = [
    "ARCHIVE_FIELDS",
    "ArchiveSummary",
    "ArchiveTask",
    "Found",
    "check_out_dir",
    "default_workers",
    "discard_outputs",
    "find_inputs",
    "module_settings",
    "number_cell",
    "output_name",
    "run_archive",
    "search_threads",
    "settings_digest",
    "shard_from_environment",
    "weights_digest",
]
