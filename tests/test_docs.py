"""Every code example in README.md and docs/*.md, run, so the docs cannot rot (docs/tests.md, "The docs").

- ```python blocks run for real, each as a script in a fresh interpreter, in a temporary directory holding
  ``facts.jsonl`` (a copy of scripts/data/facts.jsonl), with ``SWARM_INITIAL_PEERS`` naming a real
  swarm of the default model (two `swarm serve` processes, blocks 0:15 and 15:30) and a
  ``SWARM_HOME`` of their own (the user's converted models linked in).
- ```sh blocks: every `swarm ...` line is parsed by the real CLI (typer's click command validates
  its flags and values without running it); the quick ones run for real, in this process, from
  the repository root: ``swarm --version``, ``swarm status`` without ``--watch``, and ``swarm
  generate`` with ``--max-new-tokens`` of at most 16 whose ``--adapter``/``--model`` exist. Other
  commands are not run, each for the reason in :data:`NOT_RUN`.
- ```text blocks are output: not run.
- A block opts out only with ``# doc-test: skip (why)`` on its first line, and the skips are
  counted: they must be fewer than the blocks that run.

Also: every flag of every command is mentioned in the pages, README.md has at most 300 lines,
every relative link (and its #anchor) points to something that exists, and the generated benchmark
tables equal what scripts/docs_figures.py makes of scripts/results/ now.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"^\s*#\s*doc-test:\s*skip\s*\((.+)\)\s*$")
LANGUAGES = {"python": "run", "sh": "run", "text": "output"}

# first words of sh lines the test does not run, and why
NOT_RUN = {
    "make": "sets up the machine, runs the suite or a benchmark (minutes), or rewrites the docs' tables "
            "(make docs: test_generated_figures_equal_the_results_files checks them)",
    "pip": "installs packages",
    "curl": "needs `swarm api` listening on port 8000; tests/test_api.py calls every route",
    "export": "sets a variable for the lines after it; this test sets SWARM_INITIAL_PEERS to its own swarm",
    ".venv/bin/python": "runs the test suite itself",
    "bash": "runs a script that needs what this machine may lack (scripts/gpu_check.sh: a GPU)",
}
MAX_RUN_TOKENS = 16  # `swarm generate` lines with at most this many --max-new-tokens run for real
SWARM_RANGES = ["0:15", "15:30"]
EXAMPLE_TIMEOUT = 300  # seconds one python example may take (they take a few)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        match = SKIP.match(first)
        return match.group(1).strip() if match else None


def code_blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path, line, match.group(1), match.group(2)))
    return found


BLOCKS = code_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SH = [b for b in BLOCKS if b.lang == "sh"]


# --- a real swarm of the default model, started when a block first needs it -------------------


@pytest.fixture(scope="module")
def swarm_peers(tmp_path_factory):
    """SWARM_INITIAL_PEERS of two `swarm serve` processes holding the default model's blocks."""
    from swarm.engine.default_model import ensure_default_model
    from swarm_utils import running_swarm

    model = ensure_default_model(quiet=True)
    home = tmp_path_factory.mktemp("docs-swarm")
    # a given throughput: no measurement at start (the servers' SWARM_HOME is fresh, so nothing is cached)
    with running_swarm(model, SWARM_RANGES, home, extra=("--throughput", "100")) as servers:
        yield servers[0].maddr


@pytest.fixture(scope="module")
def swarm_home(tmp_path_factory):
    """A SWARM_HOME of the examples' own (their identity keys and measurements stay out of the
    user's), sharing the user's converted models."""
    from swarm.engine.default_model import ensure_default_model

    models = ensure_default_model(quiet=True).parent
    home = tmp_path_factory.mktemp("docs-home")
    (home / "models").symlink_to(models, target_is_directory=True)
    return home


def needs_swarm(code: str) -> bool:
    """Whether a python block opens a client without ``local=True`` and without its own peers."""
    calls = re.findall(r"swarm\.(?:open|finetune)\(([^)]*)\)", code)
    return any("local=True" not in args and "initial_peers" not in args for args in calls)


# --- python blocks -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example_runs(block: Block, tmp_path, request, swarm_home):
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    shutil.copy(ROOT / "scripts" / "data" / "facts.jsonl", tmp_path / "facts.jsonl")
    (tmp_path / "example.py").write_text(block.code)
    env = {**os.environ, "SWARM_HOME": str(swarm_home), "HF_HUB_OFFLINE": "1"}
    env.pop("SWARM_INITIAL_PEERS", None)
    if needs_swarm(block.code):
        env["SWARM_INITIAL_PEERS"] = request.getfixturevalue("swarm_peers")
    # a fresh interpreter, as a user runs it (also: swarm's OpenMP settings apply only before torch loads)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=EXAMPLE_TIMEOUT)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{block.id} printed nothing; an example shows its result"


# --- sh blocks ---------------------------------------------------------------------------------


def sh_commands(code: str) -> list[list[str]]:
    """The block's command lines (continuations joined), as words; comments and blank lines dropped."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before a command
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def parse_swarm(args: list[str]):
    """Parse `swarm ARGS` as the CLI would, without running it: (subcommand, its params) or a
    ValueError with click's message."""
    import typer.main

    from swarm.cli.main import app

    group = typer.main.get_command(app)
    ctx = group.make_context("swarm", [], resilient_parsing=True)
    if not args or args[0].startswith("-"):
        return None, {}  # the group's own options (--version, --help): run, not parsed
    command = group.get_command(ctx, args[0])
    if command is None:
        raise ValueError(f"no command {args[0]!r}")
    if "--help" in args:
        return args[0], {"help": True}  # click prints the help and exits while parsing: run it instead
    try:
        return args[0], command.make_context(args[0], args[1:], parent=ctx).params
    except Exception as exc:  # typer's vendored click raises its own UsageError/BadParameter
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise ValueError(message) from None


