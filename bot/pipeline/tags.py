"""What a build is called in the registry: the image name, its tags, the per-platform tags.

Everything here is a pure function of a build's ref, sha and repo config, so that the names a
build will push can be computed (and tested, and shown in a check run) before anything runs.

The tag rules follow docker/metadata-action, so that a repository moving from GitHub Actions
to imagebot keeps its tags. Checked against its README and ``src/meta.ts`` (commit dc80280 of
github.com/docker/metadata-action, 2026-07):

* tags are sanitised by replacing every *run* of characters outside ``[A-Za-z0-9_.-]`` with
  one ``-`` (``sanitizeTag``: ``/[^a-zA-Z0-9._-]+/g``), so ``refs/heads/my/branch`` gives
  ``my-branch``; image names are only lower-cased ("Image name and tag sanitization");
* ``type=ref,event=branch`` gives the branch name, ``type=ref,event=pr`` gives ``pr-<n>``,
  ``type=sha`` gives ``sha-`` + the first 7 hex digits ("type=sha", default length 7);
* ``type=semver`` needs a valid semver tag (node-semver ``valid``: an optional leading ``v``,
  no leading zeros); ``{{version}}`` is ``major.minor.patch[-prerelease]`` without build
  metadata; on a prerelease every pattern collapses to ``{{version}}`` ("Pre-release (rc,
  beta, alpha) will only extend {{version}}"), so ``v1.2.3-rc.1`` gives only ``1.2.3-rc.1``;
* "Major version zero": tag ``0`` should not be generated from ``{{major}}`` for ``0.y.z``;
* ``latest=auto`` ("Latest tag" and ``procSemver``): a semver tag sets latest only when it is
  not a prerelease; branch, pr, sha and raw entries never set it. ``latest`` on the default
  branch is the documented ``type=raw,value=latest,enable={{is_default_branch}}`` idiom.

So imagebot's defaults are what this metadata-action configuration produces::

    tags: |
      type=ref,event=branch
      type=ref,event=pr
      type=semver,pattern={{version}}
      type=semver,pattern={{major}}.{{minor}}
      type=semver,pattern={{major}},enable=<not 0.x>
      type=sha
      type=raw,value=latest,enable={{is_default_branch}}
    flavor: latest=auto

with two additions where metadata-action is silent or would leave a broken tag: a non-semver
git tag is kept under its own (sanitised) name, like ``type=raw``, and so does *not* get
``latest``; and a tag that would start with ``.`` or ``-`` or exceed 128 characters (which
docker refuses, and metadata-action passes through) is repaired, see :func:`sanitize_tag`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from string import Formatter
from typing import Any

from bot import repositories
from bot.models import BuildKind

#: Docker's limit on a tag, and on a whole image name (distribution/reference).
TAG_MAX = 128
NAME_MAX = 255
#: The short sha in ``sha-<7>`` tags, as metadata-action's default.
SHORT_SHA = 7

#: The placeholders a tag template may use.
PLACEHOLDERS = (
    "branch", "tag", "pr", "sha", "short_sha", "version", "major", "minor", "patch", "kind",
)

# distribution/reference: a path component, and a domain (host, IPv6 literal, optional port).
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*", re.ASCII)
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:]+\])"
    r"(?::[0-9]+)?",
    re.ASCII,
)
_TAG_INVALID = re.compile(r"[^A-Za-z0-9_.-]+", re.ASCII)
_SHA = re.compile(r"[0-9a-f]{7,64}", re.ASCII)
# semver.org's regex with node-semver's optional leading "v"; ASCII digits only.
_SEMVER = re.compile(
    r"v?(?P<major>0|[1-9][0-9]*)\.(?P<minor>0|[1-9][0-9]*)\.(?P<patch>0|[1-9][0-9]*)"
    r"(?:-(?P<pre>(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
_MAX_SAFE_INTEGER = 2**53 - 1  # node-semver refuses larger version numbers
_PR_REF = re.compile(r"refs/(?:pull|merge-requests)/(?P<number>[1-9][0-9]*)/(?:head|merge)")
#: ``os/arch[/variant]``, as bot.settings checks the operator's platforms.
_PLATFORM = re.compile(r"(?P<os>[a-z0-9]+)/(?P<arch>[a-z0-9_]+)(?:/(?P<variant>[a-z0-9]+))?")


class TagError(Exception):
    """A name or tag that cannot be made from the repository's configuration."""

    kind = "config"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- image names ------------------------------------------------------------------------------


