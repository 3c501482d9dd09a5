"""Errors a user can fix: the CLI prints them as one line and exits with code 2.

Library callers can catch the subclasses to tell the cases apart (e.g. retry a
:class:`ConcurrentWriteError` later); the CLI treats them all as :class:`UserError`.
"""

from __future__ import annotations



class UserError(Exception):
    """Bad input (model, image, budget, artifact folder, missing tool) with the fix in the message.

    A message that names settings is built with :meth:`naming`, so that each caller reads them
    in its own spelling: a library caller ``max_seq_len``, the CLI ``--max-seq-len``.
    """

    template: str | None = None
    values: dict[str, object] = {}

    @classmethod
    def naming(cls, template: str, **values: object) -> UserError:
        """An error whose ``template`` names settings as ``{name}`` fields (the parameter's name)
        and fills ``values`` in as they are (paths, numbers)."""
        error = cls(template.format_map(_Spelled(lambda name: name, values)))
        error.template, error.values = template, values
        return error

    def spelled(self, spell) -> str:
        """The message with every setting named by ``spell(parameter_name)``."""
        return str(self) if self.template is None else self.template.format_map(_Spelled(spell, self.values))


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
    """A setting that cannot work as given; the message names settings as ``{name}`` fields."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(template.format_map(_Spelled(lambda name: name, {})))


class _Spelled(dict):
    def __init__(self, spell, values: dict[str, object]):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)
