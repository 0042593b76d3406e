"""The docs stay true: every repository path README.md and docs/*.md name exists, and every
command line they show is one tunelab accepts.

Everything is read from the docs themselves when the tests are collected, so a new line in a
doc is checked without touching this file (test ids are ``doc:line``):

- **paths**: markdown links (relative to the doc, ``#anchors`` included) and backticked or
  code-block words that start with a folder of the repository (``conf/``, ``scripts/x.py``,
  ``tests/test_x.py::test_name`` ...) exist; a glob matches a file; a test named after ``::`` is
  defined in that file; a Python name ``tunelab.engine.module.attr`` is defined where it says.
- **tunelab-train lines** (also ``bash scripts/run.sh ...``, ``torchrun ... -m tunelab.cli.train ...``
  and ``tunelab.check([...])`` / ``tunelab.fit([...])`` in Python examples) pass
  ``tunelab.engine.plan.check_command(argv, deep=False)``: composed and validated, every job of a sweep.
  The slow test also checks the single runs whose inputs exist here with ``deep=True`` (data read,
  model built, stages planned); sweeps stay shallow there because deep would build every job.
  Lines with Hydra's own flags (``--help``, ``--cfg job``, ``-sc install=bash`` ...) run the
  console script instead and must exit 0.
- **every other tunelab command** (``tunelab-ui/-eval/-export/-predict/-monitor``,
  ``python scripts/*.py``, ``bash scripts/*.sh``): the arguments are parsed by that command's own
  argparse parser, in this process, and must not be refused.

Placeholders are not commands: ``<run id>`` becomes a dummy value (argparse still sees the
argument), a standalone ``...`` is dropped, ``[--flag]`` (optional in a synopsis) is checked as
``--flag``. A command whose inputs are placeholder paths (``/data/...``, ``reviews.csv``,
``models:/NAME/1``) is only checked with ``deep=False``.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_DIRS = ("conf", "docs", "experiments", "scripts", "src", "tests", "benchmarks")  # what a repo path starts with
TOP_FILES = ("README.md", "pyproject.toml")
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# Hydra's own flags: the console script handles them before any run, so they are run for real.
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "-sc", "--shell-completion",
               "--version", "--resolve", "-p", "--package")
FILE_SUFFIX = re.compile(r"\.(csv|tsv|jsonl|parquet|json|ya?ml|pth|pt|ckpt|safetensors|onnx|wav|flac|png|jpe?g|db)$")


# -- reading markdown -------------------------------------------------------------------------------
@dataclass
class Doc:
    path: Path
    code: list[list[tuple[int, str]]] = field(default_factory=list)  # blocks of (line number, text)
    inline: list[tuple[int, str]] = field(default_factory=list)  # `spans` outside code blocks
    links: list[tuple[int, str]] = field(default_factory=list)  # [text](target) outside code blocks
    python: list[tuple[int, str]] = field(default_factory=list)  # ```python blocks (first line, source)
    headings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO)) if self.path.is_relative_to(REPO) else self.path.name


def read_doc(path: Path, text: str | None = None) -> Doc:
    """Split a markdown file into code blocks (fenced or indented), inline code and links."""
    doc = Doc(path)
    lines = (path.read_text() if text is None else text).splitlines()
    prose = [""] * len(lines)  # the text outside code blocks, line numbers kept
    fence, block, lang, prev_blank = None, [], "", True
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                _close(doc, block, lang)
                fence, block = None, []
            else:
                block.append((number, line))
            continue
        if stripped.startswith(("```", "~~~")):
            _close(doc, block, "")
            fence, lang, block = stripped[:3], stripped[3:].strip().lower(), []
            continue
        indented = len(line) - len(line.lstrip(" ")) >= 4 and stripped
        if indented and (prev_blank or block):  # an indented code block
            block.append((number, line))
        elif block and not stripped:
            block.append((number, line))  # a blank line inside an indented block
        else:
            _close(doc, block, "")
            block = []
            prose[number - 1] = line
            if stripped.startswith("#"):
                doc.headings.append(stripped.lstrip("#").strip())
        prev_blank = not stripped
    _close(doc, block, lang if fence else "")
    text = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text):  # a span may wrap once
        doc.inline.append((text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())))
    text = re.sub(r"`[^`\n]*`", "", text)  # [x](y) inside code is not a link
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        doc.links.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return doc


def _close(doc: Doc, block: list[tuple[int, str]], lang: str) -> None:
    while block and not block[-1][1].strip():
        block.pop()
    if not block:
        return
    if lang in ("python", "py"):
        indent = min(len(t) - len(t.lstrip()) for _, t in block if t.strip())
        doc.python.append((block[0][0], "\n".join(t[indent:] for _, t in block)))
    elif lang in ("", "bash", "sh", "shell", "console", "text"):
        doc.code.append(list(block))


# -- shell lines ------------------------------------------------------------------------------------
def strip_comment(line: str) -> str:
    """Cut a shell comment: '#' at the start of a word, outside quotes (not http://x/#/y)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_lines(block: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], dict[str, str]]:
    """The logical lines of a code block (``\\`` continuations joined, comments, ``$ `` prompts and
    heredoc bodies removed) and the files its heredocs write."""
    indent = min(len(t) - len(t.lstrip()) for _, t in block if t.strip())
    rows = [(n, t[indent:]) for n, t in block]
    out, files, pending, start, heredoc = [], {}, "", 0, None
    for number, text in rows:
        if heredoc:
            name, end, body = heredoc
            if text.strip() == end:
                files[name] = "\n".join(body) + "\n"
                heredoc = None
            else:
                body.append(text)
            continue
        text = strip_comment(text)
        if not pending:
            start = number
            text = re.sub(r"^\$ ", "", text)
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        line, pending = (pending + text).strip(), ""
        here = re.search(r"cat\s*>\s*(\S+)\s*<<-?\s*['\"]?(\w+)['\"]?", line)
        if here:
            heredoc = (here.group(1), here.group(2), [])
        if line:
            out.append((start, line))
    return out, files


UNQUOTED_SHELL_SYNTAX = re.compile(r"[(){}]")


def unquoted_trouble(line: str) -> str | None:
    """A character the shell would act on outside quotes: ( ) are syntax errors and a space in
    {a: 1} splits the argument in two. Hydra's sweep and dict syntax must be quoted."""
    quote = None
    for char in re.sub(r"\$\{[^}]*\}|\$\([^)]*\)", "", line):  # ${VAR} and $(command) are fine
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif UNQUOTED_SHELL_SYNTAX.match(char):
            return char
    return None


def words(line: str) -> list[list[str]]:
    """The simple commands of a line, as the shell splits them (&&, ;, | and & separate them;
    leading VAR=value assignments dropped)."""
    line = re.sub(r"<[A-Za-z][^<>]*>", "x", line)  # <run id>: a placeholder, one word
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("|&;"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    result = []
    for argv in commands:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if len(argv) == 2 and argv[0] == "eval" and re.fullmatch(r"\$\((.*)\)", argv[1]):
            result += words(argv[1][2:-1])  # eval "$(tunelab-train -sc install=bash)"
        elif argv:
            result.append(argv)
    return result


def leading_env(line: str) -> dict[str, str]:
    """The ``VAR=value`` assignments that start a line (``TUNELAB_ALLOWED_TARGETS=x tunelab-train ...``)."""
    env = {}
    for token in shlex.split(line):
        name, sep, value = token.partition("=")
        if not (sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)):
            break
        env[name] = value
    return env


# -- what a command line is -------------------------------------------------------------------------
@dataclass
class Command:
    doc: str
    line: int
    text: str
    kind: str  # train, hydra-flag, console, script, pytest, setup (other .sh), unknown-console, broken
    target: str  # console script / script path
    args: list[str]
    files: dict[str, str] = field(default_factory=dict)  # files the same code block writes (heredocs)
    shell: bool = True  # typed into a shell (not a Python call)
    env: dict[str, str] = field(default_factory=dict)  # VAR=value assignments before the command

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def placeholders_replaced(argv: list[str]) -> list[str]:
    """Synopsis placeholders made concrete: ``<run id>`` -> ``x``, ``[--flag]`` -> ``--flag``,
    a standalone ``...`` dropped."""
    out = []
    for arg in argv:
        if arg in ("...", "…"):
            continue
        if arg.startswith("["):
            arg = arg[1:]
        if arg.endswith("]") and "[" not in arg:
            arg = arg[:-1]
        out.append(re.sub(r"<[^<>]*>", "x", arg))
    return out


def classify(doc: str, number: int, line: str, argv: list[str], files: dict[str, str]) -> Command | None:
    """Which tunelab command a line runs, with its arguments; None for other programs."""
    program, args = argv[0], argv[1:]
    name = Path(program).name

    def command(kind, target, rest):
        return Command(doc, number, line, kind, target, placeholders_replaced(rest), files)

    if name == "tunelab-train":
        flags = [a for a in args if a.split("=")[0] in HYDRA_FLAGS]
        return command("hydra-flag" if flags else "train", "tunelab-train", args)
    if name.startswith("tunelab-"):
        return command("console" if name in CONSOLE_SCRIPTS else "unknown-console", name, args)
    if name == "torchrun" and "tunelab.cli.train" in args:
        return command("train", "tunelab-train", args[args.index("tunelab.cli.train") + 1:])
    script_path = re.compile(r"^scripts/[\w-]+\.(py|sh)$")
    if name.startswith("python") or name == "bash" or script_path.match(program):
        if script_path.match(program):
            args = [program, *args]
        if args[:2] == ["-m", "tunelab.cli.train"]:
            return command("train", "tunelab-train", args[2:])
        if not args or not script_path.match(args[0]):
            return None
        script, rest = args[0], args[1:]
        if script == "scripts/run.sh":  # its arguments are tunelab-train's
            kind = "hydra-flag" if any(a.split("=")[0] in HYDRA_FLAGS for a in rest) else "train"
            return command(kind, "tunelab-train", rest)
        if script == "scripts/test.sh":  # its arguments are pytest's
            return command("pytest", script, rest)
        if script.endswith(".sh"):
            return command("setup", script, rest)
        return command("script", script, rest)
    return None


def commands_of(doc: Doc) -> list[Command]:
    found = []
    for block in doc.code:
        lines, files = shell_lines(block)
        for number, line in lines:
            try:
                split = words(line)
            except ValueError:  # an unbalanced quote: the shell would wait for more input
                cmd = classify(doc.name, number, line, line.split(), files)
                found += [Command(doc.name, number, line, "broken", cmd.target, [])] if cmd else []
                continue
            for argv in split:
                cmd = classify(doc.name, number, line, argv, files)
                if cmd:
                    cmd.env = leading_env(line)
                    found.append(cmd)
    for number, span in doc.inline:
        if re.search(r"<(Tab|Enter|Ctrl[^>]*)>", span):  # keys to press: a demo, not a command line
            continue
        try:
            split = words(span)
        except ValueError:
            continue
        for argv in split:
            cmd = classify(doc.name, number, span, argv, {})
            if cmd and len(argv) == 1 and cmd.kind != "unknown-console":
                continue  # `tunelab-eval` in a sentence names the command: not a command line
            if cmd:
                found.append(cmd)
    for number, source in doc.python:  # tunelab.check([...]) / tunelab.fit([...]) / fit([...])
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.List, ast.Tuple))
                    and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("check", "fit")):
                try:
                    args = list(ast.literal_eval(node.args[0]))
                except ValueError:
                    continue
                found.append(Command(doc.name, number + node.lineno, ast.unparse(node), "train", "tunelab-train",
                                     [str(a) for a in args], shell=False))
    return found