def _is_host(component: str) -> bool:
    """Whether docker reads the first component of a name as a registry host, not a path."""
    return "." in component or ":" in component or component == "localhost"


def _name_problem(name: str, check_length: bool = True) -> str | None:
    """Why ``name`` is not a valid (lower-case) image name with a registry host, or None."""
    if check_length and len(name) > NAME_MAX:
        return f"it is {len(name)} characters long, over docker's limit of {NAME_MAX}"
    host, _, path = name.partition("/")
    if not _DOMAIN.fullmatch(host):
        return f"{host!r} is not a registry host[:port]"
    if not path:
        return "it names a registry but no repository"
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            return (
                f"path component {component!r} is not allowed: use lower-case letters and "
                "digits, separated by '.', '_', '__' or dashes, not at the start or end"
            )
    return None


def _check_override(override: str) -> str:
    """The stripped, lower-cased override, refusing tags and digests (we choose the tags)."""
    name = override.strip().lower()
    if not name:
        raise TagError("image: give a name such as ghcr.io/acme/app or acme/app, not an empty one")
    if "@" in name:
        raise TagError(f"image {override!r}: give a name without a digest (@sha256:...)")
    if ":" in name.rsplit("/", 1)[-1]:
        raise TagError(
            f"image {override!r}: give a name without a tag; imagebot chooses the tags "
            "(add your own with `tags:` in .imagebot.yml)"
        )
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise TagError(f"image {override!r}: empty path component")
    return name


def check_image_override(override: str) -> None:
    """Refuse an ``image:`` value that can never be valid, whatever the registry setting.

    Used when ``.imagebot.yml`` is loaded, so the mistake is reported before any build; the
    length limit is checked by :func:`image_name`, which knows the registry prefix.
    """
    name = _check_override(override)
    first, _, rest = name.partition("/")
    is_full = bool(rest) and _is_host(first)
    problem = _name_problem(
        name if is_full else f"registry.invalid/{name}", check_length=is_full
    )
    if problem:
        raise TagError(f"image {override!r} in .imagebot.yml is not a valid image name: {problem}")


def image_name(registry: str | None, repo: str, override: str | None = None) -> str:
    """The image a build of ``repo`` pushes to: ``{registry}/{repo}`` lower-cased by default.

    ``registry`` is the operator's ``host[:port][/namespace]``; ``repo`` is the forge's
    ``owner/name`` (or GitLab's ``group/sub/project``). ``override`` comes from the repo's
    ``image:``: a full name when its first component is a host (has a ``.`` or ``:``, or is
    ``localhost``, as docker decides), else a path under the registry. Names are lower-cased
    like metadata-action does, then checked against the distribution reference grammar.
    """
    registry = (registry or "").strip().rstrip("/").lower()
    if override is not None:
        name = _check_override(override)
        first, _, rest = name.partition("/")
        full = bool(rest) and _is_host(first)
        source = f"image {override!r} in .imagebot.yml"
    else:
        name = repo.strip().strip("/").lower()
        full = False
        source = f"the image name made from the repository name {repo!r}"
    if not full:
        if not registry:
            raise TagError(
                f"no registry to push {name!r} to: the operator sets IMAGEBOT_REGISTRY, or "
                "give a full name such as ghcr.io/acme/app with `image:` in .imagebot.yml"
            )
        if not _is_host(registry.split("/", 1)[0]):
            raise TagError(
                f"registry {registry!r} does not start with a host docker recognises (it needs "
                "a '.' or ':', or to be localhost); set IMAGEBOT_REGISTRY to e.g. "
                f"{registry.split('/', 1)[0]}:5000"
            )
        name = f"{registry}/{name}"
    problem = _name_problem(name)
    if problem:
        hint = "" if override is not None else "; set `image:` in .imagebot.yml to a valid name"
        raise TagError(f"{source} gives {name!r}, which is not a valid image name: {problem}{hint}")
    return name


