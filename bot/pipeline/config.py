"""A repository's own build settings: the optional ``.imagebot.yml`` at the root of a checkout.

The file is written by the repository's users, not the operator, so everything in it is
untrusted: it is read with ``yaml.safe_load`` only, its size is capped, only a regular file is
read (never a symlink, directory or FIFO), and paths it names are confined to the checkout.
A broken file fails the build with one :class:`ConfigError` that lists every problem with its
location, because a user fixing a config should not have to push once per mistake.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.models import BuildKind
from bot.pipeline import tags as tagsmod

#: The names the file may have; both at once is an error (which one would win is a guess).
CONFIG_NAMES = (".imagebot.yml", ".imagebot.yaml")
#: Far more than any real config needs, small enough that parsing one costs nothing.
MAX_CONFIG_BYTES = 64 * 1024
#: Values (YAML nodes) a config may hold, counting each use of an alias as a copy: a real
#: config has a few dozen; an alias bomb of 1 KB stands for billions.
MAX_CONFIG_NODES = 10_000
#: Nesting of YAML collections (a real config: 3).
MAX_CONFIG_DEPTH = 32
#: The build files the engine's client reads whole into memory.
MAX_DOCKERFILE_BYTES = 1024 * 1024
MAX_IGNORE_BYTES = 64 * 1024

#: Dockerfile ARG names: letters, digits and underscores, not starting with a digit.
_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
#: BuildKit sets these per platform; a build arg of the same name would lie about the target.
RESERVED_ARGS = frozenset(tagsmod.buildkit_args("linux/amd64", "linux/amd64"))
#: A Dockerfile stage name (``FROM ... AS <name>``), as BuildKit accepts them.
_STAGE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*", re.ASCII)


class ConfigError(Exception):
    """A repository config that cannot be built with; ``problems`` lists every one of them."""

    kind = "config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(message)
        self.message = message


# -- the model --------------------------------------------------------------------------------


def _platform(value: str) -> str:
    try:
        return tagsmod.normalize_platform(value)
    except tagsmod.TagError as exc:
        raise ValueError(exc.message) from None


def _template(value: str) -> str:
    try:
        tagsmod.template_placeholders(value)
    except tagsmod.TagError as exc:
        raise ValueError(exc.message) from None
    return value


def _arg_name(value: str) -> str:
    if not _ARG_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a build arg name (letters, digits and _, not starting with a digit)"
        )
    if value in RESERVED_ARGS:
        raise ValueError(f"{value} is set by BuildKit for each platform; it cannot be a build arg")
    return value


def _label_name(value: str) -> str:
    if not value or "=" in value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a label name (no spaces or '=', e.g. org.example.team)")
    return value


def _path(value: str) -> str:
    if not value.strip() or "\x00" in value:
        raise ValueError("give a path relative to the repository root")
    return value


Platform = Annotated[StrictStr, AfterValidator(_platform)]
Template = Annotated[StrictStr, AfterValidator(_template)]
ArgName = Annotated[StrictStr, AfterValidator(_arg_name)]
LabelName = Annotated[StrictStr, AfterValidator(_label_name)]
RelPath = Annotated[StrictStr, AfterValidator(_path)]


class PushPolicy(BaseModel):
    """Whether each kind of build pushes its image; a build that does not push is still built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    branch: StrictBool = True
    tag: StrictBool = True
    pull_request: StrictBool = True


def _expand_push(value: Any) -> Any:
    """``push: false`` means the same for every kind of build."""
    if isinstance(value, bool):
        return {"branch": value, "tag": value, "pull_request": value}
    if value is None or not isinstance(value, dict):
        raise ValueError(
            "expected true, false, or a mapping of branch/tag/pull_request to true/false"
        )
    return value


