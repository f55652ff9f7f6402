"""Config errors: every problem of a config, reported together.

A config is checked in full before anything fails, so that one run of
``chatlearn validate`` (or one failed ``load_config``) shows all that is wrong
instead of one problem per attempt. Each problem names the file it comes from,
the key path inside the config and what was expected::

    configs/rlhf.yaml: runtime.num_episode: expected int, got 'abc' (str)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

# The pseudo-file named by problems that come from ``overrides`` (the command
# line or the ``overrides=`` argument of ``load_config``), not from a YAML file.
OVERRIDES_SOURCE = "<overrides>"


def display_path(path: str) -> str:
    """A file path as it reads best in a message: relative to the cwd when below it."""
    if not path or path.startswith("<"):
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (file, key path) and what."""

    file: str  # absolute path of the YAML file, or OVERRIDES_SOURCE, or "" if unknown
    key: str  # e.g. "models.policy.num_cpu"; "" for a problem with the whole file
    message: str  # e.g. "expected int, got 'abc' (str)"

    def __str__(self) -> str:
        parts = [p for p in (display_path(self.file), self.key) if p]
        return ": ".join(parts + [self.message])


class ConfigError(ValueError):
    """A config that cannot be used. ``str(err)`` lists every problem, one per line."""

    def __init__(self, issues: Union[Iterable[ConfigIssue], str]):
        if isinstance(issues, str):
            issues = [ConfigIssue("", "", issues)]
        self.issues: list[ConfigIssue] = list(issues)
        # What the loader warned about besides (see IssueCollector.warnings).
        self.warnings: list[str] = []
        super().__init__("\n".join(str(i) for i in self.issues))


class IssueCollector:
    """Collects problems while a config is read and checked; raises them all at the end.

    ``sources`` maps key paths (tuples such as ``("models", "policy", "num_cpu")``)
    to the file that set them, so that a problem found at any depth names the
    right file, includes and overrides included; a path without an entry takes
    its nearest parent's file, and finally ``main_file``.

    ``bad`` remembers the key paths that already have a problem, so that later
    cross-field checks can skip them instead of piling up follow-on errors.

    ``env_text`` maps the key paths whose value the loader typed from a whole
    ``${name:default}`` expression to ``(typed value, text)``: where the schema
    wants a string, the text is used (``exp_name=2024`` gives ``"2024"``, since
    an environment variable cannot be quoted).

    ``unset_env`` maps the key paths that are None because ``${name}`` named an
    unset variable (ChatLearn 1.x's rule) to those names, so that a key that
    needs a value can say which variable to set.

    ``warnings`` are problems that do not stop the config (a ChatLearn 1.x key
    without effect here, an unset variable, a key given twice), in the same
    ``file: key: message`` form.
    """

    def __init__(self, main_file: str = "", sources: Optional[dict[tuple, str]] = None) -> None:
        self.main_file = main_file
        self.sources: dict[tuple, str] = sources if sources is not None else {}
        self.issues: list[ConfigIssue] = []
        self.bad: set[tuple] = set()
        self.env_text: dict[tuple, tuple[Any, str]] = {}
        self.unset_env: dict[tuple, list[str]] = {}
        self.warnings: list[str] = []

    def text_from_env(self, path: tuple, value: Any) -> Optional[str]:
        """The text ``value`` was typed from, if the loader typed it from ``${name:default}`` at ``path``."""
        found = self.env_text.get(tuple(path))
        if found is None or type(found[0]) is not type(value) or found[0] != value:
            return None
        return found[1]

    def file_for(self, path: tuple) -> str:
        for n in range(len(path), -1, -1):
            file = self.sources.get(tuple(path[:n]))
            if file is not None:
                return file
        return self.main_file

    def base_dir_for(self, path: tuple) -> str:
        """The directory a relative path written at ``path`` is resolved from."""
        file = self.file_for(path)
        if not file or file.startswith("<"):  # overrides: relative to where the command runs
            return os.getcwd()
        return os.path.dirname(file)

    def add(self, path: tuple, message: str) -> None:
        """A problem with the value at ``path``; the file comes from ``sources``."""
        self.add_at(self.file_for(path), format_key(path), message)
        self.bad.add(tuple(path))

    def add_at(self, file: str, key: str, message: str) -> None:
        """A problem whose file is known directly (e.g. a YAML syntax error)."""
        issue = ConfigIssue(file, key, message)
        if issue not in self.issues:  # the same check may run for CPU and GPU counts
            self.issues.append(issue)

    def warn(self, path: tuple, message: str) -> None:
        """A warning about the value at ``path``; the file comes from ``sources``."""
        self.warn_at(self.file_for(path), format_key(path), message)

    def warn_at(self, file: str, key: str, message: str) -> None:
        text = str(ConfigIssue(file, key, message))
        if text not in self.warnings:
            self.warnings.append(text)

    def is_bad(self, *paths: tuple) -> bool:
        """Whether any of ``paths``, or one of their parents, already has a problem."""
        return any(tuple(p[:n]) in self.bad for p in paths for n in range(len(p), 0, -1))

    def __bool__(self) -> bool:
        return bool(self.issues)

    def raise_if_any(self) -> None:
        if self.issues:
            err = ConfigError(self.issues)
            err.warnings = list(self.warnings)
            raise err


def format_key(path: tuple) -> str:
    """("models", "policy", "lora", "lora_dim") -> "models.policy.lora.lora_dim"; list items as [i]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def unset_env_message(names: Sequence[str]) -> str:
    """What a value is missing: the environment variables to set (``${name}`` without a default)."""
    shown = ", ".join(repr(n) for n in names)
    plural = len(names) > 1
    return (f"environment variable{'s' if plural else ''} {shown} {'are' if plural else 'is'} not set "
            f"(set it, or write ${{{names[0]}:default}} to give a default)")