def _within(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or below it, at a ``/`` boundary (``r/acme/app`` is not within
    ``r/acme/ap``)."""
    return name == prefix or name.startswith(prefix + "/")


def repo_glob_matches(glob: str, provider: str, repo: str) -> bool:
    """Whether an IMAGEBOT_IMAGE_POLICY key covers ``provider``'s ``repo`` (bot.repositories:
    ``*`` one path segment, ``**`` any number, case ignored, an optional forge prefix)."""
    return repositories.matches(glob, provider, repo)


@dataclass(frozen=True)
class ImageRules:
    """Where the images of one build may go: the operator's decision, never the repository's.

    By default a repository gets ``{REGISTRY}/{namespace}/{repo}``, and on GitHub (whose
    repositories are exactly ``owner/name``, so no other repository's default can lie below)
    also names below it, ``…/{repo}/<sub>``. On GitLab a project ``g/app`` cannot have
    ``g/app/api``: that is project ``g/app/api``'s own default, so sub-images there come only
    from the operator's policy. ``grants`` (IMAGEBOT_IMAGE_POLICY) add prefixes; ``foreign``
    are other forges' namespaces nested in this one's, where this forge may never publish.
    """

    base: str | None  # {REGISTRY}[/{namespace}], lower-case; None: no registry
    default: str | None  # the repository's default image
    below_default: bool  # names below the default are allowed too
    grants: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()

    def allowed(self) -> str:
        """What is allowed, in words, for a refusal."""
        shown = []
        if self.default:
            shown.append(f"{self.default} or a name below it ({self.default}/<name>)"
                         if self.below_default else self.default)
        shown += [f"{grant} or a name below it" for grant in self.grants]
        return "; ".join(shown) or "nothing (no IMAGEBOT_REGISTRY and no IMAGEBOT_IMAGE_POLICY entry)"

    def permits(self, name: str) -> bool:
        if any(_within(name, ns) for ns in self.foreign):
            return False
        if self.default and (name == self.default or (self.below_default and _within(name, self.default))):
            return True
        return any(_within(name, grant) for grant in self.grants)


def image_rules(registry: str | None, namespace: str, provider: str, repo: str,
                policy: dict[str, list[str]], foreign: tuple[str, ...] = ()) -> ImageRules:
    """The :class:`ImageRules` of ``provider``'s ``repo`` (pure: settings come as values)."""
    registry = (registry or "").strip().rstrip("/").lower() or None
    base = "/".join(filter(None, (registry, namespace))) or None
    try:
        default = image_name(base, repo) if base else None
    except TagError:
        default = None  # a repository name docker refuses: only an allowed `image:` can help
    fixed_depth = provider == "github" and repo.strip("/").count("/") == 1
    grants = tuple(dict.fromkeys(
        prefix for glob, prefixes in policy.items() if repo_glob_matches(glob, provider, repo)
        for prefix in prefixes
    ))
    nested = tuple(ns for ns in foreign if base is None or (ns != base and _within(ns, base)))
    return ImageRules(base, default, fixed_depth, grants, nested)


def resolve_image(rules: ImageRules, repo: str, override: str | None) -> str | None:
    """The image a build pushes to, checked against ``rules``; None when there is nowhere
    to push. Raises :class:`TagError` (kind ``config``) naming what is allowed."""
    if override is None:
        if rules.base and rules.default is None:
            image_name(rules.base, repo)  # raises, saying why the repository's name will not do
        if rules.default and rules.permits(rules.default):
            return rules.default
        if rules.default:
            raise TagError(
                f"the default image {rules.default} of {repo} lies in another forge's namespace; "
                "the operator sets IMAGEBOT_IMAGE_NAMESPACES or IMAGEBOT_IMAGE_POLICY"
            )
        return None
    name = image_name(rules.base, repo, override)
    if not rules.permits(name):
        raise TagError(
            f"image {override!r} in .imagebot.yml gives {name}, which {repo} may not publish to: "
            f"allowed is {rules.allowed()} (the operator can allow more with IMAGEBOT_IMAGE_POLICY)"
        )
    return name


def split_image(name: str) -> tuple[str, str]:
    """``(registry host, repository)`` of an image name, as the registry API addresses it.

    A name without a host is Docker Hub's, normalised as docker does (``docker.io``, and
    ``library/`` for a single component); callers talking to Hub's API use its API host.
    """
    first, _, rest = name.partition("/")
    if rest and _is_host(first):
        return first, rest
    return "docker.io", name if rest else f"library/{name}"


# -- tags -------------------------------------------------------------------------------------


def sanitize_tag(text: str) -> str:
    """``text`` as a valid docker tag, or ``""`` when nothing usable is left.

    As metadata-action: every run of characters outside ``[A-Za-z0-9_.-]`` becomes one ``-``.
    Beyond it, since docker refuses such tags: leading ``.`` and ``-`` are stripped (prefixing
    would turn ``-foo`` into some new name nobody typed), and a tag over 128 characters keeps
    its first 120 and ends in ``-`` + 7 hex digits of the full text's SHA-256, so that two long
    branch names sharing a prefix do not overwrite each other's image. Callers drop ``""``, as
    metadata-action drops an empty value.
    """
    tag = _TAG_INVALID.sub("-", text).lstrip(".-")
    if len(tag) > TAG_MAX:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:SHORT_SHA]
        tag = f"{tag[: TAG_MAX - SHORT_SHA - 1]}-{digest}"
    return tag