# -- repository paths --------------------------------------------------------------------------------
def path_words(text: str) -> list[str]:
    """Words of a span or code line that look like repository paths."""
    found = []
    for word in re.split(r"[\s,;()\"'=]+", text):
        word = word.strip("[]`.:")
        if word.startswith("./"):
            word = word[2:]
        head = word.split("/")[0]
        if (head in TOP_DIRS and "/" in word) or word in TOP_FILES:
            found.append(word)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def path_problem(word: str, base: Path = REPO) -> str | None:
    """Why a path named in a doc does not hold, or None. Placeholders (<name>, $VAR, …) are skipped."""
    if re.search(r"[<>{}$]|\.\.\.|…", word):
        return None
    target, _, test = word.partition("::")
    if any(c in target for c in "*?["):
        return None if glob.glob(str(base / target)) else f"{word}: the glob matches no file"
    where = (base / target).resolve()
    if not where.exists():
        return f"{word}: no such file or folder"
    if test:
        name = test.split("[")[0].split("::")[-1]
        if not re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", where.read_text(), re.M):
            return f"{word}: {target} defines no {name}"
    return None


def python_name_problem(name: str) -> str | None:
    """``tunelab.a.b.attr``: when ``tunelab.a`` is a module of the package, the rest must be a
    submodule or a name defined (or imported) in the module before it. Names whose second part is
    no module (MLflow tags such as ``tunelab.config_hash``) are not Python names."""
    where = REPO / "src" / "tunelab"
    for i, part in enumerate(name.split(".")[1:]):
        if where.is_dir() and (where / part).is_dir():
            where = where / part
        elif where.is_dir() and (where / f"{part}.py").is_file():
            where = where / f"{part}.py"
        elif i == 0:
            return None
        else:
            source = where / "__init__.py" if where.is_dir() else where
            defined = rf"^\s*(def|class)\s+{part}\b|^\s*{part}\s*[:=]|^\s*(from|import)\s.*\b{part}\b"
            if not re.search(defined, source.read_text(), re.M):
                return f"{name}: {source.relative_to(REPO)} defines no {part}"
            return None  # an attribute of that object: not followed further
    return None