class RepoConfig(BaseModel):
    """The contents of ``.imagebot.yml``; every key is optional.

    Booleans must be YAML booleans (``true``/``false``): a quoted ``"false"`` is refused rather
    than guessed. ``build_args`` and ``labels`` values may be written as YAML numbers, booleans
    or dates; they are passed on as the text written in the file (see :func:`load_config`).
    """

    model_config = ConfigDict(extra="forbid")

    dockerfile: RelPath = "Dockerfile"
    context: RelPath = "."
    #: None: the operator's IMAGEBOT_PLATFORMS. Stored normalised (linux/arm → linux/arm/v7).
    platforms: list[Platform] | None = None
    build_args: dict[ArgName, StrictStr] = Field(default_factory=dict)
    target: StrictStr | None = None
    image: StrictStr | None = None
    tags: list[Template] = Field(default_factory=list)
    push: Annotated[PushPolicy, BeforeValidator(_expand_push)] = Field(default_factory=PushPolicy)
    labels: dict[LabelName, StrictStr] = Field(default_factory=dict)
    allow_partial: StrictBool = False
    #: The operator's build secrets (IMAGEBOT_BUILD_SECRETS_FILE) this build uses, by name;
    #: a repository names them, never holds them (bot.pipeline.secrets).
    secrets: list[ArgName] = Field(default_factory=list)
    #: Refused: values committed in the repository are no secret (see _check_secrets).
    secret_build_args: Any = None

    #: The file this came from, for messages about it; None for the defaults.
    _source: str | None = PrivateAttr(default=None)

    @field_validator("platforms")
    @classmethod
    def _check_platforms(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one platform, e.g. [linux/amd64], or leave it out")
        return list(dict.fromkeys(value))

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is not None and not _STAGE.fullmatch(value):
            raise ValueError(f"{value!r} is not a Dockerfile stage name (FROM ... AS <name>)")
        return value

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                tagsmod.check_image_override(value)
            except tagsmod.TagError as exc:
                raise ValueError(exc.message) from None
        return value

    @model_validator(mode="after")
    def _check_secrets(self) -> RepoConfig:
        if self.secret_build_args is not None:
            raise ValueError(
                "secret_build_args: is no longer supported: a value committed to the repository is no "
                "secret, and the Docker engine writes build args into the pushed image's history. Ask the "
                "operator to add it to the build secrets file (IMAGEBOT_BUILD_SECRETS_FILE) and name it "
                "under secrets: (e.g. secrets: [TOKEN]) instead")
        problems = [
            f"secrets[{i}]: {name} is also a key of build_args; a secret's value comes from the operator only"
            for i, name in enumerate(self.secrets)
            if name in self.build_args
        ]
        if problems:
            raise ValueError("\n".join(problems))
        self.secrets = list(dict.fromkeys(self.secrets))
        return self

    @property
    def source(self) -> str | None:
        return self._source

    def pushes(self, kind: BuildKind | str) -> bool:
        """Whether a build of this ``kind`` pushes its image."""
        return getattr(self.push, BuildKind(kind).value)


# -- reading the file -------------------------------------------------------------------------


def _describe_input(value: Any) -> str:
    """A short description of a wrong value; never ``repr`` of a container (it may be huge,
    or an alias bomb that only looks small in the file)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


_TYPE_MESSAGES = {
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _problem(error: dict[str, Any], where: str) -> list[str]:
    """One human line per pydantic error, named by its place in the file."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        known = sorted(PushPolicy.model_fields if loc[:1] == ("push",) else RepoConfig.model_fields)
        name = str(loc[-1])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return [f"{where}: {_location(loc)}: unknown key; {hint}known keys are {', '.join(known)}"]
    if kind in _TYPE_MESSAGES:
        value = error.get("input")
        hint = ""
        if kind == "string_type" and isinstance(value, (bool, int, float)):
            hint = " (put it in quotes)"
        elif kind == "bool_type" and isinstance(value, str):
            hint = " (without quotes)"
        message = f"{_TYPE_MESSAGES[kind]}, got {_describe_input(value)}{hint}"
    if not loc:  # a whole-model check: its lines name their own locations
        return [f"{where}: {line}" for line in message.split("\n")]
    if loc[-1] == "[key]":  # a bad key in build_args or labels: name the map, then the key
        if kind in _TYPE_MESSAGES:
            message = f"key {loc[-2]!r}: {message}"
        loc = loc[:-2]
    return [f"{where}: {_location(loc)}: {message}"]


def _check_duplicates(root: yaml.Node | None, problems: list[str], where: str) -> None:
    """Report keys given twice in one mapping (YAML loaders silently keep the last one)."""
    seen: set[int] = set()
    found: list[tuple[int, str]] = []
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes; visit each once
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
                    line = key.start_mark.line + 1
                    if key.value in first:
                        found.append((line, f"{where} line {line}: key {key.value!r} appears "
                                            f"twice (first on line {first[key.value]})"))
                    else:
                        first[key.value] = line
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    problems += [message for _, message in sorted(found)]


_MERGE = "tag:yaml.org,2002:merge"
_NULL = "tag:yaml.org,2002:null"


def _as_written(data: dict[str, Any], root: yaml.Node | None) -> None:
    """Take the keys and values of ``build_args`` and ``labels`` as the text in the file.

    YAML reads ``3.10`` as the float 3.1, ``on`` as true and ``2024-01-01`` as a date, in keys
    as in values; ``str()`` of those would hand the Dockerfile something the user never
    wrote. These two maps only hold strings, so their scalars are taken from the node tree
    (``yaml.compose``: nodes only, no objects built) exactly as written. A null stays None and
    a list or mapping stays one, to be reported as the wrong type.
    """
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value not in ("build_args", "labels") or not isinstance(value, yaml.MappingNode):
            continue
        if any(k.tag == _MERGE for k, _ in value.value):
            continue  # merge keys: keep what safe_load built; rare enough not to rebuild
        mapping: dict[str, Any] = {}
        for k, v in value.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "<a list or mapping>"
            if isinstance(v, yaml.ScalarNode):
                mapping[name] = None if v.tag == _NULL else v.value
            else:
                mapping[name] = [] if isinstance(v, yaml.SequenceNode) else {}
        data[key.value] = mapping


def _read_limited(path: Path, where: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most MAX_CONFIG_BYTES."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot be read: {exc.strerror}"]) from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError([f"{where} is a symlink; imagebot reads it only as a regular file"])
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError([f"{where} is a directory; it must be a YAML file"])
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError([f"{where} is not a regular file"])
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{where} is {info.st_size} bytes, over the limit of {MAX_CONFIG_BYTES}"]
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:  # replaced by a symlink or removed since lstat
        reason = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}"
        raise ConfigError([f"{where} {reason}"]) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ConfigError([f"{where} is not a regular file"])
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{where} is over the limit of {MAX_CONFIG_BYTES} bytes"])
    return data


