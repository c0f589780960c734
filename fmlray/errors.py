"""Errors a user can fix. The CLI prints their one-line message and exits with code 2."""


class FmlrayError(Exception):
    """Base of every error caused by input the user can change."""


class ConfigError(FmlrayError):
    """A config file, a --set override or a combination of settings is invalid."""


class DataError(FmlrayError):
    """A dataset cannot be found or read, or a partition cannot be made."""


class TrainingError(FmlrayError):
    """Training diverged (NaN/Inf loss) or otherwise cannot go on."""


class ResourceError(FmlrayError):
    """The cluster cannot host what the config asks for."""