def path_cases() -> list:
    cases = []
    for path in DOCS:
        doc = read_doc(path)
        for number, target in doc.links:
            cases.append(pytest.param(doc, "link", target, id=f"{doc.name}:{number}:{target}"))
        texts = [(n, s) for n, s in doc.inline]
        texts += [(n, line) for block in doc.code for n, line in block]
        for number, text in texts:
            for word in path_words(text):
                cases.append(pytest.param(doc, "path", word, id=f"{doc.name}:{number}:{word}"))
            for name in re.findall(r"(?<![\w.])tunelab(?:\.\w+)+", text):
                cases.append(pytest.param(doc, "python", name, id=f"{doc.name}:{number}:{name}"))
    return cases


def link_problem(doc: Doc, target: str) -> str | None:
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
        return None
    file, _, anchor = target.partition("#")
    where = (doc.path.parent / file).resolve() if file else doc.path
    if not where.exists():
        return f"link {target}: {where} does not exist"
    if not where.is_relative_to(REPO):
        return f"link {target} leaves the repository"
    if anchor and where.suffix == ".md":
        if anchor not in {slug(h) for h in read_doc(where).headings}:
            return f"link {target}: {where.name} has no heading #{anchor}"
    return None


@pytest.mark.parametrize(("doc", "kind", "what"), path_cases())
def test_named_paths_exist(doc: Doc, kind: str, what: str) -> None:
    if kind == "link":
        problem = link_problem(doc, what)
    elif kind == "python":
        problem = python_name_problem(what)
    else:
        problem = path_problem(what)
    assert problem is None, f"{doc.name} names something that does not exist: {problem}"