def runs_for_real(name: str | None, args: list[str], params: dict) -> bool:
    if name is None:
        return args in (["--version"], ["--help"])
    if params.get("help"):
        return True
    if name == "status":
        return not params.get("watch")
    if name == "generate":
        if "--max-new-tokens" not in args or params["max_new_tokens"] > MAX_RUN_TOKENS:
            return False
        adapter, model = params.get("adapter"), params.get("model")
        if adapter is not None and not (ROOT / adapter).exists():
            return False
        return model is None or "/" not in str(model) or (ROOT / str(model)).exists()
    return False


@pytest.mark.slow
@pytest.mark.parametrize("block", SH, ids=[b.id for b in SH])
def test_sh_example_parses_and_quick_ones_run(block: Block, monkeypatch, request, swarm_home):
    from typer.testing import CliRunner

    from swarm.cli.main import app

    if block.skip_reason:
        pytest.skip(block.skip_reason)
    monkeypatch.chdir(ROOT)
    parsed, ran, not_run, errors = [], [], [], []
    for words in sh_commands(block.code):
        line = shlex.join(words)
        if any(w in ("|", "&&", ";", ">", "<") for w in words):
            errors.append(f"{line}: one command per line, no pipes or redirections (the test runs each)")
            continue
        if words[0] != "swarm":
            reason = NOT_RUN.get(words[0])
            if reason is None:
                errors.append(f"{line}: {words[0]!r} is neither a swarm command nor in NOT_RUN with a reason")
            else:
                not_run.append((line, reason))
            continue
        args = words[1:]
        try:
            name, params = parse_swarm(args)
        except ValueError as exc:
            errors.append(f"{line}: {exc}")
            continue
        parsed.append(line)
        if not runs_for_real(name, args, params):
            continue
        env = {"SWARM_INITIAL_PEERS": "", "SWARM_HOME": str(swarm_home)}
        if name == "status" or (name == "generate" and not params.get("local")):
            env["SWARM_INITIAL_PEERS"] = request.getfixturevalue("swarm_peers")
        result = CliRunner().invoke(app, args, env=env)
        if result.exit_code != 0:
            errors.append(f"{line}: exit {result.exit_code}: {result.output[-2000:]}")
        elif not result.output.strip():
            errors.append(f"{line}: printed nothing")
        else:
            ran.append(line)
    assert not errors, f"{block.id}:\n" + "\n".join(errors)
    if not parsed:
        reasons = {reason: [line for line, r in not_run if r == reason] for _, reason in not_run}
        pytest.skip("nothing to parse or run: " + "; ".join(f"{', '.join(lines)}: {r}" for r, lines in reasons.items()))
    assert parsed


# --- the blocks as a whole ---------------------------------------------------------------------


def test_every_block_says_its_language():
    unknown = [f"{b.id}: ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, "give each fenced block python, sh or text:\n" + "\n".join(unknown)


def test_skips_are_marked_explained_and_few():
    runnable = [b for b in BLOCKS if LANGUAGES.get(b.lang) == "run"]
    skipped = [b for b in runnable if b.skip_reason]
    assert all(len(b.skip_reason) > 5 for b in skipped), "a skip says why: # doc-test: skip (why)"
    marked_elsewhere = [b.id for b in BLOCKS if "doc-test:" in b.code and b.skip_reason is None]
    assert not marked_elsewhere, f"a doc-test marker belongs on a block's first line: {marked_elsewhere}"
    assert len(skipped) < len(runnable) - len(skipped), (
        f"{len(skipped)} of {len(runnable)} runnable blocks are skipped: " + ", ".join(b.id for b in skipped)
    )
    assert len(PYTHON) >= 5 and len(SH) >= 10  # the scan found the examples at all


# --- the pages ---------------------------------------------------------------------------------


def test_every_flag_is_documented():
    """Each flag of each command appears somewhere in README.md or docs/ (its help is not enough:
    the pages say what it is for and how it fits with the rest)."""
    import typer.main

    from swarm.cli.main import app

    text = "".join(p.read_text() for p in DOCS)
    group = typer.main.get_command(app)
    ctx = group.make_context("swarm", [], resilient_parsing=True)
    missing = []
    for name in group.list_commands(ctx):
        for param in group.get_command(ctx, name).params:
            names = [o for o in param.opts + param.secondary_opts if o.startswith("-") and o != "--help"]
            if names and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in names):
                missing.append(f"swarm {name} {'/'.join(names)}")
    assert not missing, "flags no page mentions:\n" + "\n".join(missing)



def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """``text`` without fenced blocks and inline code (their brackets are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def test_relative_links_point_to_files_and_anchors():
    broken = []
    for path in DOCS:
        for target in LINK.findall(prose(path.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md":
                anchors = {slug(h) for h in HEADING.findall(prose(dest.read_text()))}
                if anchor not in anchors:
                    broken.append(f"{where}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_generated_figures_equal_the_results_files():
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "scripts" / "docs_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    marked = [p for p in DOCS if "<!-- figures:" in p.read_text()]
    assert ROOT / "README.md" in marked and ROOT / "docs" / "benchmarks.md" in marked
    stale = figures.run(DOCS, check=True)
    assert not stale, "\n".join(stale)
