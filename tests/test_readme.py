"""The README's commands and snippets, read from the README itself: they parse, the documented paths are the
ones the commands write, the command table lists every command, and the Python co-segmentation snippet uses
the command line's defaults."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vitdense.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# Make a pretraining step take a second on a CPU; appended, so they override the README's own values.
TINY_PRETRAIN = ["--arch", "vit_tiny_patch16_224", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
                 "--local-crops", "2", "--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32",
                 "--batch-size", "4", "--max-steps", "1", "--workers", "0"]


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(heading above, code) of every fenced block of ``language`` in the README."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
        headings = re.findall(r"^#+ (.+)$", text[:match.start()], re.M)
        blocks.append((headings[-1] if headings else "", match.group(1)))
    return blocks


def vitdense_commands(code: str) -> list[list[str]]:
    """The `vitdense ...` commands of a bash block (after `&&` too), comments dropped, as argument lists."""
    commands = []
    for line in code.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "vitdense":
                commands.append(words[1:])
    return commands


def parses(args: list[str]) -> None:
    """Let click parse a command line (options, arguments, choices) without running the command."""
    import click

    cmd, ctx, rest = main, None, list(args)
    while isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=cmd.name, parent=ctx)
        name, rest = rest[0], rest[1:]
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, f"no command {name}"
    cmd.make_context(name, rest, parent=ctx)


def test_every_readme_command_line_parses():
    found = [cmd for _, code in code_blocks("bash") for cmd in vitdense_commands(code)]
    inline = re.findall(r"`(vitdense correspond [^`]+)`", README.read_text())  # the one in running text
    found += [shlex.split(c)[1:] for c in inline]
    assert len(found) >= 5
    for args in found:
        if "..." in args:
            continue
        parses(args)


def test_command_table_lists_every_command():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `vitdense ")]
    listed = {name for line in table for name in re.findall(r"`vitdense ([a-z-]+)", line)}
    assert set(main.commands) <= listed, sorted(set(main.commands) - listed)


def test_python_cosegment_snippet_uses_the_cli_defaults():
    """The snippet and `vitdense cosegment` must give the same masks: same layer, facet, bin, load size."""
    snippet = next(code for _, code in code_blocks("python") if "cosegment_objects" in code)
    calls = {}
    for node in ast.walk(ast.parse(snippet)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            calls[node.func.attr] = {k.arg: ast.literal_eval(k.value) for k in node.keywords
                                     if isinstance(k.value, ast.Constant)}
    command = main.commands["cosegment"]
    defaults = {p.name: p.default for p in command.params}
    assert calls["extract"]["layers"] == defaults["layer"]
    assert calls["extract"]["facet"] == defaults["facet"]
    assert calls["extract"]["bin"] == defaults["use_bin"]
    assert calls["preprocess"]["load_size"] == defaults["load_size"]


def test_pretraining_example_runs_and_its_paths_exist(tmp_path, photos, monkeypatch):
    """Run the README's pretraining block as written (torchrun line aside), made tiny by appended options:
    train, resume from the run's saved settings, then use the documented export in another command."""
    (block,) = [code for heading, code in code_blocks("bash") if "Pretraining" in heading]
    commands = vitdense_commands(block)
    assert [c[0] for c in commands] == ["pretrain", "pretrain", "cosegment"]
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for folder, count in (("my_images", 8), ("imgs", 2)):
        Path(folder).mkdir()
        for i in range(count):
            img = photos[sorted(photos)[i % len(photos)]]
            y, x = rng.integers(0, 100, 2)
            Image.fromarray(img[y:y + 200, x:x + 200]).resize((64, 64)).save(f"{folder}/{i}.jpg")
    runner = CliRunner()
    train, resume, use = commands
    result = runner.invoke(main, train + TINY_PRETRAIN)
    assert result.exit_code == 0, result.output
    assert "--resume" in resume and "--arch" not in resume  # the README resumes without repeating options
    result = runner.invoke(main, resume + ["--max-steps", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    weights = use[use.index("--weights") + 1]
    assert Path(weights).is_file(), f"the README's --weights {weights} is not what pretrain writes"
    result = runner.invoke(main, use + ["--device", "cpu", "--load-size", "32", "--niter", "5", "--nredo", "1",
                                        "--refine", "none"])
    assert result.exit_code == 0, result.output
    assert Path(use[use.index("--out") + 1], "summary.json").is_file()


@pytest.mark.slow
def test_setup_command_works_without_network(tmp_path, monkeypatch):
    """The README's first command on a machine with no network: auto falls back to the bundled model."""
    from vitdense import backbones

    def no_network(url, timeout):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbones, "hub_cached_file", lambda spec: None)
    monkeypatch.setattr(backbones, "_head", no_network)
    (block,) = [code for heading, code in code_blocks("bash") if heading == "Set up" and "cosegment" in code]
    (args,) = vitdense_commands(block)
    monkeypatch.chdir(README.parent)
    out = tmp_path / "flowers"
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "weights: vitdense_vits8 (bundled): " in result.stderr and "cannot be reached" in result.stderr
    assert (out / "contact_sheet.png").is_file() and len(list(out.glob("*_mask.png"))) == 4
