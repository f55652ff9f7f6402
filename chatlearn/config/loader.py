"""Read a chatlearn YAML config into a validated ``ChatLearnConfig``.

The steps, in order (each one collects its problems; all are reported at once):

1. Read the main file and its ``includes:`` (the including file wins; later
   includes win over earlier ones; includes nest; cycles are errors), keeping
   for every key the file that set it, so errors name the right file. A key
   given twice in one mapping keeps its last value, with a warning (1.x's rule).
2. Merge the overrides (``runtime.num_episode=3`` strings or a dict) on top.
3. Replace ChatLearn's environment syntax ``${name:default}`` / ``${name}``
   (see ``substitute_env``); what is left of ``${...}`` is omegaconf's own
   interpolation (``${runtime.num_episode}``, ``${oc.env:HOME}``), which
   omegaconf then resolves. ``${name}`` with ``name`` unset is None, with a
   warning (1.x's rule); a key that needs a value then fails validation.
4. Read each model's ``model_config_file`` (relative to the file that names
   it, with its own ``includes:``), the same way, into ``args_dict``; inline
   ``args_dict:`` keys win over the file's.
5. Check everything against the schema (``chatlearn.config.validate``).

ChatLearn 1.x's own keys and meanings are tables in ``chatlearn.config.compat``.

Nothing here imports torch, Ray or vLLM: the CLI must start fast.
"""
from __future__ import annotations

import ast
import copy
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from chatlearn.config.errors import (OVERRIDES_SOURCE, ConfigError, ConfigIssue, IssueCollector, display_path,
                                     format_key)
from chatlearn.config.schema import ChatLearnConfig, config_to_dict
from chatlearn.config.validate import build_config

__all__ = ["load_config", "config_to_dict", "substitute_env", "type_env_value", "INCLUDES_KEY"]

INCLUDES_KEY = "includes"

Overrides = Union[None, str, Sequence[str], Mapping[str, Any]]
Sources = dict[tuple, str]


