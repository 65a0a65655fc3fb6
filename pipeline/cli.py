"""The `mtkd` command line: one file per command under commands/, errors become exit codes here.

Exit codes (SPEC.md): 0 success, 2 bad input (a one-line message naming the culprit; nothing written),
1 anything else. With `--json` the last line of stdout is one JSON object, also on failure:
`{"error": {"kind": <the error's class name>, "message": <its one line>}}`.

Nothing heavy is imported here or at the top of a command file (torch, zarr, the stages): `mtkd --help`
and `mtkd CMD --help` must stay faster than `import torch` (bench/cli.py measures it). A command
imports what it runs inside its function body.
"""

from __future__ import annotations

import errno
import json
import sys

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.20 carries its own copy of click; its errors are that copy's classes
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from mtkd.pipeline.errors import MtkdError

_JSON_FLAG = "--json"


def _json_requested(args: list[str]) -> bool:
    # Options end at a bare `--`; what follows is an argument, even if it reads `--json`.
    return _JSON_FLAG in (args[: args.index("--")] if "--" in args else args)


def _print_json_error(kind: str, message: str) -> None:
    print(json.dumps({"error": {"kind": kind, "message": message}}), flush=True)


def _untyped_flags(params: list) -> list:
    # typer 0.29 prints `<bool>` after every flag (`--json <bool>`), as if it took a value; it takes none.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _usage_error(e: click_errors.ClickException, as_json: bool) -> None:
    """click's own errors (a bad or missing option, an unknown command) as one line `error: ...` on
    stderr (and the JSON line under --json), exit 2, instead of typer's boxed usage text."""
    if isinstance(e, _HELP_INSTEAD):  # `mtkd` alone: the help, as asked by no_args_is_help
        raise e
    if isinstance(e, click_errors.BadParameter):  # typer's enum check words it "Value error, 'x' is not one of"
        e.message = e.message.replace("Value error, ", "", 1)
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    if as_json:
        _print_json_error(type(e).__name__, message)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(e.exit_code) from e


_HELP_INSTEAD = getattr(click_errors, "NoArgsIsHelpError", ())


class _MtkdCommand(TyperCommand):
    """A command whose flags show no value type in --help."""

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _MtkdGroup(TyperGroup):
    """Translates errors into exit codes, once, for every command, and into JSON under --json."""

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))

    def parse_args(self, ctx, args):
        ctx.meta["mtkd.json"] = _json_requested(list(args))
        try:
            return super().parse_args(ctx, args)
        except click_errors.ClickException as e:  # `mtkd --bogus`
            _usage_error(e, ctx.meta["mtkd.json"])

    def invoke(self, ctx):
        as_json = ctx.meta.get("mtkd.json", False)
        try:
            return super().invoke(ctx)
        except MtkdError as e:
            if as_json:
                _print_json_error(type(e).__name__, str(e))
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Every file mtkd writes goes to a temporary name first, removed when the write fails.
            message = (f"no space left on the device of {e.filename or 'a file being written'}; "
                       "nothing half-written was kept: free space and rerun")
            if as_json:
                _print_json_error("DiskFullError", message)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from e
        except (typer.Exit, typer.Abort):
            raise
        except click_errors.ClickException as e:  # usage errors (exit 2): one line, like every refusal
            _usage_error(e, as_json)
        except Exception as e:  # a bug (exit 1): its traceback as before; the JSON line for scripts
            if as_json:
                _print_json_error(type(e).__name__, " ".join(str(e).split()))
            raise


app = typer.Typer(
    cls=_MtkdGroup,
    help="Offline multi-teacher knowledge distillation: infer teachers once, distil students many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# One file per command; each defines a function whose typer signature is the command's interface.
# (registered in the order `mtkd --help` lists them)
from mtkd.pipeline.commands import demo, eval, infer, inspect, train, verify  # noqa: E402
from mtkd.pipeline.commands import export, tokenize  # noqa: E402

app.command("tokenize", cls=_MtkdCommand)(tokenize.tokenize)

app.command("infer", cls=_MtkdCommand)(infer.infer)
app.command("inspect", cls=_MtkdCommand)(inspect.inspect)
app.command("verify", cls=_MtkdCommand)(verify.verify)
app.command("train", cls=_MtkdCommand)(train.train)
app.command("eval", cls=_MtkdCommand)(eval.eval_command)
app.command("export", cls=_MtkdCommand)(export.export)
app.command("demo", cls=_MtkdCommand)(demo.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
