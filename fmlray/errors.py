"""Errors a user can fix. The CLI prints their one-line message and exits with code 2."""

import zipfile
import zlib


class FmlrayError(Exception):
    """Base of every error caused by input the user can change."""


class ConfigError(FmlrayError):
    """A config file, a --set override or a combination of settings is invalid."""


class DataError(FmlrayError):
    """A dataset cannot be found or read, or a partition cannot be made."""


class TrainingError(FmlrayError):
    """Training diverged (NaN/Inf loss) or otherwise cannot go on."""


class AlgorithmError(FmlrayError):
    """An algorithm module breaks the contract of `fmlray.algorithms.base` (a new algorithm's mistake)."""


class ResourceError(FmlrayError):
    """The cluster cannot host what the config asks for."""


# How a ResourceError mid-run ends when the run's last checkpoint stands; the CLI puts the command that resumes in
# its place (`cli._resume_hint`)
RESUMABLE = "the last checkpoint is resumable"


# What numpy raises reading a damaged .npz, beyond a missing or unreadable file (OSError): a cut or altered zip, a
# member flagged encrypted or stored by a method zipfile lacks (RuntimeError, NotImplementedError), damaged deflate
# data (zlib.error), an .npy header claiming a shape too large to allocate (MemoryError) or impossible (ValueError).
DAMAGED_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RuntimeError, MemoryError, OverflowError,
               zlib.error)
