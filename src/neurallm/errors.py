"""Errors a user can cause.

Each one carries a message that names the file or flag at fault and says what to do about it. The CLI
prints that message on one line and exits non-zero; `--debug` shows the traceback as well.
"""


class NeurallmError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class DataError(NeurallmError):
    """A corpus, a data file or a dataset name that cannot be read as asked."""


class ConfigError(NeurallmError):
    """A setting (flag) that is out of range or conflicts with another one."""


class RunDirError(NeurallmError):
    """A run directory that is missing, incomplete, inconsistent or would be overwritten."""


class TrainingError(NeurallmError):
    """Training that cannot go on (for example repeated non-finite losses)."""


class FolderInUseError(NeurallmError):
    """A run or prepared folder that another process is writing (it holds the folder's lock)."""


class DiskFullError(NeurallmError):
    """A write that ran out of disk space; the previous version of the file or folder is left as it was."""


class OutputPathError(NeurallmError):
    """An output path that names something neurallm must not write over (a run's own file, a block device, a
    folder where a file is expected); nothing was written."""


class PeerLostError(TrainingError):
    """Under torchrun, another training process died or stopped answering (every survivor reports it)."""