def _find_config(checkout: Path) -> Path | None:
    present = [checkout / name for name in CONFIG_NAMES if os.path.lexists(checkout / name)]
    if len(present) > 1:
        raise ConfigError(
            [f"both {CONFIG_NAMES[0]} and {CONFIG_NAMES[1]} exist; keep one of them"]
        )
    return present[0] if present else None


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that composes at most MAX_CONFIG_NODES nodes, MAX_CONFIG_DEPTH deep.

    Composing is linear in the text; what is not is using aliases: ``[*a, *a]`` of
    ``[*b, *b]`` of ... is a few bytes that mean 2**n nodes to the merge-key flattening of
    the constructor, to pydantic and to anything else that walks the result as a tree. So the
    composed graph is also measured as the tree it stands for (:func:`_check_expansion`)
    before any object is built. The depth cap keeps the recursive composer off Python's
    recursion limit.
    """

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self._composed = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._composed += 1
        self._depth += 1
        try:
            if self._composed > MAX_CONFIG_NODES:
                raise _over_budget(self.where, self.peek_event().start_mark, f"more than {MAX_CONFIG_NODES} values")
            if self._depth > MAX_CONFIG_DEPTH:
                raise _over_budget(self.where, self.peek_event().start_mark, f"nested more than {MAX_CONFIG_DEPTH} deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _over_budget(where: str, mark: Any, what: str) -> ConfigError:
    line = f" line {mark.line + 1}" if mark is not None else ""
    return ConfigError([f"{where}{line}: {what}; a build config never needs that much"])


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a node graph whose tree (every alias expanded) has over MAX_CONFIG_NODES nodes,
    or that contains itself. Linear: each node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_CONFIG_NODES:
                raise _over_budget(where, node.start_mark, f"aliases expand to more than {MAX_CONFIG_NODES} values")
            continue
        if key in sizes:
            continue
        if key in open_:
            raise _over_budget(where, node.start_mark, "an alias refers to the value it is part of")
        open_.add(key)
        stack.append((node, True))
        stack += [(child, False) for child in _children(node) if id(child) not in sizes]


def _load(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """The data and the node tree of ``text``, composed once, within the budgets."""
    loader = _BoundedLoader(text, where)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_expansion(root, where)
        return loader.construct_document(root), root
    finally:
        loader.dispose()


def parse_config(text: str, where: str = CONFIG_NAMES[0]) -> RepoConfig:
    """A :class:`RepoConfig` from the YAML ``text`` of a file named ``where`` in messages.

    CPU-bound and untrusted: bounded by the budgets of :class:`_BoundedLoader`, and called on
    a thread by the pipeline (never on the event loop)."""
    try:
        data, root = _load(text, where)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if mark is not None:
            line, column = mark.line + 1, mark.column + 1
            raise ConfigError(
                [f"{where} line {line}: could not parse: {problem} (column {column})"]
            ) from None
        raise ConfigError([f"{where}: could not parse: {problem}"]) from None
    if data is None:  # an empty file, or only comments: the defaults
        config = RepoConfig()
        config._source = where
        return config
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{where}: expected a mapping of settings (key: value), got {_describe_input(data)}"]
        )
    problems: list[str] = []
    _check_duplicates(root, problems, where)
    for key in data:
        if not isinstance(key, str):
            problems.append(f"{where}: {_describe_input(key)} is not a setting name")
    _as_written(data, root)
    try:
        config = RepoConfig.model_validate({k: v for k, v in data.items() if isinstance(k, str)})
    except ValidationError as exc:
        problems += [line for error in exc.errors() for line in _problem(error, where)]
    if problems:
        raise ConfigError(problems)
    config._source = where
    return config


def load_config(checkout: Path) -> RepoConfig:
    """The repo config at the root of ``checkout``, or the defaults when there is none.

    Reads ``.imagebot.yml`` or ``.imagebot.yaml`` (not both); anything wrong with the file,
    its YAML or its values raises one :class:`ConfigError` naming every problem.
    """
    path = _find_config(checkout)
    if path is None:
        return RepoConfig()
    data = _read_limited(path, path.name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path.name}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, path.name)


# -- paths in the checkout --------------------------------------------------------------------


def _inside(root: Path, value: str, what: str, where: str) -> tuple[Path | None, str | None]:
    """``value`` resolved under ``root``, or why it may not be used."""
    if PurePosixPath(value).is_absolute():
        return None, (
            f"{where}{what} `{value}` is an absolute path; give it relative to the repository root"
        )
    normal = os.path.normpath(value)
    if normal == ".." or normal.startswith("../"):
        return None, f"{where}{what} `{value}` leaves the repository"
    try:
        resolved = (root / value).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (3.11)
        return None, f"{where}{what} `{value}` goes through a symlink loop"
    if resolved != root and not resolved.is_relative_to(root):
        return None, f"{where}{what} `{value}` leaves the repository through a symlink"
    return resolved, None


def resolve_paths(checkout: Path, config: RepoConfig) -> tuple[Path, Path]:
    """The Dockerfile and the build context of ``config``, as real paths inside ``checkout``.

    Both are relative to the repository root and must stay in it: no absolute paths, no
    ``..`` out of it, and no symlink anywhere along the way (the Dockerfile itself included)
    that resolves outside it, since a build must not read the bot's own files. The returned
    paths are resolved, so the build uses exactly what was checked.

    The Dockerfile may live outside the context, as long as it is in the checkout: BuildKit
    reads the Dockerfile separately from the context, so the runtime must pass it explicitly
    (``--file <path>`` / the ``dockerfile`` local), not as a path inside the context. Note that
    BuildKit looks for ``<Dockerfile>.dockerignore`` next to the Dockerfile before the
    context's ``.dockerignore``.
    """
    root = checkout.resolve(strict=True)
    where = f"{config.source}: " if config.source else ""
    hint = "" if config.source else f"; add one, or set `dockerfile:` in {CONFIG_NAMES[0]}"
    problems: list[str] = []
    dockerfile, problem = _inside(root, config.dockerfile, "dockerfile", where)
    if problem:
        problems.append(problem)
    elif not dockerfile.exists():
        problems.append(
            f"{where}dockerfile `{config.dockerfile}` does not exist in the repository{hint}"
        )
    elif not dockerfile.is_file():
        problems.append(f"{where}dockerfile `{config.dockerfile}` is not a file")
    context, problem = _inside(root, config.context, "context", where)
    if problem:
        problems.append(problem)
    elif not context.exists():
        problems.append(f"{where}context `{config.context}` does not exist in the repository")
    elif not context.is_dir():
        problems.append(f"{where}context `{config.context}` is not a directory")
    if problems:
        raise ConfigError(problems)
    problems += _build_file_problems(root, dockerfile, context)
    if problems:
        raise ConfigError(problems)
    return dockerfile, context


def _build_file_problems(root: Path, dockerfile: Path, context: Path) -> list[str]:
    """What is wrong with the files the engine's client reads whole: the Dockerfile and the
    context's ``.dockerignore`` must be regular files inside the checkout (a symlink to
    ``/dev/zero`` or out of the checkout is refused) of a bounded size."""
    problems = []
    size = dockerfile.stat().st_size
    if size > MAX_DOCKERFILE_BYTES:
        problems.append(f"the Dockerfile is {size} bytes, over the limit of {MAX_DOCKERFILE_BYTES}")
    ignore = context / ".dockerignore"
    if not os.path.lexists(ignore):
        return problems
    where = ignore.relative_to(root).as_posix()
    resolved, problem = _inside(root, where, where, "")
    if problem:
        return [*problems, f"{where} is a symlink out of the repository (or a loop); it must be a file in it"]
    try:
        info = os.stat(resolved)
    except OSError as exc:
        return [*problems, f"{where} cannot be read: {exc.strerror}"]
    if not stat.S_ISREG(info.st_mode):
        problems.append(f"{where} is not a regular file")
    elif info.st_size > MAX_IGNORE_BYTES:
        problems.append(f"{where} is {info.st_size} bytes, over the limit of {MAX_IGNORE_BYTES}")
    return problems
