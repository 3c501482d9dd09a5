"""Errors a user can fix: the CLI prints them as one line and exits with code 2.

Library callers can catch the subclasses to tell the cases apart (e.g. retry a
:class:`ConcurrentWriteError` later); the CLI treats them all as :class:`UserError`.
"""


class UserError(Exception):
    """Bad input (model, image, budget, artifact folder, missing tool) with the fix in the message."""


class CheckpointError(UserError):
    """A model folder or its config.json that VisionDrop cannot load or does not support."""


class ArtifactError(UserError):
    """An artifact folder or manifest that cannot be trusted (edited, incomplete, malformed)."""


class InputError(UserError):
    """An image or prompt that cannot be used as given."""


class OutputError(UserError):
    """An output path that cannot be written, or whose replacement would destroy data."""


class ConcurrentWriteError(OutputError):
    """Another process is writing the same output folder right now."""



class SettingError(UserError):
    """A setting that cannot work as given. The message names settings as ``{name}`` fields
    (the parameter's name): a library caller reads ``max_seq_len``, the CLI ``--max-seq-len``."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell) -> str:
        """The message with every setting named by ``spell(parameter_name)``."""
        return self.template.format_map(_Spelled(spell))


class _Spelled(dict):
    def __init__(self, spell):
        super().__init__()
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)