# --------------------------------------------------------------------------- YAML
class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes for config files.

    * ``1e-5`` is a float (YAML 1.1 wants a dot and a signed exponent, so PyYAML
      reads it as a string, and learning rates are written that way). This is
      ChatLearn 1.x's scientific-notation rule (``1.0e6``, ``.5e3`` too), for
      unquoted values: a quoted ``"5e-6"`` stays a string here.
    * Dates stay strings: omegaconf cannot hold ``datetime.date`` values.

    A key given twice in one mapping keeps its last value (PyYAML's rule, and so
    ChatLearn 1.x's); ``_parse_yaml`` lists such keys so that the loader can warn.
    """


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(node: Any, path: tuple = (), active: Optional[set] = None) -> list[tuple[tuple, int, int]]:
    """``(key path, first line, later line)`` of every key given twice in one mapping of ``node``."""
    active = set() if active is None else active
    if id(node) in active:  # a recursive alias
        return []
    found = []
    if isinstance(node, yaml.MappingNode):
        active.add(id(node))
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys (<<: *anchor) may be overridden by explicit keys
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in seen:
                found.append((path + (key,), seen[key], line))
            seen[key] = line
            found += _duplicate_keys(value_node, path + (key,), active)
        active.discard(id(node))
    elif isinstance(node, yaml.SequenceNode):
        active.add(id(node))
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, path + (i,), active)
        active.discard(id(node))
    return found


def _parse_yaml(text: str) -> tuple[Any, list[tuple[tuple, int, int]]]:
    """The YAML document in ``text``, and its duplicate keys (see ``_duplicate_keys``)."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        return loader.construct_document(node), _duplicate_keys(node)
    finally:
        loader.dispose()


def _parse_yaml_text(text: str) -> Any:
    return _parse_yaml(text)[0]


def _read_yaml(path: str, issues: IssueCollector) -> Optional[dict]:
    """The mapping in ``path``; None (with a problem recorded) if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            data, duplicates = _parse_yaml(f.read())
    except OSError as e:
        issues.add_at(path, "", f"cannot read file: {e.strerror or e}")
        return None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        issues.add_at(path, "", f"invalid YAML: {where}{problem}")
        return None
    for key_path, first, last in duplicates:
        issues.warn_at(path, format_key(key_path), f"given twice in one mapping (lines {first} and {last}); "
                                                   f"the value of line {last} is used, as in ChatLearn 1.x")
    if data is None:  # an empty file is an empty mapping
        return {}
    if not isinstance(data, dict):
        issues.add_at(path, "", f"expected a mapping at the top of the file, got {type(data).__name__}")
        return None
    return data


# ----------------------------------------------------------------- merge + sources
def _mark(tree: Any, file: str, prefix: tuple = ()) -> Sources:
    """Every key path in ``tree`` (dicts only; lists are leaves) -> ``file``."""
    sources = {prefix: file}
    if isinstance(tree, dict):
        for key, value in tree.items():
            sources.update(_mark(value, file, prefix + (key,)))
    return sources


def _merge(base: dict, base_src: Sources, over: dict, over_src: Sources, prefix: tuple = ()) -> None:
    """Deep-merge ``over`` into ``base`` (over wins); lists are replaced, not merged."""
    for key, value in over.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], base_src, value, over_src, path)
            continue
        base[key] = copy.deepcopy(value)
        for p in [p for p in base_src if p[:len(path)] == path]:
            del base_src[p]
        base_src.update({p: f for p, f in over_src.items() if p[:len(path)] == path})


def _find_file(name: str, naming_file: str, root_dir: Optional[str]) -> str:
    """Absolute path of ``name`` written in ``naming_file``: relative to that file's directory, or,
    when nothing is there, to ``root_dir`` (the main config's directory: ChatLearn 1.x's rule)."""
    name = os.path.expanduser(name)
    target = os.path.abspath(os.path.join(os.path.dirname(naming_file), name))
    if not os.path.isfile(target) and root_dir:
        beside_main = os.path.abspath(os.path.join(root_dir, name))
        if os.path.isfile(beside_main):
            return beside_main
    return target


def _load_tree(path: str, issues: IssueCollector, chain: tuple = (),
               root_dir: Optional[str] = None) -> tuple[dict, Sources]:
    """Read ``path`` with its includes, merged; plus where each key came from.
    ``root_dir``: where an include not found beside its including file is looked for next."""
    data = _read_yaml(path, issues)
    if data is None:
        return {}, {}
    merged: dict = {}
    merged_src: Sources = {(): path}
    includes = data.pop(INCLUDES_KEY, None)
    if isinstance(includes, str):
        includes = [includes]
    if includes is not None and not isinstance(includes, list):
        issues.add_at(path, INCLUDES_KEY, f"expected a list of file paths, got {_show(includes)}")
        includes = []
    for i, include in enumerate(includes or []):
        key = f"{INCLUDES_KEY}[{i}]"
        if not isinstance(include, str) or not include:
            issues.add_at(path, key, f"expected a file path (str), got {_show(include)}")
            continue
        # Include paths are relative to the including file, like model_config_file
        # (then to the main config's directory, where ChatLearn 1.x looks).
        target = _find_file(include, path, root_dir)
        if target in chain or target == path:
            cycle = " -> ".join(display_path(p) for p in (*chain, path, target))
            issues.add_at(path, key, f"include cycle: {cycle}")
            continue
        if not os.path.isfile(target):
            issues.add_at(path, key, f"include file not found: {include!r} (looked for {display_path(target)})")
            continue
        sub, sub_src = _load_tree(target, issues, chain + (path,), root_dir)
        _merge(merged, merged_src, sub, sub_src)
    _merge(merged, merged_src, data, _mark(data, path))
    return merged, merged_src


# ------------------------------------------------------------------- overrides
def _parse_overrides(overrides: Overrides, issues: IssueCollector) -> dict:
    """Overrides as one nested dict: dotlist strings ``a.b=value`` or a mapping."""
    if overrides is None:
        return {}
    tree: dict = {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        if isinstance(overrides, str):
            overrides = [overrides]
        items = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                issues.add_at(OVERRIDES_SOURCE, str(item), "expected an override of the form key.path=value")
                continue
            key, _, text = item.partition("=")
            # The value is read as YAML (3 is an int, [a,b] a list, '3' a string);
            # an empty value is an empty string, like ${name:}.
            try:
                value = _parse_yaml_text(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            items.append((key.strip(), value))
    for key, value in items:
        parts = tuple(str(key).split("."))
        if not all(parts):
            issues.add_at(OVERRIDES_SOURCE, str(key), "expected a key path like runtime.num_episode")
            continue
        node = tree
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _merge(node[parts[-1]], {}, value, {})
        else:
            node[parts[-1]] = value
    return tree


# ------------------------------------------------------- ChatLearn's ${name:default}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[-+]?[0-9]+\Z")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?\Z")


def type_env_value(text: str) -> Any:
    """Type the text of an environment variable or a ``${name:default}`` default, as ChatLearn 1.x does.

    Ints, floats (``1e-5`` too), True/False/true/false, None/null; then what
    Python's ``ast.literal_eval`` reads (1.x's rule): ``'recompute'`` is the
    string without its quotes, ``[1, 2]`` a list, ``1_000`` an int. Anything
    else stays a string (so "" stays "", and "1.0.2" or "/path" stay strings).
    """
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text in ("None", "null"):
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    value = _plain_value(value)
    return text if value is _NOT_PLAIN else value


_NOT_PLAIN = object()


def _plain_value(value: Any) -> Any:
    """``value`` with tuples as lists, or ``_NOT_PLAIN`` if it holds what a config cannot (bytes, sets, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain_value(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return _NOT_PLAIN
        items = {k: _plain_value(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN



class EnvVarNotSet(Exception):
    """``${name}`` without a default, and no environment variable ``name`` (``names``: all such in the value)."""

    def __init__(self, names: Sequence[str]):
        super().__init__(", ".join(names))
        self.names = list(names)
        self.name = self.names[0]


def _closing_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` whose content starts at ``start``; -1 if none."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "{":  # omegaconf allows dict literals in resolver arguments
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _escape(literal: Any) -> Any:
    """Make text from the environment literal for omegaconf (no interpolation in it)."""
    if isinstance(literal, str):
        return literal.replace("${", "\\${")
    if isinstance(literal, list):
        return [_escape(v) for v in literal]
    if isinstance(literal, dict):
        return {k: _escape(v) for k, v in literal.items()}
    return literal


class _EnvSubstituter:
    """Replaces ChatLearn's ``${name:default}`` / ``${name}``, leaving omegaconf's alone.

    ``${...}`` is ChatLearn's (an environment value, as in ChatLearn 1.x) when its
    content is a bare identifier, optionally followed by ``:default``:

    * ``${name}`` always (even where ``name`` is also a key: 1.x model files say
      ``tokenizer_model: ${tokenizer_model}``);
    * ``${name:default}`` unless ``name`` is a registered omegaconf resolver
      (omegaconf would read it as a call of resolver ``name``).

    Dotted (``${runtime.num_episode}``), relative (``${.x}``) and resolver
    (``${oc.env:HOME}``) interpolations are never ChatLearn's.
    """

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def _parse(self, inner: str) -> Optional[tuple[str, Optional[str]]]:
        name, colon, default = inner.partition(":")
        if not _NAME.match(name):
            return None
        if colon:
            return None if OmegaConf.has_resolver(name) else (name, default)
        return name, None

    def value(self, text: str) -> Any:
        """The value of a whole YAML string: typed when it is exactly one ``${name:default}``."""
        return self.typed(text)[0]

    def typed(self, text: str) -> tuple[Any, Optional[str]]:
        """``(value, text)``: ``text`` is what a non-string value was typed from (else None),
        so that a field that wants a string can take it as written (``exp_name=2024``)."""
        if text.startswith("${") and _closing_brace(text, 2) == len(text) - 1:
            parsed = self._parse(text[2:-1])
            if parsed is not None:
                name, default = parsed
                if name in self.environ:
                    raw = self.environ[name]
                else:
                    if default is None:
                        raise EnvVarNotSet([name])
                    raw = self.text(default)
                    # A default that still holds an omegaconf interpolation is left for
                    # omegaconf, which types it from its target.
                    if "${" in raw:
                        return raw, None
                value = type_env_value(raw)
                if isinstance(value, str):
                    return (_escape(value) if name in self.environ else value), None
                return (_escape(value) if name in self.environ else value), raw
        return self.text(text), None

    def text(self, text: str) -> str:
        """``text`` with every ChatLearn expression replaced by its text (not typed)."""
        missing: list[str] = []
        out = self._text(text, missing)
        if missing:
            raise EnvVarNotSet(missing)
        return out

    def _text(self, text: str, missing: list[str]) -> str:
        out = []
        i = 0
        while i < len(text):
            if text.startswith("\\${", i):  # omegaconf's escape: leave it to omegaconf
                out.append("\\${")
                i += 3
                continue
            if not text.startswith("${", i):
                out.append(text[i])
                i += 1
                continue
            end = _closing_brace(text, i + 2)
            if end < 0:  # unbalanced: omegaconf will report the grammar error
                out.append(text[i:])
                break
            parsed = self._parse(text[i + 2:end])
            if parsed is None:
                out.append(text[i:end + 1])
            else:
                name, default = parsed
                if name in self.environ:
                    out.append(_escape(self.environ[name]))
                elif default is None:
                    missing.append(name)
                else:
                    out.append(self._text(default, missing))
            i = end + 1
        return "".join(out)


def substitute_env(tree: Any, environ: Optional[Mapping[str, str]] = None) -> Any:
    """``tree`` with ChatLearn's ``${name:default}`` replaced (omegaconf's syntax kept).

    A convenience for one-off use; a value naming an unset variable without a
    default is None (ChatLearn 1.x's rule).
    """
    sub = _EnvSubstituter(os.environ if environ is None else environ)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, str):
            return node
        try:
            return sub.value(node)
        except EnvVarNotSet:
            return None

    return walk(tree)


def _substitute_tree(tree: dict, issues: IssueCollector, prefix: tuple) -> dict:
    """ChatLearn substitution over ``tree``. A value naming an unset variable without a default
    becomes None (ChatLearn 1.x's rule), noted in ``issues.unset_env``."""
    sub = _EnvSubstituter(os.environ)

    def walk(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, path + (i,)) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        try:
            value, text = sub.typed(node)
        except EnvVarNotSet as e:
            issues.unset_env[prefix + path] = e.names
            return None
        if text is not None:
            issues.env_text[prefix + path] = (value, text)
        return value

    return walk(tree, ())



# --------------------------------------------------------- omegaconf interpolation
def _resolve_tree(tree: dict, issues: IssueCollector, prefix: tuple) -> dict:
    """Resolve omegaconf's interpolations in ``tree`` (its own root), key by key.

    Resolving leaf by leaf (instead of one ``to_container(resolve=True)``)
    lets every broken interpolation be reported with its own key.
    """
    pending: list[tuple] = []

    def find(node: Any, path: tuple) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                find(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                find(v, path + (i,))
        elif isinstance(node, str) and "${" in node:
            try:  # a grammar error would make the whole tree unusable: check it alone
                OmegaConf.create({"_": node})
            except Exception as e:  # omegaconf raises GrammarParseError (and friends)
                issues.add(prefix + path, f"invalid interpolation {node!r}: {_first_line(e)}")
                _set(tree, path, None)
                return
            pending.append(path)

    find(tree, ())
    if not pending:
        return tree
    try:
        root = OmegaConf.create(tree)
    except Exception as e:  # e.g. a value type omegaconf cannot hold
        issues.add(prefix, f"cannot interpolate: {_first_line(e)}")
        return tree
    resolved = copy.deepcopy(tree)
    for path in pending:
        try:
            node: Any = root
            for part in path:
                node = node[part]
            if isinstance(node, (DictConfig, ListConfig)):
                node = OmegaConf.to_container(node, resolve=True)
        except Exception as e:
            issues.add(prefix + path, f"cannot resolve {_get(tree, path)!r}: {_first_line(e)}")
            node = None
        _set(resolved, path, node)
    return resolved


def _get(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# ----------------------------------------------------------------- model files
def _load_model_args(name: str, entry: dict, issues: IssueCollector) -> None:
    """Fill ``entry["args_dict"]`` from the model's ``model_config_file``."""
    key_path = ("models", name, "model_config_file")
    args_path = ("models", name, "args_dict")
    file = entry.get("model_config_file")
    if not file or not isinstance(file, str) or issues.is_bad(key_path):
        return  # no file (args only inline), or a type problem validate() reports
    main_dir = os.path.dirname(issues.main_file)
    named_in = issues.file_for(key_path)
    if named_in.startswith("<"):  # an override: relative to the current directory
        named_in = os.path.join(os.getcwd(), "_")
    target = _find_file(file, named_in, main_dir)
    if not os.path.isfile(target):
        issues.add(key_path, f"model_config_file not found: {file!r} (looked for {display_path(target)})")
        return
    entry["model_config_file"] = target
    file_args, file_src = _load_tree(target, issues, root_dir=main_dir)
    # Key paths of the file's own keys, as they appear in the final config.
    file_src = {args_path + p: f for p, f in file_src.items()}
    # While the file's values are substituted and resolved, problems must name
    # the file (or include) they came from, not the main config.
    main_sources, issues.sources = issues.sources, file_src
    main_env_text, issues.env_text = issues.env_text, {}
    main_unset, issues.unset_env = issues.unset_env, {}
    try:
        file_args = _substitute_tree(file_args, issues, args_path)
        file_args = _resolve_tree(file_args, issues, args_path)
    finally:
        issues.sources = main_sources
        file_env_text, issues.env_text = issues.env_text, main_env_text
        file_unset, issues.unset_env = issues.unset_env, main_unset
    inline = entry.get("args_dict")
    if inline is None:
        inline = {}
    if not isinstance(inline, dict):
        return  # validate() reports the type
    # Inline args_dict keys (and overrides of them) win over the file's.
    inline_src = {p: f for p, f in issues.sources.items() if p[:len(args_path)] == args_path}
    inline_keys = {p for p in inline_src if len(p) > len(args_path)}
    for p, typed in file_env_text.items():
        if not any(p[:n] in inline_keys for n in range(len(args_path) + 1, len(p) + 1)):
            issues.env_text[p] = typed
    for p, names in file_unset.items():
        if not any(p[:n] in inline_keys for n in range(len(args_path) + 1, len(p) + 1)):
            issues.unset_env[p] = names
    merged_src = dict(file_src)
    _merge(file_args, merged_src, inline, inline_src, args_path)
    entry["args_dict"] = file_args
    for p in inline_src:
        del issues.sources[p]
    issues.sources.update(merged_src)


# ------------------------------------------------------------------ public API
def load_config(path: Union[str, os.PathLike], overrides: Overrides = None) -> ChatLearnConfig:
    """Load, resolve and validate a chatlearn YAML config.

    ``overrides``: dotlist strings (``["runtime.num_episode=3"]``) or a mapping
    (nested, or with dotted keys); they win over the files and may use
    ``${name:default}`` too. Relative paths given in overrides are resolved
    from the current directory.

    Raises ``ConfigError`` listing every problem found.
    """

    main_file = os.path.abspath(os.fspath(path))
    if not os.path.isfile(main_file):
        raise ConfigError([ConfigIssue(main_file, "", "config file not found")])
    issues = IssueCollector(main_file)
    tree, sources = _load_tree(main_file, issues, root_dir=os.path.dirname(main_file))
    issues.sources = sources
    over = _parse_overrides(overrides, issues)
    _merge(tree, issues.sources, over, _mark(over, OVERRIDES_SOURCE))
    issues.sources[()] = main_file

    tree = _substitute_tree(tree, issues, ())
    tree = _resolve_tree(tree, issues, ())
    models = tree.get("models")
    if isinstance(models, dict):
        for name, entry in models.items():
            if isinstance(entry, dict):
                _load_model_args(name, entry, issues)
    cfg = build_config(tree, issues)
    _warn_unset(issues)
    _log_warnings(issues.warnings)
    issues.raise_if_any()
    cfg.config_path = main_file
    cfg.warnings = list(issues.warnings)
    return cfg


def _warn_unset(issues: IssueCollector) -> None:
    """One warning per key that is None because of unset variables (and has no error for it)."""
    for path, names in issues.unset_env.items():
        if not issues.is_bad(path):
            shown = ", ".join(repr(n) for n in names)
            issues.warn(path, f"environment variable{'s' if len(names) > 1 else ''} {shown} not set and no "
                              f"default given: the value is None (null), as in ChatLearn 1.x")


def _log_warnings(warnings: Sequence[str]) -> None:
    if warnings:
        from chatlearn.utils.logging import get_logger

        logger = get_logger("chatlearn.config")
        for warning in warnings:
            logger.warning("config: %s", warning)

