"""The `mtkd` command line: one file per command under commands/, errors become exit codes here.

Exit codes (SPEC.md): 0 success, 2 bad input (a one-line message naming the culprit; nothing written),
1 anything else.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from mtkd.pipeline.errors import MtkdError


class _MtkdGroup(TyperGroup):
    """Translates mtkd's errors into exit codes, once, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MtkdError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from e


app = typer.Typer(
    cls=_MtkdGroup,
    help="Offline multi-teacher knowledge distillation: infer teachers once, distil students many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# One file per command; each defines a function whose typer signature is the command's interface.
# (registered below, in the order `mtkd --help` lists them)
from mtkd.pipeline.commands import infer, inspect  # noqa: E402

app.command("infer")(infer.infer)
app.command("inspect")(inspect.inspect)
from mtkd.pipeline.commands import verify  # noqa: E402

app.command("verify")(verify.verify)
from mtkd.pipeline.commands import eval, train  # noqa: E402

app.command("train")(train.train)
app.command("eval")(eval.eval_command)
from mtkd.pipeline.commands import demo  # noqa: E402

app.command("demo")(demo.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