@dataclass(frozen=True)
class SemVer:
    major: int
    minor: int
    patch: int
    prerelease: str | None

    @property
    def version(self) -> str:
        """``major.minor.patch[-prerelease]``: node-semver's ``version``, build metadata dropped."""
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{self.prerelease}" if self.prerelease else core


def parse_semver(text: str) -> SemVer | None:
    """The semantic version ``text`` is (``v1.2.3``, ``1.2.3-rc.1+b5``), or None."""
    match = _SEMVER.fullmatch(text)
    if not match:
        return None
    numbers = [int(match[part]) for part in ("major", "minor", "patch")]
    if any(n > _MAX_SAFE_INTEGER for n in numbers):
        return None
    return SemVer(*numbers, prerelease=match["pre"])


def _short_sha(sha: str) -> str:
    sha = sha.strip().lower()
    if not _SHA.fullmatch(sha):
        raise ValueError(f"not a commit sha: {sha!r}")
    return sha[:SHORT_SHA]


def _pr_number(ref: str, pr_number: int | None) -> int:
    match = _PR_REF.fullmatch(ref)
    from_ref = int(match["number"]) if match else None
    if pr_number is not None and from_ref is not None and pr_number != from_ref:
        raise ValueError(f"pull request {pr_number} does not match ref {ref!r}")
    number = pr_number if pr_number is not None else from_ref
    if number is None or number <= 0:
        raise ValueError(f"no pull request number in ref {ref!r}")
    return number


