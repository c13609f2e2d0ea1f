"""MkDocs hook: render the `neuralode` command's reference from its argparse parser at build time.

``docs/cli.md`` holds the marker ``<!-- neuralode-cli-reference -->``; on build it is replaced by the usage of
the command and, for every subcommand, its help line, usage and a table of its arguments (flags, default,
choices, help), all read from ``neuralode.cli.build_parser()``. The page therefore cannot drift from the
command: a new subcommand or option shows up on the next build. Also usable by hand::

    python docs/hooks/cli_reference.py      # prints the generated Markdown
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- neuralode-cli-reference -->"
WIDTH = "100"  # argparse wraps usage lines to $COLUMNS: fix it so that the page does not depend on the terminal


def _parser() -> argparse.ArgumentParser:
    os.environ["COLUMNS"] = WIDTH
    from neuralode.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases
                    continue
                seen.add(id(sub))
                out.append((name, helps.get(name, ""), sub))
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    text = str(value)
    return f"`{text}`" if text else ""


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0 and not action.choices:  # with choices: the choices column says what to give
                metavar = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
                flags = f"{flags} {metavar}"
        else:
            flags = formatter._format_args(action, formatter._get_default_metavar_for_positional(action))
        help_text = formatter._expand_help(action) if action.help else ""
        default = action.default
        if action.nargs == 0 or default is None or default == argparse.SUPPRESS:
            default_text = ""  # flags (store_true, help, version) and options without a default
        elif isinstance(default, (list, tuple)):
            default_text = _code(" ".join(map(str, default)))
        else:
            default_text = _code(default)
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        required = " (required)" if action.required and action.option_strings else ""
        rows.append(f"| `{_cell(flags)}`{required} | {_cell(default_text)} | {choices} | {_cell(help_text)} |")
    if not rows:
        return []
    return ["| argument | default | choices | description |", "|---|---|---|---|", *rows]


def render() -> str:
    """The Markdown of the whole reference."""
    parser = _parser()
    lines = ["## `neuralode`", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    lines += _arguments_table(parser) + [""]
    subs = _subcommands(parser)
    if subs:
        lines += ["Subcommands:", ""]
        lines += [f"- [`neuralode {name}`](#neuralode-{name}): {_cell(help_)}" for name, help_, _ in subs]
        lines += [""]
    for name, help_, sub in subs:
        lines += [f"## `neuralode {name}` {{#neuralode-{name}}}", ""]
        if help_:
            lines += [help_[0].upper() + help_[1:] + ("" if help_.endswith(".") else "."), ""]
        if sub.description and sub.description != help_:
            lines += [sub.description, ""]
        lines += ["```text", sub.format_usage().strip(), "```", ""]
        lines += _arguments_table(sub) + [""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' hook signature)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


if __name__ == "__main__":
    print(render())