# -- tunelab-train lines -----------------------------------------------------------------------------
ALL_COMMANDS = [cmd for path in DOCS for cmd in commands_of(read_doc(path))]


def by_kind(*kinds: str) -> list:
    return [pytest.param(c, id=c.id) for c in ALL_COMMANDS if c.kind in kinds]


def materialise(cmd: Command, home: Path) -> list[str]:
    """The command's arguments with ~ / $HOME pointing at ``home``, where its heredocs were written."""
    for name, body in cmd.files.items():
        target = Path(re.sub(r"^(~|\$HOME)", str(home), name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    return [re.sub(r"(?<!\w)(~|\$HOME)(?=/|$)", str(home), a) for a in cmd.args]


def placeholder_inputs(cmd: Command, argv: list[str]) -> list[str]:
    """Values that name files or stored models which do not exist here (/data/flowers, reviews.csv,
    models:/digits/1), in the arguments or in the files the block writes: such a line is an
    example to adapt, so it is checked only as far as the config goes (deep=False)."""
    values = [a.split("=", 1)[1] for a in argv if "=" in a and not a.startswith("hydra.")]
    values += re.findall(r"(?m)^\s*\w+:\s*(/\S+)", "\n".join(cmd.files.values()))
    missing = []
    for value in values:
        for item in re.split(r"[\[\],]", value):
            pathlike = re.match(r"^(/|~|\./|\.\./|file://)", item) or FILE_SUFFIX.search(item) or ":/" in item
            if item and pathlike and not Path(item.removeprefix("file://")).expanduser().exists():
                missing.append(item)
    return missing


def is_sweep(argv: list[str]) -> bool:
    """A sweep: -m, or a group file (experiment, hparams_search) that sets hydra.mode=MULTIRUN."""
    if any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in argv):
        return True
    for arg in argv:
        group, _, choice = arg.partition("=")
        file = REPO / "conf" / group.lstrip("+") / f"{choice}.yaml"
        if "/" not in group and choice and file.is_file() and "MULTIRUN" in file.read_text():
            return True
    return False


@pytest.fixture(scope="session")
def tunelab_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tunelab_home")  # one for all lines: spoken digits are made once


@pytest.fixture
def isolated(tmp_path, tunelab_home, monkeypatch) -> Path:
    """Whatever a check might write (spoken digits, stores) goes to a temporary TUNELAB_HOME."""
    monkeypatch.setenv("TUNELAB_HOME", str(tunelab_home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check(cmd: Command, home: Path, deep: bool) -> str:
    from tunelab.engine.plan import check_command
    from tunelab.errors import TunelabError

    trouble = unquoted_trouble(cmd.text) if cmd.shell else None
    assert trouble is None, (f"{cmd.id}: `{cmd.text}` has an unquoted {trouble!r}: the shell would mangle it; "
                             "quote the argument")
    argv = materialise(cmd, home)
    env = {k: re.sub(r"(?<![\w/])(~|\$HOME)(?=/|$)", str(home), v) for k, v in cmd.env.items()}
    key = (tuple(a for a in argv if a != "--check"), deep, tuple(sorted(env.items())))
    if key not in CHECKED:  # the same line in several docs is checked once
        with command_environment(env):
            try:
                CHECKED[key] = (True, check_command(argv, deep=deep))
            except TunelabError as err:
                CHECKED[key] = (False, str(err))
    ok, answer = CHECKED[key]
    if not ok:
        pytest.fail(f"{cmd.id}: `{cmd.text}` is refused: {answer}")
    return answer


CHECKED: dict[tuple, tuple[bool, str]] = {}


@contextmanager
def command_environment(env: dict[str, str]):
    """The line's own VAR=value assignments, for an in-process check: set, PYTHONPATH on sys.path."""
    from tunelab.config import targets

    saved, frozen = {k: os.environ.get(k) for k in env}, targets._user_declared
    path = list(sys.path)
    os.environ.update(env)
    targets._user_declared = None  # read TUNELAB_ALLOWED_TARGETS from the line's environment
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    try:
        yield
    finally:
        sys.path[:] = path
        targets._user_declared = frozen
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("cmd", by_kind("train"))
def test_train_line_composes_and_validates(cmd: Command, isolated: Path) -> None:
    _check(cmd, isolated / "home", deep=False)


DEEP = [p for p in by_kind("train") if not is_sweep(p.values[0].args)
        and not placeholder_inputs(p.values[0], p.values[0].args)]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", DEEP)
def test_single_run_line_reads_its_data_and_builds_its_model(cmd: Command, isolated: Path) -> None:
    _check(cmd, isolated / "home", deep=True)


def run_console(name: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.slow  # a process per line: about 4 s each on 2 cores
@pytest.mark.parametrize("cmd", by_kind("hydra-flag"))
def test_hydra_flag_line_runs(cmd: Command, isolated: Path) -> None:
    args = materialise(cmd, isolated / "home")
    done = run_console("tunelab-train", args, isolated, COMP_LINE="tunelab-train ", COMP_POINT="14")  # -sc query
    assert done.returncode == 0, f"{cmd.id}: `{cmd.text}` exits {done.returncode}: {done.stderr[-2000:]}"
    if "install=bash" in args:  # what the README promises: strategy=<Tab> lists the strategies
        script = ('eval "$(tunelab-train -sc install=bash)"; COMP_LINE="tunelab-train strategy="; '
                  'COMP_POINT=${#COMP_LINE}; COMP_WORDS=($COMP_LINE); COMP_CWORD=1; hydra_bash_completion; '
                  'echo "${COMPREPLY[@]}"')
        path = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
        shown = subprocess.run(["bash", "-c", script], cwd=isolated, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PATH": path})
        assert "strategy=gradual" in shown.stdout.split(), (
            f"bash completion offered {shown.stdout!r} {shown.stderr[-500:]}")


# -- every other command: its own argparse parser -------------------------------------------------
class _Parsed(Exception):
    def __init__(self, namespace, extras):
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


def _load(target: str):
    """The module behind a console script or a scripts/*.py file."""
    if target in CONSOLE_SCRIPTS:
        return importlib.import_module(CONSOLE_SCRIPTS[target].split(":")[0]), CONSOLE_SCRIPTS[target].split(":")[1]
    spec = importlib.util.spec_from_file_location(f"docs_{Path(target).stem}", REPO / target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, "main"


def parse_with_own_parser(target: str, args: list[str], monkeypatch):
    """Parse ``args`` with the command's own parser: ``build_parser()`` when it has one, else its
    ``parse_args(argv)``, else its ``main()`` stopped right after argparse returns."""
    import argparse

    module, main = _load(target)
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args(args)
    if hasattr(module, "parse_args"):
        return module.parse_args(args)
    original_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(True)
        try:
            namespace = original_args(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(namespace, [])

    def parse_known_args(self, args=None, namespace=None):
        result = original_known(self, args, namespace)
        if inside:
            return result
        raise _Parsed(*result)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.setattr(sys, "argv", [target, *args])
    entry = getattr(module, main)
    try:
        entry()
    except _Parsed as parsed:
        return parsed.namespace
    pytest.fail(f"{target}'s {main}() returned without parsing its arguments with argparse")


@pytest.mark.parametrize("cmd", by_kind("console", "script", "setup", "unknown-console", "broken"))
def test_command_line_parses(cmd: Command, isolated: Path, monkeypatch, capsys) -> None:
    assert cmd.kind != "broken", f"{cmd.id}: `{cmd.text}` has an unbalanced quote"
    assert cmd.kind != "unknown-console", (
        f"{cmd.id}: `{cmd.text}`: {cmd.target} is not a console script "
        f"(pyproject.toml has {sorted(CONSOLE_SCRIPTS)})")
    assert (REPO / cmd.target).is_file() or cmd.target in CONSOLE_SCRIPTS, f"{cmd.id}: no {cmd.target}"
    if cmd.kind == "setup":  # a shell script without a parser: arguments only when it passes them on
        assert not cmd.args or "$@" in (REPO / cmd.target).read_text(), f"{cmd.id}: {cmd.target} ignores {cmd.args}"
        return
    trouble = unquoted_trouble(cmd.text)
    assert trouble is None, f"{cmd.id}: `{cmd.text}` has an unquoted {trouble!r}; quote the argument"
    try:
        parse_with_own_parser(cmd.target, cmd.args, monkeypatch)
    except SystemExit as exit_:
        pytest.fail(f"{cmd.id}: `{cmd.text}`: {cmd.target} refuses its arguments (exit {exit_.code}): "
                    f"{capsys.readouterr().err.strip()[-500:]}")


@pytest.mark.slow  # a pytest process per line: about 6 s each on 2 cores
@pytest.mark.parametrize("cmd", by_kind("pytest"))
def test_test_script_arguments_are_pytest_arguments(cmd: Command) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *cmd.args, str(Path(__file__))], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 5), f"{cmd.id}: pytest refuses {cmd.args}: {done.stdout[-1000:]}{done.stderr[-1000:]}"


# -- the checks above can fail ------------------------------------------------------------------------
FAKE = """# A doc

See [the guide](docs/no-such-guide.md) and [sweeps](docs/sweeps.md#no-such-heading),
`scripts/no_such_script.py`, `tests/project/test_docs.py::test_not_defined_anywhere`,
`conf/strategy/*.yaml`, `conf/<group>/` and `tunelab.config.no_such_function`.

    source .venv/bin/activate
    $ tunelab-train model=resnet18 \\
        data=fashion_mnist   # a comment
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 tunelab-train -m optimizer.lr=1e-3,3e-4 && tunelab-ui --port 5001 &
    tunelab-train 'module.group_lr_mults={head: 2}' module.group_lr_mults={head: 2}
    tunelab-eval runs:/<run id> --split val
    tunelab-frobnicate --now
    tunelab-train 'optimizer.lr=1e-3
    eval "$(tunelab-train -sc install=bash)"
    .venv/bin/python scripts/benchmark.py --cached-probe
    curl -s http://127.0.0.1:5001/#/x

Inline: `tunelab-ui [--store PATH] [--port 5000]`, `bash scripts/test.sh -m "not slow"`.

```python
import tunelab
tunelab.check(["strategy=gradual", "debug=smoke"])
```
"""


def test_the_extractors_find_what_a_doc_names_and_report_what_is_missing(tmp_path: Path) -> None:
    fake = REPO / "FAKE_DOC.md"  # never written: read_doc takes the text, paths resolve against the repo
    doc = read_doc(fake, FAKE)
    assert [t for _, t in doc.links] == ["docs/no-such-guide.md", "docs/sweeps.md#no-such-heading"]
    assert link_problem(doc, "docs/no-such-guide.md")
    assert "no heading" in link_problem(doc, "docs/sweeps.md#no-such-heading")
    assert link_problem(doc, "docs/sweeps.md") is None
    words_ = [w for _, s in doc.inline for w in path_words(s)]
    assert "scripts/no_such_script.py" in words_ and "conf/strategy/*.yaml" in words_
    assert "no such file" in path_problem("scripts/no_such_script.py")
    assert "defines no test_not_defined_anywhere" in path_problem("tests/project/test_docs.py::test_not_defined_anywhere")
    assert path_problem("tests/project/test_docs.py::test_a_refused_command_line_fails_its_test") is None
    assert path_problem("conf/strategy/*.yaml") is None and "glob" in path_problem("conf/nothing/*.yaml")
    assert path_problem("conf/<group>/") is None  # a placeholder
    assert "defines no no_such_function" in python_name_problem("tunelab.config.no_such_function")
    assert python_name_problem("tunelab.engine.validation.check_config") is None
    assert python_name_problem("tunelab.config_hash") is None  # an MLflow tag, not a module

    cmds = commands_of(doc)
    got = [(c.kind, c.target, c.args) for c in cmds]
    assert ("train", "tunelab-train", ["model=resnet18", "data=fashion_mnist"]) in got  # $, \ and # handled
    assert ("train", "tunelab-train", ["-m", "optimizer.lr=1e-3,3e-4"]) in got  # VAR= and && handled
    assert ("console", "tunelab-ui", ["--port", "5001"]) in got
    assert ("console", "tunelab-eval", ["runs:/x", "--split", "val"]) in got  # <run id> made concrete
    assert ("unknown-console", "tunelab-frobnicate", ["--now"]) in got
    assert ("broken", "tunelab-train", []) in got  # an unbalanced quote
    assert ("script", "scripts/benchmark.py", ["--cached-probe"]) in got
    assert ("console", "tunelab-ui", ["--store", "PATH", "--port", "5000"]) in got  # [--optional] checked
    assert ("pytest", "scripts/test.sh", ["-m", "not slow"]) in got
    assert ("hydra-flag", "tunelab-train", ["-sc", "install=bash"]) in got  # inside eval "$(...)"
    assert ("train", "tunelab-train", ["strategy=gradual", "debug=smoke"]) in got  # Python API
    assert not any(c.target == "source" or "curl" in c.target for c in cmds)
    quoted = next(c for c in cmds if "group_lr_mults" in c.text)
    assert unquoted_trouble(quoted.text) == "{"  # the unquoted copy on the same line
    assert unquoted_trouble("tunelab-train 'module.group_lr_mults={head: 2}'") is None
    assert placeholder_inputs(Command("d", 1, "", "train", "tunelab-train", []),
                              ["data.source.root=/data/flowers", "data.source.path=reviews.csv",
                               "init_from=models:/digits/1", "optimizer.lr=1e-3", "hydra.run.dir=/shared/x"]) == [
        "/data/flowers", "reviews.csv", "models:/digits/1"]
    assert is_sweep(["-m", "a=1"]) and is_sweep(["experiment=strategy_shootout"])
    assert not is_sweep(["experiment=mnist_linear_probe"])


def test_a_refused_command_line_fails_its_test(isolated: Path, monkeypatch, capsys) -> None:
    bad = Command("FAKE.md", 1, "tunelab-train trainer.max_epochs=abc", "train", "tunelab-train",
                  ["trainer.max_epochs=abc"])
    with pytest.raises(pytest.fail.Exception, match="max_epochs"):
        _check(bad, isolated, deep=False)
    unquoted = Command("FAKE.md", 2, "tunelab-train module.group_lr_mults={head: 2}", "train", "tunelab-train", [])
    with pytest.raises(AssertionError, match="unquoted"):
        _check(unquoted, isolated, deep=False)
    with pytest.raises(SystemExit):
        parse_with_own_parser("tunelab-export", ["models:/x/1"], monkeypatch)  # --out is required
    with pytest.raises(SystemExit):
        parse_with_own_parser("scripts/benchmark.py", ["--no-such-flag"], monkeypatch)
    assert parse_with_own_parser("scripts/benchmark.py", ["--cached-probe"], monkeypatch).cached_probe is True


def test_the_docs_hold_commands_of_every_kind() -> None:
    """If the extractor broke (a markdown change it cannot read), nothing would be checked."""
    kinds = {c.kind for c in ALL_COMMANDS}
    assert {"train", "hydra-flag", "console", "script"} <= kinds, kinds
    assert len(by_kind("train")) >= 30 and DEEP