def template_placeholders(template: str) -> set[str]:
    """The placeholders ``template`` uses; :class:`TagError` when it is malformed.

    Templates use ``{name}`` placeholders (``{{`` and ``}}`` are literal braces); attribute or
    index access, conversions and format specs are refused, so a template can only ever
    insert one of :data:`PLACEHOLDERS` as it is.
    """
    if not isinstance(template, str) or not template.strip():
        raise TagError("tag template is empty")
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        raise TagError(
            f"tag template {template!r} is malformed: {exc} (write {{{{ for a literal brace)"
        ) from None
    names: set[str] = set()
    literal = ""
    for text, name, spec, conversion in parts:
        literal += text
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            shown = "{" + name + (f"!{conversion}" if conversion else "")
            shown += (f":{spec}" if spec else "") + "}"
            raise TagError(
                f"tag template {template!r} has a malformed placeholder {shown}; "
                f"use one of {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        if name not in PLACEHOLDERS:
            raise TagError(
                f"tag template {template!r} has an unknown placeholder {{{name}}}; "
                f"use one of {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        names.add(name)
    if not names and not sanitize_tag(literal):
        raise TagError(f"tag template {template!r} gives no usable tag")
    return names


def render_template(template: str, values: dict[str, str]) -> str | None:
    """``template`` filled from ``values`` and sanitised; None when a placeholder it uses does
    not apply to this build (``{pr}`` on a branch build), so that template is left out."""
    if not template_placeholders(template) <= values.keys():
        return None
    out = []
    for text, name, _, _ in Formatter().parse(template):
        out.append(text)
        if name is not None:
            out.append(values[name])
    return sanitize_tag("".join(out)) or None


#: Tag-safe branch names that would overwrite a release, another commit's or pull request's
#: image, or content-keyed reuse (``src-``, written only by trusted builds): such a branch
#: publishes no branch tag.
RESERVED_TAG = re.compile(
    r"^(latest|v?\d+(\.\d+){0,2}([-+].*)?|sha-[0-9a-f]{7,64}(-.*)?|pr-\d+|src-.*)$", re.ASCII
)
#: Placeholders that pin a template's tag to one commit or one release: such a tag never moves.
_PINNING = frozenset({"sha", "short_sha", "tag", "version"})
#: Placeholders that tie a tag to this build's own commit or release: a reserved-looking tag
#: made with one (``v{major}``, ``sha-{short_sha}-slim``) is this build's to publish.
_OWNED = _PINNING | {"major", "minor", "patch"}


@dataclass(frozen=True)
class TagPlan:
    """The tags a build may publish, and which of them move (see :func:`plan_tags`).

    ``moving`` tags (a branch's, ``latest``, ``pr-<n>``, version aliases ``1`` and ``1.2``,
    templates pinned to neither a commit nor a release) are published only while the commit is
    still its ref's head; ``aliases`` (tag builds: ``latest``, ``X.Y``, ``X``) move only if no
    higher version was published. The rest (``sha-…``, the exact version) never move.
    ``notes`` say why tags were left out.
    """

    tags: tuple[str, ...]
    moving: frozenset[str] = frozenset()
    aliases: frozenset[str] = frozenset()
    version: SemVer | None = None
    notes: tuple[str, ...] = ()

    @property
    def immutable(self) -> list[str]:
        return [tag for tag in self.tags if tag not in self.moving]


def _branch_tags(ref: str, short: str, default_branch: str | None, values: dict[str, str]
                 ) -> tuple[list[str], set[str], list[str]]:
    """(tags, moving, notes) of a branch build."""
    if not ref.startswith("refs/heads/"):
        raise ValueError(f"a branch build needs a refs/heads/ ref, not {ref!r}")
    branch = ref.removeprefix("refs/heads/")
    values["branch"] = branch
    name, notes, moving = sanitize_tag(branch), [], set()
    tags = [f"sha-{short}"]
    if name and RESERVED_TAG.fullmatch(name):
        notes.append(f"branch {branch!r} publishes no branch tag: {name!r} is reserved for "
                     "releases, commits, pull requests and latest")
    elif name:
        tags.insert(0, name)
        moving.add(name)
    if default_branch and branch == default_branch.removeprefix("refs/heads/"):
        tags.append("latest")
        moving.add("latest")
    return tags, moving, notes


def _tag_tags(ref: str, short: str, values: dict[str, str]) -> tuple[list[str], set[str], SemVer | None]:
    """(tags, aliases, version) of a tag build; aliases also move."""
    if not ref.startswith("refs/tags/"):
        raise ValueError(f"a tag build needs a refs/tags/ ref, not {ref!r}")
    name = ref.removeprefix("refs/tags/")
    values["tag"] = name
    version = parse_semver(name)
    if version is None:
        return [sanitize_tag(name), f"sha-{short}"], set(), None
    values["version"] = version.version
    if version.prerelease is not None:
        return [version.version, f"sha-{short}"], set(), version
    values.update(major=str(version.major), minor=str(version.minor), patch=str(version.patch))
    aliases = [f"{version.major}.{version.minor}"] + ([str(version.major)] if version.major else [])
    return [version.version, *aliases, f"sha-{short}", "latest"], {*aliases, "latest"}, version


def plan_tags(
    kind: BuildKind | str,
    ref: str,
    sha: str,
    pr_number: int | None = None,
    default_branch: str | None = None,
    templates: tuple[str, ...] | list[str] = (),
) -> TagPlan:
    """The tags a build publishes, in order, without duplicates (see the module docstring).

    * branch: the sanitised branch name (none when it is :data:`RESERVED_TAG`), ``sha-<7>``,
      and ``latest`` on the default branch;
    * tag: a stable semver tag gives ``X.Y.Z``, ``X.Y``, ``X`` (not ``0``), ``sha-<7>``,
      ``latest``; a prerelease only ``X.Y.Z-pre`` and ``sha-<7>``; another tag its sanitised
      name and ``sha-<7>``;
    * pull_request (GitHub ``refs/pull/<n>/...`` or GitLab ``refs/merge-requests/<n>/...``):
      ``pr-<n>`` only, whatever the repository's ``tags:`` say (the config comes from the
      pull request's own head, so it must not name release tags);
    * branch and tag builds then add the repo's ``templates``, in their order. A template using
      a placeholder that does not apply is left out: ``{branch}`` needs a branch build,
      ``{tag}`` a tag build, ``{version}`` a semver tag, and ``{major}``/``{minor}``/``{patch}``
      a stable semver tag, as metadata-action only extends ``{{version}}`` on prereleases.
      A template tag moves unless it uses ``{sha}``, ``{short_sha}``, ``{tag}`` or ``{version}``.

    Bad arguments from the bot itself (a ref that does not match the kind, a sha that is not
    hex) raise ``ValueError``; a bad template raises :class:`TagError`.
    """
    kind = BuildKind(kind)
    short = _short_sha(sha)
    for template in templates:  # a bad one is reported even by builds that would not use it
        template_placeholders(template)
    values = {"sha": sha.strip().lower(), "short_sha": short, "kind": kind.value}
    aliases: set[str] = set()
    version, notes = None, []
    if kind is BuildKind.branch:
        tags, moving, notes = _branch_tags(ref, short, default_branch, values)
    elif kind is BuildKind.tag:
        tags, aliases, version = _tag_tags(ref, short, values)
        moving = set(aliases)
    else:
        pr = f"pr-{_pr_number(ref, pr_number)}"
        if templates:
            notes.append("a pull request build publishes only its pr-<n> tag, not the tags: of .imagebot.yml")
        return TagPlan((pr,), frozenset({pr}), notes=tuple(notes))
    for template in templates:
        _add_template(template, values, kind, tags, moving, aliases, notes)
    tags = [tag for tag in dict.fromkeys(tags) if tag]
    return TagPlan(tuple(tags), frozenset(moving), frozenset(aliases), version, tuple(notes))


def _add_template(template: str, values: dict[str, str], kind: BuildKind, tags: list[str],
                  moving: set[str], aliases: set[str], notes: list[str]) -> None:
    """Add one repo template's tag to a branch or tag build's (see :func:`plan_tags`)."""
    rendered = render_template(template, values)
    used = template_placeholders(template)
    if rendered and rendered not in tags and RESERVED_TAG.fullmatch(rendered) and not used & _OWNED:
        # ``latest``, a version, another commit's ``sha-…`` or ``pr-<n>``: tags the bot itself
        # gives to the builds that own them; a literal (or {branch}) template on any branch
        # would otherwise move them. Made of this build's own sha or version, it may stay.
        notes.append(f"tag template {template!r} gives {rendered!r}, which is reserved: left out")
    elif rendered and rendered not in tags:
        tags.append(rendered)
        if not used & _PINNING:
            moving.add(rendered)
            if kind is BuildKind.tag:
                aliases.add(rendered)


def user_tags(*args: Any, **kwargs: Any) -> list[str]:
    """Every tag :func:`plan_tags` plans for the build (same arguments), in order."""
    return list(plan_tags(*args, **kwargs).tags)


def is_version_alias(tag: str) -> bool:
    """``latest``, ``X`` or ``X.Y``: the tags a tag build moves (templates aside)."""
    return tag == "latest" or re.fullmatch(r"[0-9]+(\.[0-9]+)?", tag) is not None


def newer_version_published(version: SemVer, published: list[str]) -> set[str]:
    """Which of ``latest``, ``X.Y`` and ``X`` a tag build of ``version`` must not move,
    because the bot has published a higher stable ``X.Y.Z`` (as listed in the registry).

    Only tags the bot itself writes count: exact stable versions without a ``v`` prefix.
    """
    key = (version.major, version.minor, version.patch)
    versions = [(tag, parse_semver(tag)) for tag in published]
    higher = [v for tag, v in versions if v is not None and v.prerelease is None and v.version == tag
              and (v.major, v.minor, v.patch) > key]
    held = set()
    if higher:
        held.add("latest")
    if any(v.major == version.major for v in higher):
        held.add(str(version.major))
    if any((v.major, v.minor) == (version.major, version.minor) for v in higher):
        held.add(f"{version.major}.{version.minor}")
    return held


# -- platforms --------------------------------------------------------------------------------


def platform_parts(platform: str) -> tuple[str, str, str | None]:
    """``(os, arch, variant)`` of ``os/arch[/variant]``, normalised as buildx does.

    buildx parses ``--platform`` with containerd's ``platforms.Parse``, which normalises the
    architecture (``normalizeArch``): ``aarch64`` is ``arm64`` and its ``v8`` variant is
    implied (dropped); ``arm`` alone is ``arm/v7``; ``x86_64`` is ``amd64``; ``armhf`` is
    ``arm/v7``, ``armel`` ``arm/v6``; ``i386`` is ``386``. Normalising here keeps the
    per-platform tags and BuildKit args equal to what the build actually produces.
    """
    match = _PLATFORM.fullmatch(platform.strip().lower())
    if not match:
        raise TagError(f'not os/arch[/variant]: "{platform}"')
    os_, arch, variant = match["os"], match["arch"], match["variant"] or ""
    if os_ == "macos":
        os_ = "darwin"
    if arch == "i386":
        arch, variant = "386", ""
    elif arch == "x86_64":
        arch, variant = "amd64", ""
    elif arch == "amd64" and variant == "v1":
        variant = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        variant = "" if variant in ("8", "v8") else variant
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = f"v{variant}"
    return os_, arch, variant or None


def normalize_platform(platform: str) -> str:
    """``platform`` as buildx spells it after normalising (``linux/arm`` → ``linux/arm/v7``)."""
    return "/".join(part for part in platform_parts(platform) if part)


def platform_tag(sha: str, platform: str) -> str:
    """The tag a single-platform image is pushed under before the manifest list joins them:
    ``sha-<7>-<os>-<arch>[-<variant>]``, e.g. ``sha-0123abc-linux-arm-v7``."""
    return sanitize_tag("-".join(["sha", _short_sha(sha), *filter(None, platform_parts(platform))]))


def buildkit_args(platform: str, build_platform: str) -> dict[str, str]:
    """BuildKit's automatic platform ARGs for building ``platform`` on ``build_platform``.

    As the Dockerfile frontend sets them (``getPlatformArgs``): the ``*PLATFORM`` values are
    the normalised ``os/arch[/variant]``, and ``*VARIANT`` is ``""`` when there is none.
    """
    args: dict[str, str] = {}
    for prefix, value in (("TARGET", platform), ("BUILD", build_platform)):
        os_, arch, variant = platform_parts(value)
        args[f"{prefix}PLATFORM"] = "/".join(filter(None, (os_, arch, variant)))
        args[f"{prefix}OS"] = os_
        args[f"{prefix}ARCH"] = arch
        args[f"{prefix}VARIANT"] = variant or ""
    return args
